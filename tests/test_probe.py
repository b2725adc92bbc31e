"""The probe stage end to end on a tiny random model: exact scoring, resume, bad input, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kb.data import load_split, shots_for, subset
from kb.paths import REPO_ROOT
from kb.prompts import PromptFormat, render
from kb.records import read_probe_records


def run_script(script, *args, check=True):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


def probe_args(tmp_path, model, *extra):
    args = ["--model", model, "--output-dir", tmp_path / "td", "--results-dir", tmp_path / "res", "--device", "cpu", *extra]
    return [str(a) for a in args]


def reference_letter_probs(lm, prompt: str, chat: bool) -> list[float]:
    """The slow, obvious path: full prompt, batch 1, next-token softmax, letters 'A' and ' A' summed."""
    tok = lm.tokenizer
    ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
    with torch.no_grad():
        p = torch.softmax(lm.model(torch.tensor([ids])).logits[0, -1].double(), -1)
    out = []
    for letter in "ABCD":
        variants = {tuple(tok.encode(t, add_special_tokens=False)) for t in (letter, " " + letter)}
        out.append(sum(float(p[v[0]]) for v in variants if len(v) == 1))
    total = sum(out)
    return [x / total for x in out]


@pytest.mark.parametrize("shots", [0, 5])
def test_mcq_scoring_matches_one_at_a_time_reference(tmp_path, tiny_model_dir, tiny_lm, shots):
    from run_MMLU import main

    main(probe_args(tmp_path, tiny_model_dir, "--limit", 40, "--shots", shots, "--batch-size", 7, "--method", "unsure"))
    name = f"MMLU_ID_train_{shots}shot"
    path = tmp_path / "td" / "tiny-llama" / f"probe_{name}.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert read_probe_records(path) == recs  # each record is a ProbeMCQRecord (kb.records)
    samples = subset(load_split("mmlu", "ID_train"), 40, 0)
    assert [r["id"] for r in sorted(recs, key=lambda r: r["id"])] == sorted(s.id for s in samples)
    by_id = {r["id"]: r for r in recs}
    fmt = PromptFormat("mcq_harness", shots, chat=True)
    for s in samples:
        ref = reference_letter_probs(tiny_lm, render(s, fmt, shots_for("mmlu", shots, s.group), tiny_lm.tokenizer), True)
        rec = by_id[s.id]
        assert rec["pred"] == "ABCD"[max(range(4), key=lambda k: ref[k])]
        assert rec["letter_probs"] == pytest.approx(ref, abs=1e-5)
        assert rec["correct"] == (rec["pred"] == s.answer)
    # R-Tuning labels: sure exactly for the correct questions.
    data = json.loads((tmp_path / "td" / "tiny-llama" / f"rtuning_unsure_{name}.json").read_text())
    assert data["type"] == "text_only" and len(data["instances"]) == 40
    n_sure = sum(i["text"].endswith("I am sure.") for i in data["instances"])
    assert n_sure == sum(r["correct"] for r in recs)
    t2t = json.loads((tmp_path / "td" / "tiny-llama" / f"rtuning_unsure_{name}_text2text.json").read_text())
    assert t2t["type"] == "text2text" and t2t["kb_meta"]["run_key"]["prompt"]["shots"] == shots
    assert t2t["kb_meta"]["run_key"]["letter_rule"] == "summed_variants"  # chat template: 'A' and ' A' summed
    summary = json.loads((tmp_path / "res" / "tiny-llama" / f"probe_{name}.json").read_text())
    assert summary["n"] == 40 and summary["accuracy"] == pytest.approx(sum(r["correct"] for r in recs) / 40)


def harness_letter_probs(lm, prompt: str) -> list[float]:
    """lm-evaluation-harness's rule: log-likelihood of each continuation " A".." D" after the prompt
    (context and context + continuation tokenised apart, the continuation = the extra tokens), renormalised."""
    tok = lm.tokenizer
    ctx = tok(prompt)["input_ids"]
    lls = []
    for letter in "ABCD":
        whole = tok(prompt + " " + letter)["input_ids"]
        assert whole[:len(ctx)] == ctx
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([whole])).logits[0].double(), -1)
        lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    p = torch.softmax(torch.tensor(lls), 0)
    return p.tolist()


def test_raw_harness_prompt_is_scored_by_the_harness_rule(tmp_path, tiny_model_dir, tiny_lm):
    """0-shot mcq_harness without a chat template: the letter probabilities are the harness's, not summed variants."""
    from run_MMLU import main

    main(probe_args(tmp_path, tiny_model_dir, "--limit", 20, "--shots", 0, "--batch-size", 6, "--method", "unsure",
                    "--chat-template", "off"))
    name = "MMLU_ID_train_0shot"
    recs = {json.loads(x)["id"]: json.loads(x) for x in
            (tmp_path / "td" / "tiny-llama" / f"probe_{name}.jsonl").read_text().splitlines()}
    meta = json.loads((tmp_path / "td" / "tiny-llama" / f"probe_{name}.meta.json").read_text())
    assert meta["run_key"]["letter_rule"] == "harness"
    fmt = PromptFormat("mcq_harness", 0, chat=False)
    n_differ = 0
    for s in subset(load_split("mmlu", "ID_train"), 20, 0):
        prompt = render(s, fmt, [], tiny_lm.tokenizer)
        ref = harness_letter_probs(tiny_lm, prompt)
        assert recs[s.id]["letter_probs"] == pytest.approx(ref, abs=1e-5)
        assert recs[s.id]["pred"] == "ABCD"[max(range(4), key=lambda k: ref[k])]
        n_differ += max(abs(a - b) for a, b in zip(ref, reference_letter_probs(tiny_lm, prompt, False))) > 1e-3
    assert n_differ > 0  # the summed rule would give other numbers: the test can tell the two apart


def test_resume_after_interruption_gives_identical_records(tmp_path, tiny_model_dir):
    from run_ParaRel import main

    args = probe_args(tmp_path, tiny_model_dir, "--limit", 12, "--batch-size", 4, "--method", "uncertain")
    main(args)
    path = tmp_path / "td" / "tiny-llama" / "probe_ParaRel_ID_train.jsonl"
    full = path.read_text()
    lines = full.splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:17])  # killed mid-write: a torn last line
    main(args)
    assert path.read_text().splitlines() != [] and sorted(path.read_text().splitlines()) == sorted(full.splitlines())
    assert all("samples" in r and "entropy" in r for r in read_probe_records(path))  # ProbeOpenRecords, with R-Tuning-U
    # Different arguments must not mix into these records.
    with pytest.raises(SystemExit) as err:
        main(probe_args(tmp_path, tiny_model_dir, "--limit", 12, "--batch-size", 4, "--method", "uncertain", "--seed", 3))
    assert err.value.code == 2


def test_unknown_alias_is_one_line_and_writes_nothing(tmp_path):
    proc = run_script("run_MMLU.py", *probe_args(tmp_path, "smollm9-1m", "--limit", 5), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "smollm9-1m" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "td").exists() and not (tmp_path / "res").exists()


def test_missing_model_dir_and_bad_split(tmp_path):
    proc = run_script("run_ParaRel.py", *probe_args(tmp_path, tmp_path / "nowhere", "--limit", 5), check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_script("run_MMLU.py", *probe_args(tmp_path, "smollm2-135m", "--domain", "OOD", "--split", "train"), check=False)
    assert proc.returncode == 2 and "OOD has no train split" in proc.stderr
    assert not (tmp_path / "td").exists()


def test_config_precedence(tmp_path):
    from kb.config import parse_with_config
    from kb.errors import KbError
    from run_MMLU import build_parser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("shots: 0\nlimit: 30\nbatch-size: 4\n")
    args = parse_with_config(build_parser(), ["--config", str(cfg), "--limit", "10"])
    assert (args.shots, args.limit, args.batch_size, args.domain) == (0, 10, 4, "ID")
    cfg.write_text("shots: 0\nnot_a_flag: 1\n")
    with pytest.raises(KbError, match="unknown key"):
        parse_with_config(build_parser(), ["--config", str(cfg)])
    cfg.write_text("shots: 3\n")
    with pytest.raises(KbError, match="field 'shots'"):
        parse_with_config(build_parser(), ["--config", str(cfg)])


@pytest.mark.slow
def test_real_smollm2_probe_end_to_end(tmp_path):
    """The embedded default model, through the real scripts: files appear and accuracy is a number."""
    run_script("run_MMLU.py", *probe_args(tmp_path, "smollm2-135m", "--limit", 12, "--shots", 5, "--method", "unsure"))
    run_script("run_ParaRel.py", *probe_args(tmp_path, "smollm2-135m", "--limit", 12, "--method", "unknown"))
    out = tmp_path / "td" / "smollm2-135m"
    assert (out / "rtuning_unsure_MMLU_ID_train_5shot.json").exists()
    recs = [json.loads(x) for x in (out / "probe_ParaRel_ID_train.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and all(isinstance(r["answer"], str) for r in recs)
    assert any(r["answer"] for r in recs)  # through the chat template the model does answer
    summary = json.loads((tmp_path / "res" / "smollm2-135m" / "probe_ParaRel_ID_train.json").read_text())
    assert summary["meta"]["run_key"]["prompt"]["chat_template"] is True


def test_method_lists():
    from kb.errors import KbError
    from kb.probe import methods_from_arg

    assert methods_from_arg("all") == ["unsure", "unknown", "uncertain"]
    assert methods_from_arg("unknown, unsure,unknown") == ["unknown", "unsure"]
    for bad in ("sure", "unsure,maybe", ","):
        with pytest.raises(KbError, match="--method"):
            methods_from_arg(bad)
