"""95% bootstrap intervals over questions, and paired differences between methods.

Every rate, THS and AP in a table is a statistic of the per-question records, so its sampling noise is
estimated the same way: resample the questions with replacement (seeded, `N_RESAMPLES` times), recompute
the statistic, take the 2.5th and 97.5th percentiles (scipy.stats.bootstrap, percentile method).
Two methods evaluated on the same questions are resampled together (paired): the interval of their
difference is then much narrower than the two intervals side by side suggest.

Outcomes are coded as integers so that the statistics run vectorised over all resamples at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kb.metrics import table_ap

N_RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
OUTCOME_CODE = {"correct": 0, "incorrect": 1, "refused": 2, "fail_parse": 3}

Statistic = Callable[..., Any]


def codes(outcomes: Sequence[str]) -> np.ndarray:
    """Outcome labels -> integer codes (OUTCOME_CODE)."""
    return np.array([OUTCOME_CODE[o] for o in outcomes], dtype=np.int8)


# ------------------------------------------------------------------ statistics of coded outcomes
# Each takes arrays whose last axis is the questions and returns one value per leading index.


def rate_of(*labels: str) -> Statistic:
    """Percentage of questions whose outcome is one of `labels` (Pw + P_fail: rate_of('incorrect', 'fail_parse'))."""
    wanted = [OUTCOME_CODE[k] for k in labels]

    def stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return 100.0 * np.isin(x, wanted).mean(axis=axis)

    return stat


_correct = rate_of("correct")
_wrong = rate_of("incorrect", "fail_parse")  # THS counts an unparseable reply as wrong (CRaFT)


def ths_stat(method: np.ndarray, baseline: np.ndarray, axis: int = -1) -> np.ndarray:
    """THS of `method` against `baseline` on the same questions, P_fail counted as wrong; NaN where the
    baseline makes no error (THS is undefined there)."""
    pc2, pw2 = _correct(method, axis), _wrong(method, axis)
    pc1, pw1 = _correct(baseline, axis), _wrong(baseline, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pw1 > 0, (pc2 * pw1 - pw2 * pc1) / np.where(pw1 > 0, pw1, 1.0), np.nan)


def average_precision(correct: np.ndarray, score: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score in plain numpy (ties grouped the same way; a test checks
    equality), since a bootstrap calls it a thousand times per table cell. NaN without a correct answer."""
    y = np.asarray(correct, dtype=bool)
    if not y.any():
        return float("nan")
    sc = np.asarray(score, dtype=float)
    order = np.argsort(-sc, kind="mergesort")
    s, y = sc[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last question of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ap_stat(correct: np.ndarray, score: np.ndarray) -> float:
    """R-Tuning's AP (x100) of one resample; NaN when no answer is correct (precision undefined)."""
    return 100.0 * average_precision(correct, score)


# ------------------------------------------------------------------ intervals


def interval(statistic: Statistic, *columns: Sequence[Any] | np.ndarray, vectorized: bool = True,
             seed: int = SEED, n_resamples: int = N_RESAMPLES) -> list[float] | None:
    """[lo, hi] of the 95% percentile-bootstrap interval of statistic(*columns), the columns resampled
    together (paired, one row per question). None with fewer than two questions or when the statistic
    is undefined on most resamples. Resamples where it is undefined (NaN) are left out."""
    from scipy.stats import bootstrap

    data = tuple(np.asarray(c) for c in columns)
    n = len(data[0])
    if n < 2 or any(len(c) != n for c in data):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (all one outcome) are expected, not errors
        res = bootstrap(data, statistic, paired=True, vectorized=vectorized, n_resamples=n_resamples,
                        confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    ok = dist[np.isfinite(dist)]
    if ok.size < n_resamples / 2:
        return None
    alpha = (1 - CONFIDENCE) / 2
    return [round(float(np.quantile(ok, alpha)), 4), round(float(np.quantile(ok, 1 - alpha)), 4)]


def difference(statistic: Statistic, a: Sequence[np.ndarray], b: Sequence[np.ndarray],
               shared: Sequence[np.ndarray] = (), vectorized: bool = True) -> dict[str, Any]:
    """statistic(*a, *shared) - statistic(*b, *shared) on the same questions, with its paired interval
    and whether that interval excludes 0 (`significant`)."""
    na, nb = len(a), len(b)

    def diff(*cols: np.ndarray, axis: int = -1) -> Any:
        xa, xb, xs = cols[:na], cols[na:na + nb], cols[na + nb:]
        if vectorized:
            return statistic(*xa, *xs, axis=axis) - statistic(*xb, *xs, axis=axis)
        return statistic(*xa, *xs) - statistic(*xb, *xs)

    cols = [*a, *b, *shared]
    value = diff(*[np.asarray(c)[None, :] for c in cols])[0] if vectorized else diff(*[np.asarray(c) for c in cols])
    ci = interval(diff, *cols, vectorized=vectorized)
    value = None if not np.isfinite(value) else round(float(value), 4)
    return {"value": value, "ci": ci, "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}


def rate_intervals(outcomes: Sequence[str]) -> dict[str, list[float] | None]:
    """Intervals of Pc, Pw, Pr and P_fail for one run's outcomes."""
    x = codes(outcomes)
    return {key: interval(rate_of(label), x) for label, key in
            (("correct", "Pc"), ("incorrect", "Pw"), ("refused", "Pr"), ("fail_parse", "P_fail"))}


def ths_interval(outcomes: Sequence[str], baseline_outcomes: Sequence[str]) -> list[float] | None:
    return interval(ths_stat, codes(outcomes), codes(baseline_outcomes))


def ap_interval(correct: Sequence[bool], scores: Sequence[float]) -> list[float] | None:
    return interval(ap_stat, np.asarray(correct, dtype=bool), np.asarray(scores, dtype=float), vectorized=False)


def table_ap_interval(table: Any) -> list[float] | None:
    """The interval of kb.metrics.table_ap: the same rows (those with a rank score), resampled."""
    ranked = ~np.isnan(table.rank_score)
    return ap_interval(table.answer_correct[ranked], table.rank_score[ranked]) if ranked.sum() >= 2 else None


def ap_with_interval(table: Any) -> tuple[float | None, list[float] | None]:
    """R-Tuning's AP (x100) of a per-question table (kb.metrics.table_ap) and its interval: the one AP reading
    evaluate.py's summaries and the report print. (None, None) when no ranked answer is correct."""
    ap = table_ap(table)
    return (None, None) if ap is None else (100 * ap, table_ap_interval(table))


def fmt(value: float | None, ci: Sequence[float] | None, nd: int = 1) -> str:
    """'12.3 [8.1, 16.0]' ('–' for a missing value; no brackets without an interval)."""
    if value is None:
        return "–"
    if not ci:
        return f"{value:.{nd}f}"
    return f"{value:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"
