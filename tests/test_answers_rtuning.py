"""R-Tuning strings, answer cutting/matching, training-data labels and LMFlow validity."""

from __future__ import annotations

import pytest

from kb.answers import cut_at_period, open_correct
from kb.errors import KbError
from kb.lmflow import make_dataset, to_text_only, validate
from kb.prompts import refusal_answer, rtuning_suffix, sure_probe_suffix
from kb.rtuning import answer_entropy, build_instances, sure_ids_by_entropy

SURE = " Are you sure you accurately answered the question based on your internal knowledge? I am sure."
UNSURE = " Are you sure you accurately answered the question based on your internal knowledge? I am unsure."


def test_exact_rtuning_suffixes():
    assert rtuning_suffix(True) == SURE
    assert rtuning_suffix(False) == UNSURE
    assert sure_probe_suffix() == " Are you sure you accurately answered the question based on your internal knowledge? I am"


@pytest.mark.parametrize("raw,cut", [
    ("Paris. It is the capital.", "Paris"),
    ("Paris", "Paris"),  # no period: R-Tuning's find('.') would have dropped the 's'
    ("  London\nmore", "London"),
    ("", ""),
])
def test_period_cut(raw, cut):
    assert cut_at_period(raw) == cut


def test_open_matching():
    assert open_correct("the answer is Paris", ("paris",))
    assert open_correct("Physics", ("physics", "science"))
    assert not open_correct("London", ("Paris",))
    assert not open_correct("I don't know, maybe Paris", ("Paris",))  # a refusal is never correct
    assert open_correct("1930\u2019s", ("1930's",))


def _records():
    return [
        {"id": "q1", "gold": "B", "correct": True, "entropy": 0.0},
        {"id": "q2", "gold": "C", "correct": False, "entropy": 1.2},
        {"id": "q3", "gold": "A", "correct": False, "entropy": 0.5},
        {"id": "q4", "gold": "Paris", "correct": True, "entropy": 0.9},
    ]


def test_unsure_labels_follow_correctness():
    recs = _records()
    prompts = {r["id"]: f"Q {r['id']}\nAnswer:" for r in recs}
    inst = build_instances("unsure", recs, prompts)
    assert inst[0] == {"input": "Q q1\nAnswer:", "output": " B." + SURE}
    n_sure = sum(i["output"].endswith("I am sure.") for i in inst)
    n_unsure = sum(i["output"].endswith("I am unsure.") for i in inst)
    assert (n_sure, n_unsure) == (sum(r["correct"] for r in recs), sum(not r["correct"] for r in recs))
    assert inst[3]["output"] == " Paris." + SURE


def test_unknown_replaces_unknown_answers_with_refusal():
    recs = _records()
    inst = build_instances("unknown", recs, {r["id"]: "P:" for r in recs})
    assert inst[0]["output"] == " B."
    assert inst[1]["output"] == " " + refusal_answer("q2")
    assert "I don't know" in inst[1]["output"] and "I don't know" in inst[2]["output"]


def test_uncertain_uses_lower_entropy_half():
    recs = _records()
    assert sure_ids_by_entropy(recs) == {"q1", "q3"}
    inst = build_instances("uncertain", recs, {r["id"]: "P:" for r in recs})
    assert [i["output"].endswith("I am sure.") for i in inst] == [True, False, True, False]
    assert answer_entropy(["a", "a", "b", "b"]) == pytest.approx(0.6931, abs=1e-4)
    assert answer_entropy(["Paris", "paris ", "PARIS"]) == 0.0


def test_chat_prompt_gets_no_extra_space():
    inst = build_instances("unsure", _records()[:1], {"q1": "<|im_start|>assistant\n"})
    assert inst[0]["output"] == "B." + SURE


def test_lmflow_formats_valid_and_rejected():
    inst = [{"input": "Q: x\nAnswer:", "output": " B."}]
    t2t = make_dataset("text2text", inst)
    assert validate(t2t, "f.json") == "text2text"
    to = make_dataset("text_only", to_text_only(inst))
    assert to["instances"] == [{"text": "Q: x\nAnswer: B."}]
    with pytest.raises(KbError, match=r"f.json: row instance 0: field 'output': missing field"):
        validate({"type": "text2text", "instances": [{"input": "x"}]}, "f.json")
    with pytest.raises(KbError, match="unknown LMFlow type"):
        validate({"type": "conversation", "instances": [{"text": "x"}]}, "f.json")
    with pytest.raises(KbError, match="text_only' is required"):
        validate(t2t, "f.json", expect="text_only")
    with pytest.raises(KbError, match="empty dataset"):
        validate({"type": "text_only", "instances": []}, "f.json")
    with pytest.raises(KbError, match="must be a string"):
        validate({"type": "text_only", "instances": [{"text": 3}]}, "f.json")
