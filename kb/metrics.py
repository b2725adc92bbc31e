"""Evaluation metrics (docs/method.md sections 3.5, 3.7 and 8): answer-type rates, THS, R-Tuning's AP, chance.

All rates are percentages of the questions (Pc + Pw + Pr + P_fail = 100), so THS comes out in
percentage points like the paper's tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LABELS = ("correct", "incorrect", "refused", "fail_parse")
RATE_KEYS = {"correct": "Pc", "incorrect": "Pw", "refused": "Pr", "fail_parse": "P_fail"}


def rates(labels: Sequence[str]) -> dict[str, float]:
    """{'Pc', 'Pw', 'Pr', 'P_fail'} in percent of len(labels); unknown labels are a bug, not a category."""
    n = len(labels)
    if n == 0:
        raise ValueError("no answers to rate")
    bad = set(labels) - set(LABELS)
    if bad:
        raise ValueError(f"unknown answer labels {sorted(bad)}")
    return {RATE_KEYS[k]: 100.0 * sum(1 for x in labels if x == k) / n for k in LABELS}


def ths(pc2: float, pw2: float, pc1: float, pw1: float) -> float | None:
    """Truthful helpfulness score of E2 = (Pc2, Pw2) against the initial model E1 = (Pc1, Pw1).

    THS = (Pc2 * Pw1 - Pw2 * Pc1) / Pw1: 0 for the initial model, 100 for a perfect one (Pc2 = 100),
    negative when E2's correct-to-wrong ratio is worse than E1's. Undefined (None) when Pw1 = 0.
    """
    if pw1 == 0:
        return None
    return (pc2 * pw1 - pw2 * pc1) / pw1


NEAR_CHANCE_MARGIN = 0.05  # MCQ accuracy less than 5 points above chance: the boundary is mostly letter bias


def chance_accuracy(n_choices: Sequence[int]) -> float:
    """Expected accuracy of uniform guessing: the mean of 1 / number of choices over the questions."""
    if not n_choices:
        raise ValueError("no questions")
    return sum(1 / n for n in n_choices) / len(n_choices)


def near_chance_note(accuracy: float, chance: float) -> str | None:
    """The near-chance warning (docs/method.md section 3.7), the one rule and wording every output uses;
    None when the accuracy (a fraction) is at least 5 points above chance."""
    if accuracy >= chance + NEAR_CHANCE_MARGIN:
        return None
    return (f"accuracy {accuracy:.1%} is less than 5 points above chance ({chance:.0%}): the multiple-choice "
            "knowledge boundary is mostly letter bias, not knowledge; ParaRel's is more meaningful")


def confidence_score(answer_conf: float, sure_prob: float) -> float:
    """R-Tuning's ranking score: the mean of answer confidence and p(sure)."""
    return 0.5 * answer_conf + 0.5 * sure_prob


def average_precision(correct: Sequence[bool], scores: Sequence[float]) -> float | None:
    """sklearn's average_precision_score(correct, scores), as R-Tuning reports it (in [0, 1]).

    None when no answer is correct: precision is then undefined and sklearn would return a
    meaningless 0 with a warning.
    """
    if len(correct) != len(scores):
        raise ValueError("correct and scores differ in length")
    if not any(correct):
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score([int(bool(c)) for c in correct], list(scores)))


def sure_probability(logp_sure: float, logp_unsure: float) -> float:
    """p(sure) / (p(sure) + p(unsure)) from the two continuations' log-probabilities (stable form)."""
    import math

    m = max(logp_sure, logp_unsure)
    a, b = math.exp(logp_sure - m), math.exp(logp_unsure - m)
    return a / (a + b)


def summarise_labels(labels: Sequence[str]) -> dict[str, Any]:
    """Rates (rounded for the JSON) and raw counts."""
    r = rates(labels)
    return {**{k: round(v, 4) for k, v in r.items()}, "counts": {k: sum(1 for x in labels if x == k) for k in LABELS}}
