"""Every stage input, malformed: one KbError line naming the file, never a traceback.

A table of hand-made bad files (data files, LMFlow files, records, state/flow/meta files, `.reps.npy`,
YAML configs, model folders, mismatched files), then a fuzz test: random bytes and mutations of valid
files fed to every loader, where only kb's own one-line error may come out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kb.errors import KbError

MMLU_ROW = '"What is 2+2?",1,2,3,4,D\n'


# ---------------------------------------------------------------- valid files to break


def state_rec(i: int, **over: Any) -> dict[str, Any]:
    rec = {"id": f"q/{i}", "kind": "mcq", "group": "g", "question": f"Q{i}?", "gold": "A", "cor": 0.25,
           "cer": -1.3, "choices": ["a", "b", "c", "d"], "letter_probs": [0.25] * 4, "pred": "A",
           "cer_entropy": -1.3, "cer_agree": 0.25}
    rec.update(over)
    return rec


def probe_rec(i: int, **over: Any) -> dict[str, Any]:
    rec = {"id": f"q/{i}", "group": "g", "question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "gold": "A",
           "letter_probs": [0.7, 0.1, 0.1, 0.1], "pred": "A", "correct": True, "answer_conf": 0.7}
    rec.update(over)
    return rec


def eval_rec(i: int, **over: Any) -> dict[str, Any]:
    rec = {"id": f"q/{i}", "group": "g", "question": f"Q{i}?", "gold": "x", "aliases": [], "reply": "x.", "continued": False,
           "rtuning_verdict": None, "outcome": "correct", "outcome_broad": "correct", "answer": "x", "answer_conf": 0.5,
           "ap_correct": True, "sure_prob": 0.5, "method": "initial", "test_set": "T_test", "template": "open_basic",
           "should_abstain": False}
    rec.update(over)
    return rec


def record_file(t: Path, kind: str, recs: list[dict[str, Any]] | None = None, raw: bytes | None = None,
                judged: list[dict[str, Any]] | None = None) -> Any:
    """A probe or evaluation records file (and a judgement file), read as the report and tables read it."""
    from kb.layout import judged_path
    from kb.records import read_eval_records, read_probe_records

    path = t / "T_test_open_basic.jsonl"
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in recs or []).encode())
    if judged is not None:
        judged_path(path).write_text("".join(json.dumps(r) + "\n" for r in judged))
    return (read_probe_records if kind == "probe" else read_eval_records)(path)


def write_state(root: Path, recs: list[dict[str, Any]] | None = None, meta: Any = None) -> Path:
    recs = [state_rec(0), state_rec(1)] if recs is None else recs
    path = root / "state_X.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    if meta is None:
        meta = {"stage": "state", "question_ids": [r.get("id") for r in recs], "model": {"fingerprint": "f0"},
                "questions": {"n": len(recs), "digest": "d0"}, "run_key": {"k": 1}}
    (root / "state_X.meta.json").write_text(json.dumps(meta))
    return path


def write_flow(root: Path, state_path: Path, recs: list[dict[str, Any]] | None = None, **meta_over: Any) -> Path:
    from kb.statefile import flow_record, load_state, state_identity

    state = load_state(state_path)
    if recs is None:
        recs = [flow_record(r["id"], r, r) for r in state.records]
    path = root / "flow_X.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "flow_X.meta.json").write_text(json.dumps({"stage": "flow", "state": state_identity(state), **meta_over}))
    return path


def write_reps(root: Path, arr: Any = None, ids: Any = None, raw: bytes | None = None) -> Path:
    state = write_state(root)
    npy = root / "state_X.reps.npy"
    if raw is not None:
        npy.write_bytes(raw)
    else:
        np.save(npy, np.zeros((2, 4), dtype=np.float16) if arr is None else arr)
    (root / "state_X.reps.json").write_text(json.dumps({"ids": ["q/0", "q/1"] if ids is None else ids,
                                                        "model_fingerprint": "f0"}))
    return state


def load_reps_of(state_path: Path) -> Any:
    from kb.statefile import load_reps, load_state

    return load_reps(load_state(state_path))


def load_flow_for(state_path: Path, flow_path: Path) -> None:
    from kb.statefile import check_flow_matches, load_flow, load_state

    check_flow_matches(load_state(state_path), load_flow(flow_path))


def mmlu_csv(t: Path, raw: bytes) -> Any:
    from kb.data import read_mmlu_csv

    (t / "algebra_test.csv").write_bytes(raw)
    return read_mmlu_csv(t / "algebra_test.csv", "algebra", "mmlu/test")


def loader(t: Path, name: str, raw: bytes, suffix: str = ".txt") -> Any:
    from kb.data import _LOADERS, DatasetSpec

    path = t / f"data{suffix}"
    path.write_bytes(raw)
    spec = DatasetSpec(name, "open", name, {"x": {"file": str(path)}}, None)
    return _LOADERS[name](spec, "x", {"file": str(path)}, None)


def lmflow(t: Path, raw: bytes) -> Any:
    from kb.lmflow import read_dataset

    (t / "train.json").write_bytes(raw)
    return read_dataset(t / "train.json")


def records(t: Path, raw: bytes) -> Any:
    from kb.io import RecordLog
    from kb.locks import release_all

    (t / "probe_X.jsonl").write_bytes(raw)
    try:
        RecordLog(t / "probe_X.jsonl").close()
    finally:
        release_all()


def yaml_config(t: Path, raw: bytes) -> Any:
    import argparse

    from kb.config import add_common_args, parse_with_config

    (t / "c.yaml").write_bytes(raw)
    p = argparse.ArgumentParser()
    add_common_args(p)
    p.add_argument("--shots", type=int, default=5, choices=[0, 5])
    return parse_with_config(p, ["--config", str(t / "c.yaml")])


def finetune_config(t: Path, **over: Any) -> Any:
    import yaml

    from kb.paths import REPO_ROOT
    from kb.recipe import load_recipe

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "finetune_cpu_demo.yaml").read_text())
    for k, v in over.items():
        if k.startswith("lora_"):
            cfg["lora"][k[5:]] = v
        elif v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (t / "ft.yaml").write_text(yaml.safe_dump(cfg))
    return load_recipe(str(t / "ft.yaml"))


def model_dir(t: Path, tiny: Path, drop: str = "", files: dict[str, bytes] | None = None) -> Any:
    import shutil

    from kb.models import load_model

    d = t / "m"
    shutil.copytree(tiny, d)
    for name in drop.split(","):
        if name:
            (d / name).unlink()
    for name, raw in (files or {}).items():
        (d / name).write_bytes(raw)
    return load_model(str(d), device="cpu", dtype="float32")


def adapter_dir(t: Path, files: dict[str, bytes]) -> Any:
    from kb.models import load_model

    d = t / "adapter"
    d.mkdir()
    for name, raw in files.items():
        (d / name).write_bytes(raw)
    return load_model(str(d), device="cpu", dtype="float32")


def resumable(t: Path, meta_text: str) -> Any:
    from kb.provenance import check_resumable

    (t / "probe_X.meta.json").write_text(meta_text)
    return check_resumable(t / "probe_X.meta.json", {"run_key": {}, "model": {}, "questions": {}}, False)


def rtuning_json_rows(t: Path, rows: Any) -> Any:
    from kb.data import json_rows_to_samples

    return json_rows_to_samples(t / "mmlu.json", rows, "mmlu", "x")


def state_with(t: Path, **kw: Any) -> Any:
    from kb.statefile import load_state

    return load_state(write_state(t, **kw))


UTF16 = "\ufeffq,1,2,3,4,A\n".encode("utf-16-le")
# (id, make the bad input and load it, expected fragment of the one-line error)
CASES: list[tuple[str, Callable[[Path, Path], Any], str]] = [
    # MMLU CSVs
    ("mmlu-utf16", lambda t, m: mmlu_csv(t, b"\xff\xfe" + UTF16), "not UTF-8 text (byte 0xff at offset 0); it looks like UTF-16"),
    ("mmlu-latin1", lambda t, m: mmlu_csv(t, MMLU_ROW.encode() + b'"caf\xe9",1,2,3,4,A\n'), "not UTF-8 text (byte 0xe9"),
    ("mmlu-nul-byte", lambda t, m: mmlu_csv(t, b'"a\x00b",1,2,3,4,A\n'), "NUL byte at offset 2"),
    ("mmlu-huge-field", lambda t, m: mmlu_csv(t, b'"' + b"x" * 200_000 + b'",1,2,3,4,A\n'), "field larger than field limit"),
    ("mmlu-unclosed-quote", lambda t, m: mmlu_csv(t, b'"q,1,2,3,4,A\n'), "expected 6 columns"),
    ("mmlu-crlf-short-row", lambda t, m: mmlu_csv(t, b"q,1,2,3,4,A\r\nq,1,2\r\n"), "row 2: expected 6 columns"),
    ("mmlu-lowercase-answer", lambda t, m: mmlu_csv(t, b"q,1,2,3,4,a\n"), "answer 'a' is not one of A, B, C, D"),
    # ParaRel JSON, ARC / NQ JSONL, DPR TSV, R-Tuning's MMLU JSON
    ("pararel-latin1", lambda t, m: loader(t, "pararel_json", b'[["caf\xe9", "a", "r"]]', ".json"), "not UTF-8 text"),
    ("pararel-nan", lambda t, m: loader(t, "pararel_json", b'[["q", "a", "r"], NaN]', ".json"), "NaN is not a valid number"),
    ("pararel-deep", lambda t, m: loader(t, "pararel_json", b"[" * 100_000, ".json"), "JSON"),
    ("pararel-empty-answer", lambda t, m: loader(t, "pararel_json", b'[["q", " ", "r"]]', ".json"), "row 0: empty question or answer"),
    ("pararel-empty-file", lambda t, m: loader(t, "pararel_json", b"", ".json"), "malformed JSON"),
    ("arc-stem-number", lambda t, m: loader(t, "arc_jsonl", json.dumps({"question": {"stem": 7, "choices": [
        {"label": "A", "text": "x"}]}, "answerKey": "A"}).encode()), "row 1: question stem, labels, texts and answerKey must be strings"),
    ("arc-choices-not-list", lambda t, m: loader(t, "arc_jsonl", b'{"question": {"stem": "s", "choices": 3}, "answerKey": "A"}'),
     "row 1: malformed ARC record"),
    ("arc-bad-line", lambda t, m: loader(t, "arc_jsonl", b'{"question": \n'), "row 1: malformed JSON line"),
    ("nq-question-number", lambda t, m: loader(t, "nq_jsonl", b'{"question": 1, "answer": ["a"]}\n'), "row 1: expected {question"),
    ("nq-answers-empty", lambda t, m: loader(t, "nq_jsonl", b'{"question": "q", "answer": []}\n'), "row 1: expected {question"),
    ("nq-list-line", lambda t, m: loader(t, "nq_jsonl", b'["q", ["a"]]\n'), "row 1: expected {question"),
    ("dpr-no-tab", lambda t, m: loader(t, "dpr_tsv", b"question only\n"), "row 1: expected 'question<TAB>[answers]'"),
    ("dpr-answers-not-list", lambda t, m: loader(t, "dpr_tsv", b"q\t'a'\n"), "row 1: expected 'question<TAB>[answers]'"),
    ("dpr-deep-answers", lambda t, m: loader(t, "dpr_tsv", b"q\t" + b"[" * 50_000 + b"\n"), "expected 'question<TAB>[answers]'"),
    ("rtuning-mmlu-rows-not-list", lambda t, m: rtuning_json_rows(t, {"algebra": 5}), "row algebra: expected a list of rows"),
    ("rtuning-mmlu-letter-list", lambda t, m: rtuning_json_rows(t, {"a": [["q", 1, 2, 3, 4, ["A"]]]}),
     "expected [question, A, B, C, D, letter]"),
    # LMFlow files
    ("lmflow-utf16", lambda t, m: lmflow(t, b"\xff\xfe{}"), "not UTF-8 text"),
    ("lmflow-list", lambda t, m: lmflow(t, b"[]"), "must be a JSON object with 'type' and 'instances'"),
    ("lmflow-type-number", lambda t, m: lmflow(t, b'{"type": 1, "instances": []}'), "unknown LMFlow type 1"),
    ("lmflow-instance-string", lambda t, m: lmflow(t, b'{"type": "text_only", "instances": ["x"]}'),
     "instance 0: instance must be an object"),
    ("lmflow-text-number", lambda t, m: lmflow(t, b'{"type": "text_only", "instances": [{"text": 5}]}'), "field 'text': must be a string"),
    ("lmflow-empty-output", lambda t, m: lmflow(t, b'{"type": "text2text", "instances": [{"input": "q", "output": ""}]}'), "empty output"),
    # record files (probe / state / evaluation records go through RecordLog)
    ("records-id-list", lambda t, m: records(t, b'{"id": ["a"]}\n'), "row 1: field 'id': must be a string"),
    ("records-no-id", lambda t, m: records(t, b'{"x": 1}\n'), "row 1: record has no 'id'"),
    ("records-array-line", lambda t, m: records(t, b'{"id": "a"}\n[1]\n'), "row 2: each line must be a JSON object"),
    ("records-latin1-middle", lambda t, m: records(t, b'{"id": "a"}\n{"id": "caf\xe9"}\n{"id": "b"}\n'), "row 2: not UTF-8 text"),
    ("records-bare-nan", lambda t, m: records(t, b'{"id": "a", "p": NaN}\n'), "row 1: NaN is not a valid number"),
    # probe and evaluation records as the report, the tables and the THS / threshold baselines read them (kb.records)
    ("probe-correct-string", lambda t, m: record_file(t, "probe", [probe_rec(0, correct="yes")]),
     "row 1: field 'correct': must be true or false, got 'yes'"),
    ("probe-missing-pred", lambda t, m: record_file(t, "probe", [{k: v for k, v in probe_rec(0).items() if k != "pred"}]),
     "row 1: field 'pred': missing field"),
    ("probe-mixed-kinds", lambda t, m: record_file(t, "probe", [probe_rec(0), {**eval_rec(1), "generation": "x", "correct": True}]),
     "row 2: field 'choices': a open record in a file of mcq records"),
    ("probe-letter-prob-range", lambda t, m: record_file(t, "probe", [probe_rec(0, letter_probs=[1.5, 0, 0, 0])]),
     "field 'letter_probs': item 0 must lie in [0, 1], got 1.5"),
    ("eval-outcome-alias", lambda t, m: record_file(t, "eval", [eval_rec(0), eval_rec(1, outcome="wrong")]),
     "row 2: field 'outcome': must be one of correct, incorrect, refused, fail_parse, got 'wrong'"),
    ("eval-no-method", lambda t, m: record_file(t, "eval", [{k: v for k, v in eval_rec(0).items() if k != "method"}]),
     "row 1: field 'method': missing field"),
    ("eval-conf-range", lambda t, m: record_file(t, "eval", [eval_rec(0, answer_conf=1.5)]),
     "row 1: field 'answer_conf': must lie in [0, 1], got 1.5"),
    ("eval-conf-string", lambda t, m: record_file(t, "eval", [eval_rec(0, answer_conf="high")]),
     "row 1: field 'answer_conf': must be a number or null, got 'high'"),
    ("eval-verdict-unknown", lambda t, m: record_file(t, "eval", [eval_rec(0, rtuning_verdict="maybe")]),
     "field 'rtuning_verdict': must be one of sure, unsure or null, got 'maybe'"),
    ("eval-other-test-set", lambda t, m: record_file(t, "eval", [eval_rec(0), eval_rec(1, test_set="U_test")]),
     "row 2: field 'test_set': 'U_test' differs from row 1's 'T_test'"),
    ("eval-duplicate-id", lambda t, m: record_file(t, "eval", [eval_rec(0), eval_rec(0)]), "row 2: field 'id': duplicate id"),
    ("eval-latin1", lambda t, m: record_file(t, "eval", raw=b'{"id": "caf\xe9"}\n'), "row 1: not UTF-8 text"),
    ("judgement-bad-outcome", lambda t, m: record_file(t, "eval", [eval_rec(0)], judged=[
        {"id": "q/0", "reply": "x.", "rtuning_verdict": None, "outcome": "maybe", "outcome_broad": "correct"}]),
     "T_test_open_basic.judged.jsonl: row 1: field 'outcome'"),
    # state, flow and meta files
    ("state-cor-string", lambda t, m: state_with(t, recs=[state_rec(0, cor="0.5")]), "row 1: field 'cor': must be a number"),
    ("state-cor-range", lambda t, m: state_with(t, recs=[state_rec(0, cor=1.5)]), "field 'cor': must lie in [0, 1]"),
    ("state-missing-choices", lambda t, m: state_with(t, recs=[{k: v for k, v in state_rec(0).items() if k != "choices"}]),
     "field 'choices': missing field"),
    ("state-id-number", lambda t, m: state_with(t, recs=[state_rec(0, id=3)]), "field 'id': must be a string"),
    ("state-duplicate-id", lambda t, m: state_with(t, recs=[state_rec(0), state_rec(0)]), "row 2: field 'id': duplicate id"),
    ("state-empty", lambda t, m: state_with(t, recs=[]), "no records (empty file)"),
    ("state-meta-list", lambda t, m: state_with(t, meta=[1]), "state_X.meta.json: a meta file must be a JSON object"),
    ("state-meta-ids-unhashable", lambda t, m: state_with(t, meta={"stage": "state", "question_ids": [["q/0"]]}),
     "question id list"),
    ("state-meta-model-string", lambda t, m: state_with(t, meta={"stage": "state", "model": "x", "question_ids": []}),
     "field 'model': must be an object"),
    ("state-interrupted", lambda t, m: state_with(t, meta={"stage": "state", "question_ids": ["q/0", "q/1", "q/2"]}),
     "records do not cover the run's questions"),
    ("flow-d-mu-wrong", lambda t, m: load_flow_for(s := write_state(t), write_flow(t, s, recs=[
        {"id": "q/0", "cor0": 0.25, "cer0": -1.3, "cor1": 0.5, "cer1": -1.3, "d_mu": 0.0, "d_sigma": 0.0}])), "d_mu != cor1 - cor0"),
    ("flow-ids-differ", lambda t, m: load_flow_for(s := write_state(t), write_flow(t, s, recs=[
        {"id": "q/9", "cor0": 0.25, "cer0": -1.3, "cor1": 0.25, "cer1": -1.3, "d_mu": 0.0, "d_sigma": 0.0},
        {"id": "q/1", "cor0": 0.25, "cer0": -1.3, "cor1": 0.25, "cer1": -1.3, "d_mu": 0.0, "d_sigma": 0.0}])),
     "question ids differ from"),
    ("flow-from-another-state", lambda t, m: load_flow_for(write_state(t), write_flow(t, write_state(t), state={"x": 1})),
     "made from another state file"),
    ("flow-meta-state-string", lambda t, m: load_flow_for(s := write_state(t), write_flow(t, s, state="x")),
     "field 'state': must be an object"),
    ("probe-meta-not-object", lambda t, m: resumable(t, "[]"), "not a meta file kb wrote"),
    # question representations (.reps.npy + .reps.json)
    ("reps-garbage", lambda t, m: load_reps_of(write_reps(t, raw=b"\x93NUMPY garbage")), "state_X.reps.npy: not a readable .npy array"),
    ("reps-truncated", lambda t, m: load_reps_of(write_reps(t, raw=_npy_bytes()[:-10])), "state_X.reps.npy: not a readable .npy array"),
    ("reps-1d", lambda t, m: load_reps_of(write_reps(t, arr=np.zeros(2, dtype=np.float32))), "expected a 2-d float array"),
    ("reps-pickled-object", lambda t, m: load_reps_of(write_reps(t, arr=np.array([[None, 1]], dtype=object))),
     "not a readable .npy array"),
    ("reps-ids-short", lambda t, m: load_reps_of(write_reps(t, ids=["q/0"])), "ids list does not match"),
    ("reps-nan-row", lambda t, m: load_reps_of(write_reps(t, arr=np.full((2, 4), np.nan, dtype=np.float16))), "non-finite values"),
    # YAML configs (stage flags and fine-tuning recipes)
    ("yaml-latin1", lambda t, m: yaml_config(t, b"model: caf\xe9\n"), "c.yaml: not UTF-8 text"),
    ("yaml-int-key", lambda t, m: yaml_config(t, b"1: 2\n"), "option names must be strings"),
    ("yaml-list-for-int", lambda t, m: yaml_config(t, b"limit: [1, 2]\n"), "field 'limit': expected a single value"),
    ("yaml-float-for-int", lambda t, m: yaml_config(t, b"seed: 1.5\n"), "field 'seed': expected an integer"),
    ("yaml-string-for-flag", lambda t, m: yaml_config(t, b"restart: 'yes'\n"), "field 'restart': expected true or false"),
    ("yaml-bad-int-string", lambda t, m: yaml_config(t, b"limit: ten\n"), "field 'limit': invalid value 'ten'"),
    ("yaml-tab-indent", lambda t, m: yaml_config(t, b"a:\n\tb: 1\n"), "malformed YAML"),
    ("yaml-bom-ok-then-unknown", lambda t, m: yaml_config(t, b"\xef\xbb\xbfepochs: 3\n"), "unknown key(s) epochs"),
    ("finetune-targets-numbers", lambda t, m: finetune_config(t, lora_target_modules=[1, 2]), "lora.target_modules"),
    ("finetune-missing-key", lambda t, m: finetune_config(t, learning_rate=None), "missing key(s) learning_rate"),
    # model folders
    ("model-no-weights", lambda t, m: model_dir(t, m, drop="model.safetensors"), "has no weight files"),
    ("model-config-garbage", lambda t, m: model_dir(t, m, files={"config.json": b"\xff\xfe"}), "config.json: not UTF-8 text"),
    ("model-config-list", lambda t, m: model_dir(t, m, files={"config.json": b"[]"}), "config.json: must be a JSON object"),
    ("model-weights-truncated", lambda t, m: model_dir(t, m, files={"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}),
     "failed to load"),
    ("model-no-tokenizer", lambda t, m: model_dir(t, m, drop="tokenizer.json,tokenizer_config.json"), "failed to load"),
    ("adapter-config-garbage", lambda t, m: adapter_dir(t, {"adapter_config.json": b"{"}), "adapter_config.json: malformed JSON"),
    ("adapter-base-info-bad", lambda t, m: adapter_dir(t, {"adapter_config.json": b"{}", "kb_base_model.json": b'{"base_model": 3}'}),
     "field 'base_model'"),
    # remote code
    ("remote-code-without-flag", lambda t, m: _load_hub("Qwen/Qwen-7B"), "add --trust-remote-code --revision"),
    ("remote-code-unpinned", lambda t, m: _load_hub("THUDM/chatglm2-6b", trust_remote_code=True, revision="main"),
     "needs --revision <40-hex commit>"),
]


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4), dtype=np.float16))
    return buf.getvalue()


def _load_hub(name: str, **kw: Any) -> Any:
    from kb.models import load_model

    return load_model(name, device="cpu", **kw)


def test_there_are_at_least_50_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_one_line(case, tmp_path, tiny_model_dir):
    _, make, expected = case
    with pytest.raises(KbError) as err:
        make(tmp_path, tiny_model_dir)
    msg = str(err.value)
    assert "\n" not in msg and expected in msg, msg


@pytest.mark.parametrize("raw", [b"\xef\xbb\xbf" + MMLU_ROW.encode(), MMLU_ROW.replace("\n", "\r\n").encode()],
                         ids=["bom", "crlf"])
def test_bom_and_crlf_read_like_plain_files(tmp_path, raw):
    plain = mmlu_csv(tmp_path, MMLU_ROW.encode())
    assert mmlu_csv(tmp_path, raw) == plain


def test_torn_tail_cut_inside_a_utf8_character_is_dropped(tmp_path):
    from kb.io import RecordLog
    from kb.locks import release_all

    good = '{"id": "a", "q": "é"}\n'.encode()
    (tmp_path / "r.jsonl").write_bytes(good + '{"id": "b", "q": "é'.encode()[:-1])  # cut mid-character
    try:
        with RecordLog(tmp_path / "r.jsonl") as log:
            assert list(log.records) == ["a"]
    finally:
        release_all()
    assert (tmp_path / "r.jsonl").read_bytes() == good


# ---------------------------------------------------------------- fuzz

VALID: dict[str, bytes] = {
    "mmlu": (MMLU_ROW * 3).encode(),
    "pararel": json.dumps([["q", "a", "r"], ["q2", "b", "r"]]).encode(),
    "arc": (json.dumps({"id": "x", "question": {"stem": "s", "choices": [{"label": "A", "text": "t"},
                                                                         {"label": "B", "text": "u"}]},
                        "answerKey": "B"}) + "\n").encode(),
    "nq": b'{"question": "q", "answer": ["a", "b"]}\n',
    "dpr": b"q\t['a', 'b']\n",
    "lmflow": json.dumps({"type": "text2text", "instances": [{"input": "q", "output": "a"}]}).encode(),
    "records": b'{"id": "a", "x": 1}\n{"id": "b", "x": [1, 2]}\n',
    "eval": "".join(json.dumps(eval_rec(i)) + "\n" for i in range(2)).encode(),
    "state": "".join(json.dumps(state_rec(i)) + "\n" for i in range(2)).encode(),
    "yaml": b"limit: 3\nseed: 1\nmodel: m\nchat_template: auto\n",
    "npy": _npy_bytes(),
}


def _feed(kind: str, t: Path, raw: bytes) -> None:
    if kind == "mmlu":
        mmlu_csv(t, raw)
    elif kind in ("pararel", "arc", "nq", "dpr"):
        name = {"pararel": "pararel_json", "arc": "arc_jsonl", "nq": "nq_jsonl", "dpr": "dpr_tsv"}[kind]
        loader(t, name, raw)
    elif kind == "lmflow":
        lmflow(t, raw)
    elif kind == "records":
        records(t, raw)
    elif kind == "eval":
        record_file(t, "eval", raw=raw)
    elif kind == "state":
        from kb.statefile import load_state

        path = write_state(t)
        path.write_bytes(raw)
        load_state(path)
    elif kind == "yaml":
        yaml_config(t, raw)
    elif kind == "npy":
        load_reps_of(write_reps(t, raw=raw))


def _mutations() -> st.SearchStrategy[tuple[str, bytes]]:
    def mutate(kind: str, data: st.DataObject) -> tuple[str, bytes]:
        raw = bytearray(VALID[kind])
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
            pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
            if op == "flip" and raw:
                raw[pos] = data.draw(st.integers(0, 255))
            elif op == "cut":
                del raw[pos:]
            elif op == "insert":
                raw[pos:pos] = data.draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\r", b"\n", b'"', b"[", b"{",
                                                          b"NaN", b"-1e999", b"\t", b",", b"\xe9", b"null", b"\\"]))
            elif raw:
                del raw[pos:pos + data.draw(st.integers(1, 8))]
        return kind, bytes(raw)

    return st.tuples(st.sampled_from(sorted(VALID)), st.data()).map(lambda kd: mutate(*kd))


@settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_mutations())
def test_fuzz_mutated_files_give_kb_errors_only(tmp_path_factory, case):
    kind, raw = case
    t = tmp_path_factory.mktemp("fuzz")
    try:
        _feed(kind, t, raw)
    except KbError as err:
        assert "\n" not in str(err)


@settings(max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(VALID)), raw=st.binary(max_size=400))
def test_fuzz_random_bytes_give_kb_errors_only(tmp_path_factory, kind, raw):
    t = tmp_path_factory.mktemp("fuzz")
    try:
        _feed(kind, t, raw)
    except KbError as err:
        assert "\n" not in str(err)
