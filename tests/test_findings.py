"""The answers of a study repeated over seeds (kb.findings): seed means, their question-bootstrap
intervals, head-to-head verdicts and the refusal-transfer gap, on hand-made per-question files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kb import bootstrap, findings

N = 200


def _run(res, model, row, test_set, outcomes, abstain=None, ap=None):
    """One evaluation on disk as the loaders read it: a summary and its per-question records."""
    d = res / model / "eval" / row
    d.mkdir(parents=True, exist_ok=True)
    recs = [{"id": f"q{i:03d}", "group": "g", "question": "Q?", "gold": "x", "aliases": [], "reply": "r",
             "continued": False, "rtuning_verdict": None, "outcome": o, "outcome_broad": o, "answer": "r",
             "answer_conf": 0.5, "ap_correct": o == "correct", "method": row, "test_set": test_set, "template": "t",
             "should_abstain": bool(abstain[i]) if abstain is not None else False}
            for i, o in enumerate(outcomes)]
    (d / f"{test_set}_t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"Pc": 0.0, "row": row, "model": model, "test_set": test_set, "template": "t", "n": len(recs), "AP": ap,
               "records": f"{test_set}_t.jsonl"}
    (d / f"{test_set}_t.json").write_text(json.dumps(summary))


def _outcomes(correct, wrong, refused):
    out = ["correct"] * correct + ["incorrect"] * wrong + ["refused"] * refused
    assert len(out) == N
    return out


@pytest.fixture
def study_dir(tmp_path):
    res = tmp_path / "results"
    t = "ParaRel_ID_test"
    # M0: 60 right, 140 wrong. The threshold refuses 70 of the wrong answers and 10 right ones.
    _run(res, "m", "initial", t, _outcomes(60, 140, 0))
    _run(res, "m", "threshold", t, ["correct"] * 50 + ["refused"] * 10 + ["incorrect"] * 70 + ["refused"] * 70)
    # R-Tuning, 3 seeds: keeps every right answer and refuses 100 / 110 / 120 of the wrong ones.
    for seed, k in enumerate((100, 110, 120)):
        _run(res, "m", f"rtuning_unsure_seed{seed}", t, ["correct"] * 60 + ["refused"] * k + ["incorrect"] * (140 - k),
             ap=50.0 + seed)
    # CRaFT and Cor-RAIT identical: no difference.
    for seed in range(3):
        same = ["correct"] * 55 + ["refused"] * 5 + ["refused"] * 40 + ["incorrect"] * 100
        _run(res, "m", f"craft_seed{seed}", t, same)
        _run(res, "m", f"cor_rait_seed{seed}", t, same)
    # Abstention set: 100 should be refused (first half). M0 REFUSE refuses 20 of each half; the tuned model
    # refuses 80 of the unanswerable and 10 of the answerable ones.
    mask = [True] * 100 + [False] * 100
    a = "SelfAware_test"
    _run(res, "m", "initial", a, ["incorrect"] * N, abstain=mask)
    _run(res, "m", "initial_refuse", a, (["refused"] * 20 + ["incorrect"] * 80) * 2, abstain=mask)
    for seed in range(3):
        _run(res, "m", f"rtuning_unsure_seed{seed}", a,
             ["refused"] * 80 + ["incorrect"] * 20 + ["refused"] * 10 + ["incorrect"] * 90, abstain=mask)
    return res


def _ths(pc2, w2, pc1=30.0, w1=70.0):
    return (pc2 * w1 - w2 * pc1) / w1


def test_seed_mean_ths_and_its_spread(study_dir):
    out = findings.study(study_dir, ["m"], ["ParaRel_ID_test"])
    row = next(r for r in out["methods"] if r["method"] == "rtuning_unsure")
    per_seed = [_ths(30, (140 - k) / 2) for k in (100, 110, 120)]
    assert row["seeds"] == 3 and row["n"] == N
    assert row["THS per seed"] == pytest.approx(per_seed, abs=1e-3)
    assert row["THS"]["value"] == pytest.approx(np.mean(per_seed), abs=1e-3)
    lo, hi = row["THS"]["ci"]
    assert lo < row["THS"]["value"] < hi
    assert row["AP"] == pytest.approx(51.0)  # mean of the seeds' AP
    assert row["Pr"] == pytest.approx(55.0)  # (100 + 110 + 120) / 3 / 200


def test_verdicts_need_an_interval_that_excludes_zero(study_dir):
    out = findings.study(study_dir, ["m"], ["ParaRel_ID_test"])
    by = {(r["a"], r["b"]): r for r in out["comparisons"]}
    rt = by[("rtuning_unsure", "threshold")]
    threshold_ths = _ths(25, 35)
    expected = np.mean([_ths(30, (140 - k) / 2) for k in (100, 110, 120)]) - threshold_ths
    assert rt["ΔTHS"]["value"] == pytest.approx(expected, abs=1e-3)
    assert rt["ΔTHS"]["ci"][0] > 0 and rt["verdict"] == "rtuning_unsure better"
    assert rt["per seed"] == pytest.approx([_ths(30, (140 - k) / 2) - threshold_ths for k in (100, 110, 120)], abs=1e-3)
    same = by[("craft", "cor_rait")]
    assert same["ΔTHS"]["value"] == 0 and same["verdict"] == "not distinguishable"


def test_seed_mean_statistic_is_the_mean_of_per_seed_statistics():
    rng = np.random.default_rng(1)
    cols = [rng.integers(0, 4, size=50).astype(np.int8) for _ in range(4)]
    got = findings.mean_ths(*[c[None] for c in cols])[0]
    want = np.mean([bootstrap.ths_stat(c[None], cols[-1][None])[0] for c in cols[:-1]])
    assert got == pytest.approx(want)


def test_refusal_transfer_gap(study_dir):
    out = findings.study(study_dir, ["m"], ["ParaRel_ID_test"])
    rows = {r["method"]: r for r in out["transfer"]}
    assert rows["initial_refuse"]["gap"]["value"] == pytest.approx(0.0) and rows["initial_refuse"]["verdict"] == "reference"
    tuned = rows["rtuning_unsure"]
    assert tuned["Pr should-abstain"] == pytest.approx(80.0) and tuned["Pr should-answer"] == pytest.approx(10.0)
    assert tuned["gap"]["value"] == pytest.approx(70.0) and tuned["Δgap vs M0"]["value"] == pytest.approx(70.0)
    assert tuned["Δgap vs M0"]["ci"][0] > 0 and tuned["verdict"] == "more selective than M0"


def test_answers_open_the_study_and_compare_models(study_dir, tmp_path):
    # A second model whose R-Tuning does not beat the threshold: the answers must say the models differ.
    t = "ParaRel_ID_test"
    _run(study_dir, "n", "initial", t, _outcomes(60, 140, 0))
    _run(study_dir, "n", "threshold", t, ["correct"] * 50 + ["refused"] * 10 + ["incorrect"] * 70 + ["refused"] * 70)
    for seed in range(3):
        _run(study_dir, "n", f"rtuning_unsure_seed{seed}", t, _outcomes(60, 140, 0))
    text = findings.study_markdown(study_dir, ["m", "n"], [t])
    head = text.split("### Methods")[0]
    for q in ("1. Does R-Tuning beat", "2. Does CRaFT beat Cor-RAIT", "3. Does the refusal transfer",
              "4. Is the answer the same"):
        assert q in head
    assert "**rtuning_unsure better**" in head and "**threshold better**" in head
    assert "Different: Q1 rtuning_unsure − threshold, ParaRel_ID_test" in head
    assert findings.has_seeds(study_dir, ["m"])


def test_split_method():
    assert findings.split_method("craft_wo_cer_seed12") == ("craft_wo_cer", 12)
    assert findings.split_method("initial_refuse") == ("initial_refuse", None)


def test_report_opens_with_the_answers(study_dir, tmp_path):
    from kb.report import build_report, render_md

    rep = build_report(tmp_path / "training_data", study_dir, ["m"], tmp_path / "out")
    md = render_md(rep)
    assert md.index("## The answers") < md.index("## Cross-model summary")
    assert "**1. Does R-Tuning beat the confidence-threshold baseline?**" in md
    assert (tmp_path / "out" / "report_files" / "answers_forest.png").is_file()
