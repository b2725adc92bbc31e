"""Evaluation metrics, each defined once: answer-type rates, THS, R-Tuning's AP, AUROC, ECE, AURC and
AbstentionBench's abstention precision / recall / F1, with `suite` applying them all to one
per-question table (QuestionTable) for evaluate.py, results_table.py and report.py.

All rates are percentages of the questions (Pc + Pw + Pr + P_fail = 100), so THS comes out in
percentage points like the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from kb.errors import KbError

T = TypeVar("T")

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


def ths_of_rates(method: dict[str, float], initial: dict[str, float]) -> float | None:
    """THS as CRaFT counts it: every reply is correct, wrong or refused, so an unparseable reply is wrong
    (Pw + P_fail) for both the method and the initial model."""
    return ths(method["Pc"], method["Pw"] + method.get("P_fail", 0.0),
               initial["Pc"], initial["Pw"] + initial.get("P_fail", 0.0))


INITIAL_ROW = "initial"  # THS's reference row: the initial model's BASIC run of the same test set (eval_summary.row_name)


def is_initial_row(row: str) -> bool:
    """Whether a table row (a record's `method`) is THS's reference. The initial model's other prompts
    ('initial_refuse', ...) are ordinary rows measured against it."""
    return row == INITIAL_ROW


def paired_baseline(ids: Sequence[str], initial: Mapping[str, T]) -> list[T] | None:
    """THS's baseline of a run: the initial run's outcome on each of the run's questions, in the run's order
    (a run on fewer questions is compared on those). None when the initial run lacks any of them: it saw
    other questions, so there is no THS rather than a guess. Used by evaluate.py, the tables and the report."""
    if any(i not in initial for i in ids):
        return None
    return [initial[i] for i in ids]


def ths_against(outcomes: Sequence[str], baseline: Sequence[str] | None) -> float | None:
    """THS of a run's outcomes against its paired baseline (paired_baseline); None without one."""
    return None if baseline is None else ths_of_rates(rates(outcomes), rates(baseline))


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


def near_chance(accuracy: float, records: Sequence[Mapping[str, Any]]) -> tuple[float, str | None]:
    """(chance accuracy, near-chance note) of multiple-choice records (each with its `choices`): the rule the
    probe, state and report summaries all apply, so they can never disagree on when to warn."""
    chance = chance_accuracy([len(r["choices"]) for r in records])
    return chance, near_chance_note(accuracy, chance)


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
    m = max(logp_sure, logp_unsure)
    a, b = math.exp(logp_sure - m), math.exp(logp_unsure - m)
    return a / (a + b)


def summarise_labels(labels: Sequence[str]) -> dict[str, Any]:
    """Rates (rounded for the JSON) and raw counts."""
    r = rates(labels)
    return {**{k: round(v, 4) for k, v in r.items()}, "counts": {k: sum(1 for x in labels if x == k) for k in LABELS}}


# ---------------------------------------------------------------- the metric suite
#
# Every metric below is a plain function of arrays, and `suite` applies them all to one per-question
# table, so evaluation, tables, report (and a bootstrap that resamples the table's rows) agree.

DEFAULT_BINS = 10  # ECE: equal-width confidence bins on [0, 1]


@dataclass(frozen=True)
class QuestionTable:
    """One row per evaluated question, as arrays of equal length.

    outcome: correct / incorrect / refused / fail_parse (LABELS). confidence: the answer's confidence
    in [0, 1] (NaN when not recorded). should_abstain: the question is unanswerable or has a false
    premise (the positive class of the abstention metrics). graded: the question has a gold answer, so
    correct / incorrect are meaningful (an answer to a question without one counts as incorrect).
    rank_score and answer_correct: R-Tuning's AP inputs (0.5·answer_conf + 0.5·p(sure), NaN when
    absent; whether the answer is right whatever the reply's verdict).
    """

    question: np.ndarray
    outcome: np.ndarray
    confidence: np.ndarray
    should_abstain: np.ndarray
    graded: np.ndarray
    rank_score: np.ndarray
    answer_correct: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.question)
        for f in fields(self):
            if len(getattr(self, f.name)) != n:
                raise ValueError(f"question table: column {f.name} has {len(getattr(self, f.name))} rows, not {n}")
        bad = set(self.outcome.tolist()) - set(LABELS)
        if bad:
            raise ValueError(f"unknown answer labels {sorted(bad)}")

    def __len__(self) -> int:
        return len(self.question)

    def take(self, idx: Sequence[int] | np.ndarray) -> QuestionTable:
        """The rows at idx (with repeats: a bootstrap resample)."""
        idx = np.asarray(idx, dtype=int)
        return QuestionTable(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def abstained(self) -> np.ndarray:
        return self.outcome == "refused"

    @property
    def answered(self) -> np.ndarray:
        """Questions with a graded answer and a confidence: the domain of AUROC, ECE and AURC."""
        return np.isin(self.outcome, ("correct", "incorrect")) & self.graded & ~np.isnan(self.confidence)

    @classmethod
    def build(cls, outcome: Sequence[str], confidence: Sequence[float | None] | None = None,
              should_abstain: Sequence[bool] | None = None, graded: Sequence[bool] | None = None,
              question: Sequence[str] | None = None, rank_score: Sequence[float | None] | None = None,
              answer_correct: Sequence[bool] | None = None) -> QuestionTable:
        """From lists; missing columns default to: no confidence, nothing to abstain on, all graded."""
        n = len(outcome)
        out = np.asarray(list(outcome), dtype=object)

        def num(xs: Sequence[float | None] | None) -> np.ndarray:
            return np.full(n, np.nan) if xs is None else np.asarray([np.nan if x is None else float(x) for x in xs])

        def flags(xs: Sequence[bool] | None, default: bool) -> np.ndarray:
            return np.full(n, default) if xs is None else np.asarray([bool(x) for x in xs], dtype=bool)

        return cls(np.asarray(list(question) if question is not None else [str(i) for i in range(n)], dtype=object),
                   out, num(confidence), flags(should_abstain, False), flags(graded, True), num(rank_score),
                   flags(answer_correct, False) if answer_correct is not None else out == "correct")

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], broad: bool = False) -> QuestionTable:
        """From evaluate.py's records: outcome (or outcome_broad), answer_conf, should_abstain, gold,
        sure_prob and ap_correct."""
        key = "outcome_broad" if broad else "outcome"
        return cls.build(
            [r[key] for r in records], [r.get("answer_conf") for r in records],
            [bool(r.get("should_abstain", False)) for r in records], [bool(r.get("gold")) for r in records],
            [str(r.get("id", i)) for i, r in enumerate(records)],
            [confidence_score(r["answer_conf"], r["sure_prob"])
             if r.get("answer_conf") is not None and r.get("sure_prob") is not None else None for r in records],
            [bool(r["ap_correct"]) if "ap_correct" in r else r[key] == "correct" for r in records])


def auroc(correct: Sequence[bool] | np.ndarray, confidence: Sequence[float] | np.ndarray) -> float | None:
    """sklearn's roc_auc_score(correct, confidence): the probability that a right answer has a higher
    confidence than a wrong one (ties count half). None when the answers are all right or all wrong."""
    y = np.asarray(correct, dtype=bool)
    c = np.asarray(confidence, dtype=float)
    if y.shape != c.shape:
        raise ValueError("correct and confidence differ in length")
    if y.all() or not y.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(int), c))


def bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: (k/n, (k+1)/n] goes to bin k, and 0 goes to bin 0."""
    return np.clip(np.ceil(np.asarray(conf, dtype=float) * n_bins).astype(int) - 1, 0, n_bins - 1)


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin: its edges, size, mean confidence and accuracy (None when empty)."""

    lo: float
    hi: float
    count: int
    mean_conf: float | None
    accuracy: float | None


def _check_calibration(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(conf, dtype=float)
    y = np.asarray(correct, dtype=float)
    if c.shape != y.shape or c.ndim != 1:
        raise KbError(f"calibration: {c.size} confidences but {y.size} correctness labels")
    if c.size == 0:
        raise KbError("calibration: no predictions to calibrate")
    if n_bins < 1:
        raise KbError(f"calibration: n_bins must be >= 1, got {n_bins}")
    if not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c > 1):
        raise KbError("calibration: confidences must be finite numbers in [0, 1]")
    return c, y


def reliability_bins(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """Per-bin mean confidence and accuracy, the data of a reliability diagram. Bins are equal width on
    [0, 1], right-closed except the first (Guo et al. 2017's convention)."""
    c, y = _check_calibration(conf, correct, n_bins)
    idx = bin_index(c, n_bins)
    out = []
    for k in range(n_bins):
        m = idx == k
        n = int(m.sum())
        out.append(ReliabilityBin(k / n_bins, (k + 1) / n_bins, n,
                                  float(c[m].mean()) if n else None, float(y[m].mean()) if n else None))
    return out


def ece(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error (Guo et al. 2017): Σ over bins of (bin size / N)·|accuracy − mean confidence|."""
    bins = reliability_bins(conf, correct, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.accuracy - b.mean_conf) for b in bins if b.count))  # type: ignore[operator]


def risk_coverage(correct: Sequence[bool] | np.ndarray, confidence: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at k = 1..n answers kept, most confident first (Geifman & El-Yaniv 2017).

    coverage_k = k/n, risk_k = (expected errors among the k most confident answers) / k. Ties are
    handled deterministically by their expectation over random orders: inside a run of equal
    confidences spanning ranks a+1..b with e errors, the top-k count grows by e/(b−a) per rank, so
    the order of the input rows never matters.
    """
    y = np.asarray(correct, dtype=bool)
    c = np.asarray(confidence, dtype=float)
    if y.shape != c.shape or y.ndim != 1:
        raise ValueError("correct and confidence differ in length")
    n = len(y)
    if n == 0:
        raise ValueError("no answers for a risk-coverage curve")
    order = np.argsort(-c, kind="stable")
    cs, err = c[order], (~y[order]).astype(float)
    errors = np.empty(n)
    start, before = 0, 0.0
    while start < n:
        end = start
        while end < n and cs[end] == cs[start]:
            end += 1
        e = err[start:end].sum()
        errors[start:end] = before + e * np.arange(1, end - start + 1) / (end - start)
        before += e
        start = end
    k = np.arange(1, n + 1)
    return k / n, errors / k


def aurc(correct: Sequence[bool] | np.ndarray, confidence: Sequence[float] | np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of risk_k over k = 1..n (risk_coverage); 0 when
    every answer is right, the error rate when confidence carries no information, lower is better."""
    return float(np.mean(risk_coverage(correct, confidence)[1]))


def abstention_prf(abstained: Sequence[bool] | np.ndarray, should_abstain: Sequence[bool] | np.ndarray) -> dict[str, float | None]:
    """AbstentionBench's abstention precision, recall and F1, "should abstain" being the positive class.

    precision = |abstained ∧ should| / |abstained|, recall = |abstained ∧ should| / |should|, F1 their
    harmonic mean (sklearn's precision_recall_fscore_support, binary). Precision is None with no
    abstention and recall None with nothing to abstain on; F1 is None only when recall is, and 0 when
    the model abstains on none of the questions it should (sklearn's zero_division=0).
    """
    a = np.asarray(abstained, dtype=bool)
    s = np.asarray(should_abstain, dtype=bool)
    if a.shape != s.shape:
        raise ValueError("abstained and should_abstain differ in length")
    from sklearn.metrics import precision_recall_fscore_support

    p, r, _, _ = precision_recall_fscore_support(s.astype(int), a.astype(int), average="binary", pos_label=1,
                                                 zero_division=np.nan)
    _, _, f, _ = precision_recall_fscore_support(s.astype(int), a.astype(int), average="binary", pos_label=1,
                                                 zero_division=0.0)
    return {"precision": None if np.isnan(p) else float(p), "recall": None if np.isnan(r) else float(r),
            "f1": None if np.isnan(r) else float(f)}


def refusal_rate(abstained: Sequence[bool] | np.ndarray, mask: Sequence[bool] | np.ndarray) -> float | None:
    """Percent of the questions selected by mask that were refused (None when mask selects none)."""
    a, m = np.asarray(abstained, dtype=bool), np.asarray(mask, dtype=bool)
    return None if not m.any() else 100.0 * float(a[m].mean())


def table_ap(t: QuestionTable) -> float | None:
    """R-Tuning's AP of a table: average_precision(answer_correct, rank_score) over rows with a rank_score."""
    ranked = ~np.isnan(t.rank_score)
    return average_precision(list(t.answer_correct[ranked]), list(t.rank_score[ranked])) if ranked.any() else None


def suite(t: QuestionTable, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Every metric of one per-question table (rates and Pr-type numbers in percent, the rest in [0, 1]).

    Pc/Pw/Pr/P_fail: over all rows. AP: R-Tuning's, over rows with a rank_score. AUROC, ECE, AURC:
    over `answered` rows (a graded answer with a confidence; `n_answered`). Refusal rates: on rows that
    should be refused (`Pr_should_abstain`) and on those that should be answered (`Pr_should_answer`,
    the false refusals). Abstention P/R/F1: over all rows. THS needs a second model: metrics.ths.
    """
    out: dict[str, Any] = {"n": len(t), **rates(list(t.outcome))} if len(t) else {"n": 0}
    out["AP"] = table_ap(t)
    ans = t.answered
    y, c = t.outcome[ans] == "correct", t.confidence[ans]
    out["n_answered"] = int(ans.sum())
    out["AUROC"] = auroc(y, c) if ans.any() else None
    out["ECE"] = ece(c, y, n_bins) if ans.any() else None
    out["AURC"] = aurc(y, c) if ans.any() else None
    out["n_should_abstain"] = int(t.should_abstain.sum())
    out["Pr_should_abstain"] = refusal_rate(t.abstained, t.should_abstain)
    out["Pr_should_answer"] = refusal_rate(t.abstained, ~t.should_abstain)
    out.update({f"abstain_{k}": v for k, v in abstention_prf(t.abstained, t.should_abstain).items()})
    return out
