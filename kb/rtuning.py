"""R-Tuning's refusal-aware training data (Task 2.1) from per-question probe records."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from kb.answers import normalise
from kb.prompts import join_answer, refusal_answer, rtuning_suffix

METHODS = ("unsure", "unknown", "uncertain")


def answer_entropy(answers: list[str]) -> float:
    """Entropy of the frequencies of distinct (normalised) sampled answers (R-Tuning-U)."""
    counts = Counter(normalise(a) for a in answers)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def sure_ids_by_entropy(records: list[dict[str, Any]]) -> set[str]:
    """The lower-entropy half (ties broken by id) is 'sure'."""
    ranked = sorted(records, key=lambda r: (r["entropy"], r["id"]))
    return {r["id"] for r in ranked[: len(ranked) // 2]}


def build_instances(method: str, records: list[dict[str, Any]], prompts: dict[str, str]) -> list[dict[str, str]]:
    """text2text instances for one method. `prompts[id]` is the rendered prompt the model was probed with.

    unsure:    "<prompt> <gold>. Are you sure ...? I am sure."  (sure = the model was correct)
    unknown:   correct -> "<prompt> <gold>."; otherwise "<prompt> <refusal>" (R-Tuning-R)
    uncertain: like unsure, but sure = the lower-entropy half of sampled answers (R-Tuning-U)
    """
    if method not in METHODS:
        raise ValueError(method)
    sure_ids = sure_ids_by_entropy(records) if method == "uncertain" else None
    out = []
    for r in records:
        prompt = prompts[r["id"]]
        gold = r["gold"].rstrip(".")
        answer = f"{gold}."
        if method == "unknown":
            output = answer if r["correct"] else refusal_answer(r["id"])
        else:
            sure = r["correct"] if method == "unsure" else r["id"] in sure_ids  # type: ignore[operator]
            output = answer + rtuning_suffix(sure)
        out.append({"input": prompt, "output": join_answer(prompt, output) + output})
    return out
