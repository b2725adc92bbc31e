"""THS, AP and the answer-type rates of kb.metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from kb import metrics


def test_ths_initial_model_is_zero():
    assert metrics.ths(40.0, 60.0, 40.0, 60.0) == pytest.approx(0.0)


def test_ths_perfect_model_is_100():
    assert metrics.ths(100.0, 0.0, 40.0, 60.0) == pytest.approx(100.0)


def test_ths_worse_ratio_is_negative():
    # (30*60 - 60*40) / 60 = (1800 - 2400) / 60 = -10
    assert metrics.ths(30.0, 60.0, 40.0, 60.0) == pytest.approx(-10.0)


def test_ths_refusing_the_wrong_answers_helps():
    # Pc 20, Pw 10, Pr 70 against (40, 60): (20*60 - 10*40) / 60 = 800 / 60
    assert metrics.ths(20.0, 10.0, 40.0, 60.0) == pytest.approx(800 / 60)


def test_ths_undefined_without_initial_errors():
    assert metrics.ths(50.0, 10.0, 100.0, 0.0) is None


def test_ap_matches_hand_computation_and_sklearn():
    from sklearn.metrics import average_precision_score

    correct = [True, False, True, False, True]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    # precision at each correct answer: 1/1, 2/3, 3/5 -> mean 34/45
    assert metrics.average_precision(correct, scores) == pytest.approx(34 / 45)
    assert metrics.average_precision(correct, scores) == pytest.approx(average_precision_score([1, 0, 1, 0, 1], scores))


def test_ap_uses_rtuning_confidence():
    from sklearn.metrics import average_precision_score

    answer_conf = [0.9, 0.3, 0.6, 0.4, 0.8, 0.25]
    sure = [0.2, 0.9, 0.7, 0.1, 0.95, 0.5]
    correct = [1, 0, 1, 0, 1, 0]
    scores = [metrics.confidence_score(a, s) for a, s in zip(answer_conf, sure)]
    assert scores[0] == pytest.approx(0.55)
    want = average_precision_score(correct, [0.5 * a + 0.5 * s for a, s in zip(answer_conf, sure)])
    assert metrics.average_precision([bool(c) for c in correct], scores) == pytest.approx(want)


def test_ap_none_without_a_correct_answer():
    assert metrics.average_precision([False, False], [0.1, 0.9]) is None


def test_sure_probability():
    assert metrics.sure_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert metrics.sure_probability(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_rates_sum_to_100():
    labels = ["correct", "incorrect", "incorrect", "refused", "fail_parse", "correct", "correct", "refused"]
    r = metrics.rates(labels)
    assert r == {"Pc": 37.5, "Pw": 25.0, "Pr": 25.0, "P_fail": 12.5}
    assert sum(r.values()) == pytest.approx(100.0)


def test_rates_reject_unknown_labels():
    with pytest.raises(ValueError):
        metrics.rates(["correct", "maybe"])


def test_near_chance_note_is_one_rule_used_by_probe_and_state_summaries():
    from types import SimpleNamespace

    from kb import probe
    from kb.prompts import PromptFormat

    assert metrics.chance_accuracy([4, 4, 5, 5]) == pytest.approx(0.225)
    assert metrics.near_chance_note(0.2999, 0.25) is not None and metrics.near_chance_note(0.30, 0.25) is None
    recs = [{"pred": "A", "correct": i < 7, "choices": ["w", "x", "y", "z"]} for i in range(25)]  # 28%: near chance
    s = probe.summarise(recs, "mcq", "MMLU_x", SimpleNamespace(label="m"), PromptFormat("mcq_harness"), [])
    assert s["note"].startswith(metrics.near_chance_note(0.28, 0.25)) and "100% of answers are 'A'" in s["note"]
    recs = [{**r, "correct": i < 10} for i, r in enumerate(recs)]  # 40%: no note
    assert "note" not in probe.summarise(recs, "mcq", "MMLU_x", SimpleNamespace(label="m"), PromptFormat("mcq_harness"), [])
