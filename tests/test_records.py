"""kb.records: validators derived from the record declarations, and the one THS-baseline / AP / near-chance
definitions every reader shares (kb.metrics, kb.bootstrap)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kb import bootstrap, metrics
from kb.errors import KbError
from kb.records import (
    EvalMCQRecord,
    EvalOpenRecord,
    ProbeOpenRecord,
    Unit,
    check_value,
    fields_of,
    judgement,
    validate,
)


def test_fields_are_derived_from_the_declarations() -> None:
    probe = fields_of(ProbeOpenRecord)
    assert list(probe)[:4] == ["id", "group", "question", "gold"]
    assert probe["correct"] == (bool, True) and probe["samples"] == (list[str], False)
    ev = fields_of(EvalMCQRecord)
    assert {n for n, (_, req) in ev.items() if not req} == {"sure_prob", "should_abstain", "threshold", "refused_by_threshold"}
    assert {"choices", "letter_probs", "pred", "method", "test_set", "template"} <= set(ev)
    assert "aliases" in fields_of(EvalOpenRecord) and "aliases" not in ev


@pytest.mark.parametrize("value, tp, bad", [
    (True, float, "must be a number, got bool"), (1, float, None), (0.5, Unit, None), (1.01, Unit, "must lie in [0, 1]"),
    (None, Unit | None, None), ("x", Unit | None, "must be a number or null, got 'x'"), ([True], list[bool], None),
    (["a", 1], list[str], "item 1 must be a string"), (True, bool, None), (1, bool, "must be true or false"),
])
def test_check_value(value, tp, bad) -> None:
    got = check_value(value, tp)
    assert got is None if bad is None else bad in got


def test_validate_names_file_row_and_field() -> None:
    with pytest.raises(KbError, match=r"^f.jsonl: row 7: field 'question': missing field$"):
        validate(ProbeOpenRecord, Path("f.jsonl"), 7, {"id": "a", "group": "g"})


def test_judgement_keeps_only_the_rejudged_fields() -> None:
    rec = {"id": "a", "reply": "x.", "rtuning_verdict": None, "outcome": "correct", "outcome_broad": "correct",
           "answer": "x", "answer_conf": 0.3, "method": "initial"}
    assert judgement(rec) == {k: rec[k] for k in ("id", "reply", "rtuning_verdict", "outcome", "outcome_broad", "answer")}


def test_ths_against_the_paired_baseline() -> None:
    initial = {"a": "correct", "b": "incorrect", "c": "incorrect", "d": "fail_parse"}
    assert metrics.paired_baseline(["b", "a"], initial) == ["incorrect", "correct"]
    assert metrics.paired_baseline(["a", "z"], initial) is None  # the initial run saw other questions
    assert metrics.ths_against(["correct", "refused"], None) is None
    # on a and b: Pc1 = 50, W1 = 50; the method: Pc = 50, W = 0 -> THS = (50*50 - 0*50)/50 = 50
    assert metrics.ths_against(["correct", "refused"], metrics.paired_baseline(["a", "b"], initial)) == pytest.approx(50)
    assert metrics.is_initial_row("initial") and not metrics.is_initial_row("initial_refuse")


def test_ap_with_interval_and_near_chance() -> None:
    table = metrics.QuestionTable.build(["correct", "incorrect", "correct"], rank_score=[0.9, 0.5, 0.1])
    ap, ci = bootstrap.ap_with_interval(table)
    assert ap == pytest.approx(100 * metrics.table_ap(table)) and ci == bootstrap.table_ap_interval(table)
    assert bootstrap.ap_with_interval(metrics.QuestionTable.build(["incorrect"], rank_score=[0.5])) == (None, None)
    chance, note = metrics.near_chance(0.27, [{"choices": list("abcd")}] * 3)
    assert chance == pytest.approx(0.25) and note == metrics.near_chance_note(0.27, 0.25) and note
    assert metrics.near_chance(0.5, [{"choices": list("abcd")}])[1] is None


def test_table_fills_in_ths_from_records_on_the_methods_own_questions(tmp_path: Path) -> None:
    """results_table.py's THS for a run evaluated before the initial run: as evaluate.py computes it, from the
    records, also when the method saw only part of the initial run's questions."""
    from kb.eval_table import build_table

    def put(method: str, template: str, outcomes: list[str]) -> None:
        d = tmp_path / "m" / "eval" / method
        d.mkdir(parents=True, exist_ok=True)
        recs = [{"id": f"q/{i}", "outcome": o} for i, o in enumerate(outcomes)]
        (d / f"MMLU_ID_test_{template}.jsonl").write_text("".join(json.dumps(_full(r, method, template)) + "\n" for r in recs))
        r = metrics.rates(outcomes)
        s = {"model": "m", "method": method, "row": method, "test_set": "MMLU_ID_test", "template": template, "n": len(recs),
             **r, "THS": 0.0 if method == "initial" else None, "broad": {"Pr": r["Pr"]},
             "meta": {"questions": {"n": len(recs)}}}
        (d / f"MMLU_ID_test_{template}.json").write_text(json.dumps(s))

    put("initial", "mcq_basic", ["correct", "incorrect", "incorrect", "correct"])
    put("rtuning", "mcq_refuse", ["correct", "refused", "incorrect"])  # 3 of the 4 questions, before the initial run
    text = build_table(tmp_path, extra_columns={}, write=False)["m"]
    row = next(line for line in text.splitlines() if "| rtuning |" in line)
    # baseline on q/0..2: Pc1 = 33.3, W1 = 66.7; rtuning: Pc = 33.3, W = 33.3 -> THS = (33.3*66.7 - 33.3*33.3)/66.7 = 16.7
    assert row.split("|")[10].split(" [")[0].strip() == "16.7"


def _full(r: dict, method: str, template: str) -> dict:
    return {"id": r["id"], "group": "g", "question": "q", "gold": "A", "choices": ["a", "b", "c", "d"], "reply": "A",
            "continued": False, "rtuning_verdict": None, "outcome": r["outcome"], "outcome_broad": r["outcome"],
            "letter_probs": [0.25] * 4, "pred": "A", "answer_conf": 0.25, "ap_correct": True, "method": method,
            "test_set": "MMLU_ID_test", "template": template}
