"""report.py on small synthetic results trees: every section present, numbers equal to the inputs,
missing stages reported as missing; and ECE on a hand-computed case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import report
from kb.calibration import ece, reliability_bins
from kb.errors import KbError
from kb.report import build_report


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _mcq(i: int, subject: str, correct: bool, conf: float) -> dict:
    return {"id": f"mmlu/{subject}/{i}", "group": subject, "question": f"q{i}", "choices": ["a", "b", "c", "d"],
            "gold": "A", "letter_probs": [conf, (1 - conf) / 3, (1 - conf) / 3, (1 - conf) / 3],
            "pred": "A" if correct else "B", "correct": correct, "answer_conf": conf}


def probe_only_tree(root: Path, model: str = "m1") -> None:
    """MMLU: astronomy 3/4 right, virology 1/4 right; ParaRel: P17 2/2, P36 0/2."""
    recs = [_mcq(i, "astronomy", i < 3, 0.9) for i in range(4)] + [_mcq(i, "virology", i == 4, 0.3) for i in range(4, 8)]
    _jsonl(root / "training_data" / model / "probe_MMLU_ID_train_5shot.jsonl", recs)
    open_recs = [{"id": f"pararel/{i}", "group": rel, "question": f"q{i}", "gold": "x", "aliases": [],
                  "generation": "x." if ok else "y.", "answer": "x" if ok else "y", "correct": ok, "answer_conf": 0.8 if ok else 0.2}
                 for i, (rel, ok) in enumerate([("P17", True), ("P17", True), ("P36", False), ("P36", False)])]
    _jsonl(root / "training_data" / model / "probe_ParaRel_ID_train.jsonl", open_recs)


def full_tree(root: Path, model: str = "m1") -> None:
    probe_only_tree(root, model)
    td, rd = root / "training_data" / model, root / "results" / model
    ids = [f"mmlu/astronomy/{i}" for i in range(4)] + [f"mmlu/virology/{i}" for i in range(4, 8)]
    state = [{"id": q, "kind": "mcq", "group": q.split("/")[1], "question": "q", "gold": "A", "cor": 0.1 * k,
              "cer": -1.0 + 0.1 * k, "choices": ["a", "b", "c", "d"], "letter_probs": [0.25] * 4, "pred": "A",
              "cer_entropy": -1.0 + 0.1 * k, "cer_agree": 0.25} for k, q in enumerate(ids)]
    _jsonl(td / "state_MMLU_ID_train.jsonl", state)
    meta = {"stage": "state", "question_ids": ids, "model": {"fingerprint": "fp0"}}
    (td / "state_MMLU_ID_train.meta.json").write_text(json.dumps(meta))
    # representations: idk question 0 is a twin of vanilla question 5 (cos 1), idk question 1 has no twin
    reps = np.zeros((8, 8), dtype=np.float16)
    for k in range(8):
        reps[k, k] = 1.0
    reps[0] = reps[5]
    np.save(td / "state_MMLU_ID_train.reps.npy", reps)
    (td / "state_MMLU_ID_train.reps.json").write_text(json.dumps({"ids": ids, "model_fingerprint": "fp0"}))
    flow = []
    for k, s in enumerate(state):
        d = 0.05 if k % 2 else -0.05
        flow.append({"id": s["id"], "cor0": s["cor"], "cer0": s["cer"], "cor1": s["cor"] + d, "cer1": s["cer"] + 0.01,
                     "d_mu": d, "d_sigma": (s["cer"] + 0.01) - s["cer"]})
    _jsonl(td / "flow_MMLU_ID_train.jsonl", flow)
    (td / "flow_MMLU_ID_train.meta.json").write_text(json.dumps({"stage": "flow"}))
    sets = {"craft": (ids[5:], ids[:2]), "cor_rait": (ids[6:], ids[:1])}  # CRSS: craft 1/2 (0 twins 5), cor_rait 0/1
    for method, (van, idk) in sets.items():
        order = [(i, "van") for i in van] + [(i, "idk") for i in idk]
        (td / f"rait_{method}_MMLU_ID_train_text2text.json").write_text(json.dumps({
            "type": "text2text", "instances": [{"input": "q", "output": "A."}] * len(order),
            "kb_meta": {"method": method, "instance_ids": [i for i, _ in order], "instance_labels": [x for _, x in order],
                        "crss_tau_sim": 0.97, "params": {"tau_mu": 0.5}}}), encoding="utf-8")
    # evaluate.py's records. initial (BASIC): 4 correct, 4 wrong, 2 fail-parse -> Pc1 = Pw1 = 40.
    # craft: 5 correct, 2 wrong, 3 refused (one of which had the right argmax letter: ap_correct).
    def ev(method: str, i: int, outcome: str, sure: float, conf: float, ap_ok: bool) -> dict:
        return {"id": f"arc/{i}", "group": "science", "question": "q", "gold": "A", "choices": ["a", "b", "c", "d"],
                "reply": "A", "continued": False, "rtuning_verdict": None, "outcome": outcome, "outcome_broad": outcome,
                "letter_probs": [conf, 1 - conf, 0.0, 0.0], "pred": "A" if ap_ok else "B", "answer_conf": conf,
                "ap_correct": ap_ok, "sure_prob": sure, "method": method, "test_set": "MMLU_val", "template": "mcq_refuse",
                "should_abstain": False}
    init = [ev("initial", i, o, 0.5, c, o == "correct")
            for i, (o, c) in enumerate([("correct", 0.9)] * 4 + [("incorrect", 0.4)] * 4 + [("fail_parse", 0.3)] * 2)]
    craft = [ev("craft", i, o, s, 0.7, o == "correct" or i == 7)
             for i, (o, s) in enumerate([("correct", 0.95)] * 5 + [("incorrect", 0.1)] * 2 + [("refused", 0.05)] * 3)]
    _jsonl(rd / "eval" / "initial" / "MMLU_val_mcq_basic.jsonl", init)
    _jsonl(rd / "eval" / "craft" / "MMLU_val_mcq_refuse.jsonl", craft)


def _row(md: str, method: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[1] == method:  # the method table (test set, method, n, ..., CRSS)
            return cells
    raise AssertionError(f"no table row for {method}")


def test_full_report_every_section_and_numbers(tmp_path: Path) -> None:
    full_tree(tmp_path)
    report.main(["--output-dir", str(tmp_path / "training_data"), "--results-dir", str(tmp_path / "results")])
    md = (tmp_path / "results" / "report.md").read_text()
    html = (tmp_path / "results" / "report.html").read_text()
    for title in ("Cross-model summary", "1. Knowledge boundary", "2. Knowledge state", "3. Calibration", "4. Methods"):
        assert title in md and title in html
    # probe accuracy recomputed from records: MMLU 4/8, ParaRel 2/4
    assert "50.0 (n=8)" in md and "50.0 (n=4)" in md
    assert "best known astronomy (75%), least known virology (25%)" in md
    assert "best known P17 (100%), least known P36 (0%)" in md
    # method table: initial Pc=Pw=40, P_fail=20; craft Pc=50 Pw=20 Pr=30; THS counts P_fail as wrong:
    # W1 = 60, so THS = (50*60 - 20*40)/60 = 36.67; rate cells carry their bootstrap interval after the value
    first = [c.split(" [")[0] for c in _row(md, "initial")[2:8]]
    assert first == ["10", "40.0", "40.0", "0.0", "20.00", "0.0"]
    assert _row(md, "initial")[3].startswith("40.0 [") and "[" not in _row(md, "initial")[7]  # no THS interval for itself
    craft = _row(md, "craft")
    assert [c.split(" [")[0] for c in craft[2:8]] == ["10", "50.0", "20.0", "30.0", "0.00", "36.7"]
    lo, hi = map(float, craft[7].split("[")[1].rstrip("]").split(", "))
    assert lo < 36.7 < hi
    assert craft[9] == "0.50"  # CRSS recomputed from the representations: 1 of 2 idk questions has a vanilla twin
    assert "| MMLU ID train | cor_rait | 2 | 1 | 0.00 |" in md and "| MMLU ID train | craft | 3 | 2 | 0.50 |" in md
    assert "craft on MMLU_val: 36.7" in md  # best THS in the cross-model table
    # AP of craft (sklearn): 5 of 6 right answers ranked first (precision 1), the 6th tied with 2 wrong at the
    # bottom (precision 6/10): 5/6 * 1 + 1/6 * 0.6 = 0.9333
    assert craft[8].split(" [")[0] == "93.3"
    assert "| m1: craft on MMLU_val | 10 |" in md  # sure-probability ECE row
    # flow summary: 4 fall, 4 rise
    assert "Cor falls for 4, stays for 0, rises for 4 of 8" in md
    assert "CRaFT kept 3 as vanilla, relabelled 2 \"I don't know\", dropped 3 of 8" in md
    assert "missing" not in md.split("## 3.")[0]  # nothing before calibration is missing
    # figures exist, are inlined in the HTML, and the HTML needs no other file
    figs = sorted(p.name for p in (tmp_path / "results" / "report_files").glob("*.png"))
    assert {"state_map.png", "flow.png", "ths_plane.png", "reliability_sure.png"} <= set(figs)
    assert html.count("data:image/png;base64,") == len(figs)
    assert not re.search(r"src=['\"](?!data:)", html)


def test_ece_in_report_matches_calibration(tmp_path: Path) -> None:
    full_tree(tmp_path)
    rep = build_report(tmp_path / "training_data", tmp_path / "results")
    rows = [b for k, b in rep.blocks if k == "table" and b[0][-1] == "ECE"]
    mmlu = next(r for t in rows for r in t[1] if r[1].startswith("MMLU"))
    # astronomy conf .9, 3/4 right; virology conf .3, 1/4 right -> ECE = .5*.15 + .5*.05 = .10
    assert mmlu[-1] == "0.10"


def test_missing_stages_reported_not_crashed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe_only_tree(tmp_path)
    report.main(["--output-dir", str(tmp_path / "training_data"), "--results-dir", str(tmp_path / "results")])
    md = (tmp_path / "results" / "report.md").read_text()
    for script in ("query_state.py", "rehearsal_finetune.py", "evaluate.py", "build_rait.py"):
        assert f"run `python {script}" in md
    assert "**missing:**" in md and "missing:" in capsys.readouterr().out
    assert (tmp_path / "results" / "report.html").read_text().count("class='missing'") >= 4


def test_two_models_side_by_side(tmp_path: Path) -> None:
    full_tree(tmp_path, "m1")
    probe_only_tree(tmp_path, "m2")
    rep = build_report(tmp_path / "training_data", tmp_path / "results", ["m1", "m2"])
    summary = next(b for k, b in rep.blocks if k == "table")
    assert [r[0] for r in summary[1]] == ["m1", "m2"]
    assert summary[1][1][-1] == "missing"  # m2 has no eval yet
    assert any("m2: no knowledge-state file" in m for m in rep.missing)


def test_bad_input_is_one_line_error(tmp_path: Path) -> None:
    probe_only_tree(tmp_path)
    with pytest.raises(KbError, match="no files for model"):
        build_report(tmp_path / "training_data", tmp_path / "results", ["nope"])
    with pytest.raises(SystemExit):
        report.main(["--output-dir", str(tmp_path / "x"), "--results-dir", str(tmp_path / "y")])


def test_ece_hand_computed() -> None:
    # 10 bins. conf .15,.15 (bin 1, acc 1/2, mean .15); .95 (bin 9, acc 0); 1.0 (bin 9); 0.0 (bin 0, acc 0)
    conf = [0.15, 0.15, 0.95, 1.0, 0.0]
    correct = [1, 0, 0, 1, 0]
    # bin0: n1 |0-0|=0; bin1: n2 |.5-.15|=.35; bin9: n2 mean .975 acc .5 -> .475
    expected = (2 * 0.35 + 2 * 0.475) / 5
    assert ece(conf, correct) == pytest.approx(expected)
    bins = reliability_bins(conf, correct)
    assert [b.count for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[2].accuracy is None
    # edges are right-closed: 0.2 lands in bin 1, not bin 2
    assert reliability_bins([0.2], [1])[1].count == 1
    assert ece([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0)
    with pytest.raises(KbError):
        ece([1.2], [1])
    with pytest.raises(KbError):
        ece([], [])


def test_unreadable_stage_file_is_reported(tmp_path: Path) -> None:
    """An interrupted query (state records without their meta) is named in the report, not raised."""
    probe_only_tree(tmp_path)
    _jsonl(tmp_path / "training_data" / "m1" / "state_MMLU_ID_train.jsonl", [{"id": "x", "cor": 0.5}])
    rep = build_report(tmp_path / "training_data", tmp_path / "results")
    assert any("unreadable stage file" in m and "state_MMLU_ID_train.jsonl" in m for m in rep.missing)


def test_ths_of_a_subset_evaluation_uses_the_initial_model_on_the_same_questions(tmp_path: Path) -> None:
    """A method evaluated on fewer questions (a smaller --limit) is compared with the initial model on those."""
    full_tree(tmp_path)
    rd = tmp_path / "results" / "m1" / "eval"
    init = [json.loads(x) for x in (rd / "initial" / "MMLU_val_mcq_basic.jsonl").read_text().splitlines()]
    # 'van' saw questions 0-1 (initial: correct) and 4-7 (initial: wrong): Pc1 = 33.33, Pw1 = 66.67 there.
    outcomes = ["correct", "correct", "correct", "incorrect", "refused", "refused"]
    van = [{**r, "method": "van", "outcome": o, "outcome_broad": o} for r, o in zip(init[:2] + init[4:8], outcomes)]
    _jsonl(rd / "van" / "MMLU_val_mcq_refuse.jsonl", van)
    report.main(["--output-dir", str(tmp_path / "training_data"), "--results-dir", str(tmp_path / "results")])
    row = _row((tmp_path / "results" / "report.md").read_text(), "van")
    # Pc 50, Pw 16.67: THS = (50 * 66.67 - 16.67 * 33.33) / 66.67 = 41.67 (against all 10 questions: 33.33)
    assert row[2] == "6" and row[3].startswith("50.0 [") and row[7].startswith("41.7 [")


@pytest.mark.parametrize("field, value, message", [
    ("outcome", "wrong", "must be one of correct, incorrect, refused, fail_parse, got 'wrong'"),  # an alias no stage writes
    ("method", None, "must be a string, got null"),
    ("sure_prob", 2.0, "must lie in [0, 1], got 2.0"),
])
def test_bad_evaluation_record_is_one_line_naming_file_row_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 field: str, value: object, message: str) -> None:
    full_tree(tmp_path)
    path = tmp_path / "results" / "m1" / "eval" / "craft" / "MMLU_val_mcq_refuse.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[3][field] = value
    _jsonl(path, recs)
    with pytest.raises(SystemExit) as exit_:
        report.main(["--output-dir", str(tmp_path / "training_data"), "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == f"error: {path}: row 4: field '{field}': {message}"


def test_bad_probe_record_is_one_line(tmp_path: Path) -> None:
    probe_only_tree(tmp_path)
    path = tmp_path / "training_data" / "m1" / "probe_ParaRel_ID_train.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    del recs[1]["correct"]
    _jsonl(path, recs)
    with pytest.raises(KbError, match=r"probe_ParaRel_ID_train.jsonl: row 2: field 'correct': missing field$"):
        build_report(tmp_path / "training_data", tmp_path / "results")
