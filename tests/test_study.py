"""The study's statistics and baselines: bootstrap intervals, THS with P_fail as wrong, the threshold baseline,
base-model prompts, and the open-answer chain (state -> rehearsal/flow -> RAIT -> fine-tune -> evaluate)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from kb import bootstrap, metrics
from kb.data import load_split, registry
from kb.prompts import PromptFormat, base_shots, render_text
from kb.threshold import choose_threshold, run_threshold


def test_bootstrap_interval_of_a_proportion_matches_the_normal_interval():
    n, k = 400, 120  # p = 0.3: the normal interval is 30 +- 4.49 points
    outcomes = ["correct"] * k + ["incorrect"] * (n - k)
    lo, hi = bootstrap.rate_intervals(outcomes)["Pc"]
    half = 100 * 1.96 * math.sqrt(0.3 * 0.7 / n)
    assert lo == pytest.approx(30 - half, abs=1.0) and hi == pytest.approx(30 + half, abs=1.0)
    assert bootstrap.rate_intervals(outcomes) == bootstrap.rate_intervals(outcomes)  # seeded


def test_paired_difference_on_a_hand_made_case():
    # 100 questions; method a fixes 10 of b's wrong answers and nothing else changes.
    b = ["correct"] * 30 + ["incorrect"] * 70
    a = ["correct"] * 40 + ["incorrect"] * 60
    d = bootstrap.difference(bootstrap.rate_of("correct"), [bootstrap.codes(a)], [bootstrap.codes(b)])
    assert d["value"] == pytest.approx(10.0)
    assert d["significant"] and 3 <= d["ci"][0] < 10 < d["ci"][1] <= 17  # ~ 10 +- 1.96 * sqrt(100 * .1 * .9)
    # Unpaired, the two 95% intervals overlap: only the pairing shows the difference.
    ia, ib = bootstrap.rate_intervals(a)["Pc"], bootstrap.rate_intervals(b)["Pc"]
    assert ia[0] < ib[1]
    # 5 fixed and 5 broken: no difference, an interval around 0.
    c = ["incorrect"] * 5 + ["correct"] * 25 + ["correct"] * 5 + ["incorrect"] * 65
    d0 = bootstrap.difference(bootstrap.rate_of("correct"), [bootstrap.codes(c)], [bootstrap.codes(b)])
    assert d0["value"] == 0 and not d0["significant"] and d0["ci"][0] < 0 < d0["ci"][1]


def test_ths_counts_unparseable_replies_as_wrong():
    method = {"Pc": 20.0, "Pw": 30.0, "Pr": 40.0, "P_fail": 10.0}
    initial = {"Pc": 25.0, "Pw": 70.0, "Pr": 0.0, "P_fail": 5.0}
    # (Pc2 * W1 - W2 * Pc1) / W1 with W = Pw + P_fail: (20 * 75 - 40 * 25) / 75
    assert metrics.ths_of_rates(method, initial) == pytest.approx(500 / 75)
    # Without P_fail the score would reward a model that stops producing parseable answers.
    assert metrics.ths(20, 30, 25, 70) != pytest.approx(500 / 75)
    # The bootstrap statistic agrees on the same questions.
    m = ["correct"] * 20 + ["incorrect"] * 30 + ["refused"] * 40 + ["fail_parse"] * 10
    i = ["correct"] * 25 + ["incorrect"] * 70 + ["fail_parse"] * 5
    value = bootstrap.ths_stat(bootstrap.codes(m)[None], bootstrap.codes(i)[None])[0]
    assert value == pytest.approx(500 / 75)
    lo, hi = bootstrap.ths_interval(m, i)
    assert lo < 500 / 75 < hi


def test_average_precision_equals_sklearn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        y, s = rng.random(n) < 0.4, np.round(rng.random(n), 1)
        if y.any():
            assert bootstrap.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def _rec(i, outcome, conf, split="train"):
    return {"id": f"x/{split}/{i}", "outcome": outcome, "outcome_broad": outcome, "answer_conf": conf}


def test_threshold_is_chosen_on_the_training_split_only(tmp_path):
    # Training questions: below 0.5 every answer is wrong, above it every answer is right -> t = 0.6.
    train = [_rec(i, "incorrect", 0.1 + 0.05 * i) for i in range(8)] + [_rec(8 + i, "correct", 0.6 + 0.05 * i) for i in range(4)]
    chosen = choose_threshold(train)
    assert chosen["t"] == pytest.approx(0.6) and chosen["train_refused"] == 8
    assert chosen["train_THS"] == pytest.approx(100 * 4 / 12, abs=1e-3)  # every wrong answer refused, every right one kept

    # Through the stage, with test records whose labels would want another t: t comes from train alone.
    res = tmp_path / "res"
    _write_initial(res, "pararel", "ID_train", train)
    test = [_rec(i, "correct" if i % 2 else "incorrect", 0.05 * i, "test") for i in range(20)]
    _write_initial(res, "pararel", "ID_test", test)
    args = argparse.Namespace(model="m", train="pararel:ID_train", test=["pararel:ID_test"], results_dir=str(res),
                              baseline=None)
    out = run_threshold(args)
    assert out["t"] == pytest.approx(0.6)
    flipped = [{**r, "outcome": "correct" if r["outcome"] == "incorrect" else "incorrect"} for r in test]
    _write_initial(res, "pararel", "ID_test", flipped)
    assert run_threshold(args)["t"] == pytest.approx(0.6)
    recs = [json.loads(x) for x in (res / "m/eval/threshold/ParaRel_ID_test_open_basic.jsonl").read_text().splitlines()]
    assert [r["outcome"] == "refused" for r in recs] == [r["answer_conf"] < 0.6 for r in flipped]
    summary = json.loads((res / "m/eval/threshold/ParaRel_ID_test_open_basic.json").read_text())
    assert summary["row"] == "threshold" and summary["THS"] is not None and summary["ci"]["THS"] is not None


def _write_initial(res, dataset, split, records):
    """An initial BASIC evaluation on disk, as evaluate.py writes it (records, meta, summary)."""
    from kb.eval_summary import write_summary
    from kb.layout import eval_paths, results_dir, test_name

    rec_path, sum_path, meta_path = eval_paths(results_dir(res, "m"), "initial", test_name(dataset, split), "open_basic")
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    full = [{"id": r["id"], "group": "g", "question": "q", "gold": "x", "aliases": [], "reply": "", "continued": False,
             "rtuning_verdict": None, "outcome": r["outcome"], "outcome_broad": r["outcome_broad"], "answer": "",
             "answer_conf": r["answer_conf"], "ap_correct": r["outcome"] == "correct", "method": "initial",
             "test_set": test_name(dataset, split), "template": "open_basic", "should_abstain": False} for r in records]
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in full))
    meta = {"run_key": {"dataset": dataset, "split": split, "prompt": {"template": "open_basic"}, "method": "initial",
                        "max_new_tokens": 16},
            "label": "m", "row": "initial", "tuned": False, "questions": {"n": len(full)}}
    meta_path.write_text(json.dumps(meta))
    write_summary(argparse.Namespace(results_dir=str(res), baseline=None), meta, full, rec_path, sum_path)


def test_base_examples_are_in_no_dataset():
    """The solved examples base models see must not leak a test (or training) question."""
    questions = {e["question"].lower() for e in registry()["base_examples"].values()}
    for name, spec in registry()["datasets"].items():
        for split in spec["splits"]:
            seen = {s.question.lower() for s in load_split(name, split)}
            assert not questions & seen, (name, split)


def test_base_model_prompt_gets_solved_examples():
    from kb.data import Sample

    s = Sample(id="q", question="Who discovered penicillin?", answer="Alexander Fleming")
    plain = render_text(s, PromptFormat("open_refuse", 0, False), [])
    chat = render_text(s, PromptFormat("open_refuse", 0, True), [])
    assert chat == registry()["prompts"]["open_refuse"]["item"].format(question=s.question)  # the paper's 0-shot
    assert plain.count("\nAnswer: ") == 4 and plain.endswith("Who discovered penicillin?\nAnswer:")
    assert "Answer: I don't know.\n\n" in plain  # REFUSE shows one refusal
    assert "I don't know" not in render_text(s, PromptFormat("open_basic", 0, False), []).replace(s.question, "")
    assert [x.answer for x in base_shots(PromptFormat("mcq_basic", 0, False))] == ["A", "B", "D"]
    assert PromptFormat("mcq_refuse", 0, False).describe()["base_shots"][2] == "mcq_unknowable"
    assert "base_shots" not in PromptFormat("mcq_refuse", 0, True).describe()


def test_evaluate_base_model_replies_stop_at_the_line(tmp_path):
    """A model without a chat template is evaluated with the solved examples and answers on one line."""
    import evaluate
    from kb.testing import save_tiny

    model = save_tiny(tmp_path / "tiny-base", chat_template=False)
    res = tmp_path / "res"
    evaluate.main(["--model", str(model), "--device", "cpu", "--results-dir", str(res), "--template", "basic",
                   "--test", "pararel:ID_test", "--test", "mmlu:ID_test", "--limit", "6", "--max-new-tokens", "12"])
    for name in ("ParaRel_ID_test_open_basic", "MMLU_ID_test_mcq_basic"):
        meta = json.loads((res / "tiny-base/eval/initial" / f"{name}.meta.json").read_text())
        assert meta["run_key"]["prompt"]["base_shots"] and meta["run_key"]["prompt"]["chat_template"] is False
        recs = [json.loads(x) for x in (res / "tiny-base/eval/initial" / f"{name}.jsonl").read_text().splitlines()]
        assert len(recs) == 6 and all("\n" not in r["reply"] for r in recs)


def _fake_pararel(root):
    """A ParaRel-shaped data folder a random model can "know": gold 'e' occurs in almost any reply,
    gold 'qqzzxq' in none, so the state has known and unknown questions."""
    folder = root / "rtuning" / "pararel"
    folder.mkdir(parents=True)
    for name, n in (("training_data.json", 16), ("ID_test_pararel.json", 8), ("OOD_test_pararel.json", 8)):
        rows = [[f"Question {name[:3]} {i} about thing {i}?", "e" if i % 2 else "qqzzxq", "P1"] for i in range(n)]
        (folder / name).write_text(json.dumps(rows))


@pytest.mark.slow
def test_open_track_chain_on_a_tiny_model(tmp_path, tiny_model_dir):
    import build_rait
    import evaluate
    import finetune
    import query_state
    import rehearsal_finetune
    import threshold_baseline

    _fake_pararel(tmp_path / "data")
    td, res = tmp_path / "td", tmp_path / "res"
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--output-dir", str(td), "--results-dir", str(res),
            "--data-root", str(tmp_path / "data")]
    query_state.main([*base, "--dataset", "pararel", "--limit", "12", "--shots", "0", "--n-samples", "3",
                      "--max-new-tokens", "6"])
    rehearsal_finetune.main([*base, "--dataset", "pararel", "--shots", "0", "--min-cor", "0.6", "--min-cer", "-1",
                             "--n-rehearsal", "4", "--recipe", "configs/rehearsal_demo_cpu.yaml",
                             "--recipe-set", "max_steps=1", "--recipe-set", "lora.layers=[1]",
                             "--tuned-dir", str(tmp_path / "rehearsed")])
    build_rait.main(["--model", str(tiny_model_dir), "--output-dir", str(td), "--results-dir", str(res),
                     "--dataset", "pararel", "--shots", "0", "--n-van", "4", "--n-idk", "4", "--tie-rule", "keep"])
    lab = "tiny-llama"
    rait = json.loads((td / lab / "rait_craft_ParaRel_ID_train_0shot_text2text.json").read_text())
    outputs = [i["output"] for i in rait["instances"]]
    assert "I don't know." in outputs and any(o != "I don't know." for o in outputs)
    tuned = tmp_path / "craft"
    finetune.main(["--model", str(tiny_model_dir), "--recipe", "configs/finetune_cpu_demo.yaml", "--set", "max_steps=1",
                   "--set", "lora.layers=[1]", "--output-dir", str(tuned), "--device", "cpu",
                   "--train-file", str(td / lab / "rait_craft_ParaRel_ID_train_0shot_text2text.json")])
    ev = [*base[:4], "--results-dir", str(res), "--data-root", str(tmp_path / "data"), "--limit", "8",
          "--max-new-tokens", "6"]
    evaluate.main([*ev, "--template", "basic", "--test", "pararel:ID_test", "--test", "pararel:ID_train"])
    threshold_baseline.main(["--model", lab, "--train", "pararel:ID_train", "--test", "pararel:ID_test",
                             "--results-dir", str(res)])
    evaluate.main(["--model", str(tuned), "--method", "craft", *ev[2:], "--test", "pararel:ID_test"])
    summary = json.loads((res / lab / "eval/craft/ParaRel_ID_test_open_refuse.json").read_text())
    assert summary["n"] == 8 and summary["THS"] is not None and summary["ci"]["Pc"] is not None
    from kb.eval_table import build_table

    table = build_table(str(res), [lab], write=False)[lab]
    assert "craft − initial" in table and "threshold" in table and " [" in table


@pytest.mark.parametrize("track", ["open", "mcq"])
def test_demo_dry_run_commands_parse(track):
    """`demo.sh --dry-run` prints every stage command; each names a stage script whose parser accepts it,
    and every training file a fine-tune reads is one an earlier command writes (by its file-name rule)."""
    import importlib
    import os
    import shlex
    import subprocess

    out = subprocess.run(["bash", "scripts/demo.sh", "--dry-run"], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRACK": track})
    cmds = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith(".venv/bin/python ")]
    assert len(cmds) > 20
    scripts = set()
    for cmd in cmds:
        script = cmd[1]
        assert os.path.isfile(script), script
        scripts.add(script)
        parser = importlib.import_module(script.removesuffix(".py")).build_parser()
        parser.parse_args(cmd[2:])  # exits (SystemExit) on a flag the stage does not take
    assert {"threshold_baseline.py", "build_rait.py", "rehearsal_finetune.py", "report.py"} <= scripts
    tests = {a for c in cmds if c[1] == "evaluate.py" for a in c if ":" in a and not a.startswith("-")}
    assert tests >= ({"pararel:ID_test", "pararel:OOD_test"} if track == "open" else {"mmlu:ID_test", "mmlu:OOD_test"})
    evaluated = [c[c.index("--method") + 1] for c in cmds if c[1] == "evaluate.py" and "--method" in c]
    assert set(evaluated) == {"rtuning_unsure", "rtuning_unknown", "van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft"}


@pytest.mark.parametrize("bad, field", [({"outcome": "maybe"}, "outcome"), ({"answer_conf": "high"}, "answer_conf"),
                                        ({"outcome_broad": None}, "outcome_broad")])
def test_threshold_rejects_a_malformed_record_in_one_line(tmp_path, capsys, bad, field):
    import threshold_baseline

    res = tmp_path / "res"
    train = [_rec(i, "correct" if i % 2 else "incorrect", 0.1 * i) for i in range(6)]
    _write_initial(res, "pararel", "ID_train", train)
    _write_initial(res, "pararel", "ID_test", [_rec(i, "correct", 0.5, "test") for i in range(4)])
    path = res / "m/eval/initial/ParaRel_ID_train_open_basic.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), **bad})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_:
        threshold_baseline.main(["--model", "m", "--train", "pararel:ID_train", "--test", "pararel:ID_test",
                                 "--results-dir", str(res)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"row 3: field '{field}'" in err
    assert not (res / "m/eval/threshold").exists()
