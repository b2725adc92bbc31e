"""Evaluation (kb/evaluate.py, evaluate.py, kb/eval_table.py) with the tiny random model: records and
summaries, THS against the initial BASIC run, base + adapter, resume, the fast decoder against the
engine, the results table, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from kb.engine import GreedyDecoder, continuation_logprobs, generation_stop_ids
from kb.eval_summary import row_name
from kb.evaluate import _needs_more
from kb.paths import REPO_ROOT
from kb.records import read_eval_records


def _cli() -> ModuleType:
    # Loaded by path: a top-level `import evaluate` could pick up Hugging Face's `evaluate` package.
    spec = importlib.util.spec_from_file_location("kb_evaluate_cli", REPO_ROOT / "evaluate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eval(*argv: str) -> None:
    _cli().main(list(argv))


@pytest.fixture(scope="module")
def initial_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initial model's evaluation, run once per module; tests get their own copy (initial_results)."""
    res = tmp_path_factory.mktemp("res")
    _eval("--model", str(tiny_model_dir), "--test", "mmlu:ID_test", "--test", "pararel:OOD_test", "--limit", "6",
          "--results-dir", str(res), "--max-new-tokens", "4")
    return res


@pytest.fixture
def initial_results(initial_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the initial run's results: a test that rewrites or adds files changes no other test's input."""
    import shutil

    return Path(shutil.copytree(initial_run, tmp_path / "initial_results"))


def _summary(res: Path, label: str, method: str, name: str) -> dict:
    return json.loads((res / label / "eval" / method / f"{name}.json").read_text())


def test_initial_run_writes_records_and_summaries(initial_results: Path, tiny_model_dir: Path) -> None:
    label = tiny_model_dir.name
    for name in ("MMLU_ID_test_mcq_basic", "MMLU_ID_test_mcq_refuse", "ParaRel_OOD_test_open_basic",
                 "ParaRel_OOD_test_open_refuse"):
        s = _summary(initial_results, label, "initial", name)
        assert s["n"] == 6 and s["wall_s_this_run"] >= 0
        assert s["Pc"] + s["Pw"] + s["Pr"] + s["P_fail"] == pytest.approx(100.0)
        b = s["broad"]
        assert b["Pc"] + b["Pw"] + b["Pr"] + b["P_fail"] == pytest.approx(100.0)
        path = initial_results / label / "eval" / "initial" / f"{name}.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(records) == 6 and read_eval_records(path) == records  # each an EvalMCQRecord / EvalOpenRecord
        for r in records:
            assert r["outcome"] in {"correct", "incorrect", "refused", "fail_parse"}
            assert 0.0 <= r["sure_prob"] <= 1.0
            assert r["test_set"] == s["test_set"] and r["method"] == s["row"]
        if name.startswith("MMLU"):
            assert all(abs(sum(r["letter_probs"]) - 1) < 1e-6 and r["answer_conf"] == max(r["letter_probs"]) for r in records)
    basic = _summary(initial_results, label, "initial", "MMLU_ID_test_mcq_basic")
    assert basic["row"] == "initial" and basic["baseline"]["path"] == "self"
    assert basic["THS"] in (0.0, None)  # 0 by construction (None only when the initial model never errs)
    refuse = _summary(initial_results, label, "initial", "ParaRel_OOD_test_open_refuse")
    assert refuse["row"] == "initial_refuse" and refuse["baseline"]["path"].endswith("ParaRel_OOD_test_open_basic.json")


def test_rows_are_named_for_the_table() -> None:
    assert row_name("initial", "mcq_basic", "mmlu") == "initial"
    assert row_name("initial", "mcq_refuse", "mmlu") == "initial_refuse"
    assert row_name("rtuning_unsure", "open_refuse", "pararel") == "rtuning_unsure"
    assert row_name("rtuning_unsure", "mcq_basic", "mmlu") == "rtuning_unsure_basic"
    assert row_name("initial", "mcq_harness", "mmlu") == "initial_mcq_harness"


def test_rerun_resumes_from_records(initial_results: Path, tiny_model_dir: Path) -> None:
    label = tiny_model_dir.name
    path = initial_results / label / "eval" / "initial" / "MMLU_ID_test_mcq_refuse.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # a run killed mid-write
    _eval("--model", str(tiny_model_dir), "--test", "mmlu:ID_test", "--template", "refuse", "--limit", "6",
          "--results-dir", str(initial_results), "--max-new-tokens", "4")
    again = path.read_text().splitlines()
    assert again[:3] == lines[:3] and len(again) == 6
    assert {json.loads(x)["id"] for x in again} == {json.loads(x)["id"] for x in lines}


def test_changed_settings_refuse_to_resume(initial_results: Path, tiny_model_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _eval("--model", str(tiny_model_dir), "--test", "mmlu:ID_test", "--template", "refuse", "--limit", "6",
              "--results-dir", str(initial_results), "--max-new-tokens", "5")
    assert exc.value.code == 2 and "max_new_tokens" in capsys.readouterr().err


@pytest.mark.slow  # trains a LoRA adapter first
def test_base_plus_adapter_is_filed_under_the_base(initial_results: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_finetune import tiny_recipe, write_lmflow  # tests/ is on sys.path (rootdir conftest)

    from kb.eval_table import build_table
    from kb.finetune import finetune

    adapter = finetune(write_lmflow(tmp_path / "t.json"), tiny_recipe(max_steps=4), str(tiny_model_dir), tmp_path / "rt_demo")
    label = tiny_model_dir.name
    _eval("--model", str(tiny_model_dir), "--adapter", str(adapter), "--test", "mmlu:ID_test", "--limit", "6",
          "--results-dir", str(initial_results), "--max-new-tokens", "4")
    s = _summary(initial_results, label, "rt_demo", "MMLU_ID_test_mcq_refuse")
    assert s["tuned"] and s["row"] == "rt_demo" and s["model"] == label
    assert s["meta"]["model"]["adapter"] == str(adapter)
    base = _summary(initial_results, label, "initial", "MMLU_ID_test_mcq_basic")
    assert s["baseline"]["path"].endswith("initial/MMLU_ID_test_mcq_basic.json")
    if base["Pw"] > 0:
        want = (s["Pc"] * base["Pw"] - s["Pw"] * base["Pc"]) / base["Pw"]
        assert s["THS"] == pytest.approx(want, abs=1e-3)
    # The adapter dir alone (kb_base_model.json names the base) lands in the same place.
    _eval("--model", str(adapter), "--method", "rt_demo_dir", "--test", "mmlu:ID_test", "--limit", "6",
          "--results-dir", str(initial_results), "--max-new-tokens", "4")
    s2 = _summary(initial_results, label, "rt_demo_dir", "MMLU_ID_test_mcq_refuse")
    assert (s2["Pc"], s2["Pw"], s2["Pr"]) == (s["Pc"], s["Pw"], s["Pr"])

    tables = build_table(initial_results, [label], extra_columns={"CRSS": {"rt_demo": 12.5}, "n2": lambda r: r["n"] * 2})
    row = next(line for line in tables[label].splitlines() if "| rt_demo |" in line)
    assert "| MMLU_ID_test | mcq_refuse | 6 |" in row and row.rstrip().endswith("| 12.5 | 12 |")
    assert (initial_results / label / "table_rtuning.md").is_file()


def test_results_table_fills_in_missing_ths(tmp_path: Path) -> None:
    from kb.eval_table import build_table

    def put(method: str, row: str, template: str, pc: float, pw: float, pr: float, ths: float | None) -> None:
        d = tmp_path / "m" / "eval" / method
        d.mkdir(parents=True, exist_ok=True)
        s = {"model": "m", "method": method, "row": row, "test_set": "MMLU_ID_test", "template": template, "n": 10,
             "Pc": pc, "Pw": pw, "Pr": pr, "P_fail": 100 - pc - pw - pr, "THS": ths, "AP": 50.0,
             "broad": {"Pr": pr}, "meta": {"questions": {"n": 10, "digest": "x"}}}
        (d / f"MMLU_ID_test_{template}.json").write_text(json.dumps(s))

    put("initial", "initial", "mcq_basic", 40.0, 60.0, 0.0, 0.0)
    put("rtuning", "rtuning", "mcq_refuse", 20.0, 10.0, 70.0, None)  # evaluated before the initial run existed
    text = build_table(tmp_path, extra_columns={"CRSS": {"rtuning": 3.0}})["m"]
    row = next(line for line in text.splitlines() if "| rtuning |" in line)
    assert "| 13.3 |" in row and row.rstrip().endswith("| 3.0 |")  # (20*60 - 10*40)/60


def test_needs_more_detects_a_cut_rtuning_expression() -> None:
    assert _needs_more("B. Are you sure you")
    assert _needs_more("B. Are")
    assert not _needs_more("B. Are you sure you accurately answered the question based on your internal knowledge? I am sure.")
    assert not _needs_more("B")
    assert not _needs_more("I don't know.")


def test_greedy_decoder_matches_engine(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    _check_decoder(tiny_lm, 12)


@pytest.mark.slow  # loads SmolLM2
def test_greedy_decoder_matches_engine_on_smollm2(smollm2) -> None:  # type: ignore[no-untyped-def]
    _check_decoder(smollm2, 4)


def _check_decoder(lm, n: int) -> None:  # type: ignore[no-untyped-def]
    """Same texts as kb.engine.generate, same letter probabilities as PrefixScorer, same p(sure) as a full pass."""
    import torch

    from kb.data import load_split, subset
    from kb.engine import PrefixScorer, encode, generate, letter_candidates, letter_probs, plan_batches
    from kb.prompts import PromptFormat, render, sure_probe_suffix

    tok = lm.tokenizer
    samples = subset(load_split("mmlu", "ID_test"), n, 3)
    chat = bool(getattr(tok, "chat_template", None))
    fmt = PromptFormat("mcq_refuse", 0, chat)
    prompts = [render(s, fmt, [], tok) for s in samples]
    seqs = encode(tok, prompts, chat)
    dec = GreedyDecoder(lm.model, tok.pad_token_id, set(generation_stop_ids(lm.model, tok)))
    scorer = PrefixScorer(lm.model, tok.pad_token_id)
    cands = letter_candidates(tok)
    flat = [t for c in cands for t in c]
    # one group with a shared prefix, so the cached-prefix path is exercised
    batch = plan_batches(seqs, [""] * len(seqs), 16, 1 << 16, extra_tokens=6)[0]
    assert batch.prefix_len > 0
    ss = [seqs[i] for i in batch.indices]
    toks, first, _, state = dec.decode(ss, batch.prefix_len, 6, keep_prompt=True)
    ref, _ = generate(lm.model, tok, ss, 6)
    assert [tok.decode(t, skip_special_tokens=True) for t in toks] == [r[0] for r in ref]
    lp, _ = scorer.score(ss, batch.prefix_len, flat)
    mine = letter_probs(first[:, flat], cands, [4] * len(ss))
    theirs = letter_probs(lp, cands, [4] * len(ss))
    assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), atol=1e-5)
    suffix = tok.encode("B." + sure_probe_suffix(), add_special_tokens=False)
    full = [s + suffix for s in ss]
    ids = [tok.encode(" sure", add_special_tokens=False)[0], tok.encode(" A", add_special_tokens=False)[0]]
    fast = dec.probe(state, [suffix] * len(ss), ids)
    slow = continuation_logprobs(scorer, full, batch.prefix_len, [[i] for i in ids])
    assert torch.allclose(fast.double(), torch.tensor(slow), atol=1e-4)


@pytest.mark.parametrize("argv,needle", [
    (["--test", "mmlu:nope"], "no split 'nope'"),
    (["--test", "mmlu"], "DATASET:SPLIT"),
    (["--test", "pararel:ID_test", "--template", "mcq_basic"], "multiple-choice"),
    (["--template", "fancy"], "unknown prompt template"),
    (["--method", "a/b"], "--method"),
])
def test_bad_arguments_are_one_line(argv: list[str], needle: str, tiny_model_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _eval("--model", str(tiny_model_dir), "--results-dir", str(tmp_path / "r"), "--limit", "2", *argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "r").exists()


def test_reclassify_writes_judgements_beside_the_replies(initial_results: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from kb.layout import judged_path
    from kb.report.load import load_evals

    res = initial_results
    label = tiny_model_dir.name
    path = res / label / "eval" / "initial" / "MMLU_ID_test_mcq_refuse.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[0]["reply"] = "C. I am unsure."  # as if the model had said it; no model runs below
    records[1]["reply"] = "I don't know."
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    replies = path.read_bytes()
    run_wall = _summary(res, label, "initial", "MMLU_ID_test_mcq_refuse")["wall_s_this_run"]
    _eval("--model", str(tiny_model_dir), "--test", "mmlu:ID_test", "--template", "refuse", "--limit", "6",
          "--results-dir", str(res), "--max-new-tokens", "4", "--reclassify")
    assert path.read_bytes() == replies  # the replies file is never rewritten
    assert _summary(res, label, "initial", "MMLU_ID_test_mcq_refuse")["wall_s_this_run"] == run_wall  # the run's time
    judged = [json.loads(x) for x in judged_path(path).read_text().splitlines()]
    assert [j["id"] for j in judged] == [r["id"] for r in records] and judged[1]["reply"] == "I don't know."
    assert [j["outcome"] for j in judged[:2]] == ["refused", "refused"] and judged[0]["rtuning_verdict"] == "unsure"
    # every reader sees the judgements: the records as read, the summary, the report
    assert [r["outcome"] for r in read_eval_records(path)[:2]] == ["refused", "refused"]
    s = _summary(res, label, "initial", "MMLU_ID_test_mcq_refuse")
    assert s["judgements"] == "MMLU_ID_test_mcq_refuse.judged.jsonl"
    assert s["counts"]["refused"] >= 2 and s["Pr"] == pytest.approx(100 * s["counts"]["refused"] / 6, abs=1e-3)
    ev = next(e for e in load_evals(res / label) if e.path == path)
    assert ev.outcomes()[:2] == ["refused", "refused"] and not any(e.path.name.endswith(".judged.jsonl") for e in load_evals(res / label))
    # a judgement applies to the reply it judged only: a reply replaced since (a restarted run) keeps its own verdict
    records[1]["reply"] = "B"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_eval_records(path)[1]["outcome"] == records[1]["outcome"]


def test_crss_column_follows_the_tuned_model_to_its_training_set(tmp_path):
    """results_table's CRSS: evaluated dir -> kb_finetune.json -> the RAIT file's kb_meta.crss (x100)."""
    import json

    from kb.eval_table import training_crss

    train = tmp_path / "rait_craft.json"
    train.write_text(json.dumps({"type": "text2text", "instances": [{"input": "q", "output": "a"}],
                                 "kb_meta": {"crss": 0.125}}))
    run = tmp_path / "craft"
    run.mkdir()
    (run / "kb_finetune.json").write_text(json.dumps({"train_file": str(train)}))
    assert training_crss({"meta": {"model": {"adapter": str(run)}}}) == 12.5
    (run / "kb_finetune.json").write_text(json.dumps({"train_file": str(tmp_path / "rtuning.json")}))
    assert training_crss({"meta": {"model": {"adapter": str(run)}}}) is None  # not a RAIT set / moved
    assert training_crss({"meta": {"model": {"source": str(tmp_path / "base")}}}) is None  # the initial model
