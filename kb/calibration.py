"""Calibration of a confidence score against correctness: reliability bins and ECE.

Defined once here so the report, evaluation and any notebook agree on the binning. Bins are equal
width on [0, 1], right-closed except the first (a confidence of exactly 0 falls in bin 0 and exactly
1 in the last bin), which is the convention of Guo et al. (2017) and of most calibration libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kb.errors import KbError

DEFAULT_BINS = 10


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin: its edges, size, mean confidence and accuracy (None when empty)."""

    lo: float
    hi: float
    count: int
    mean_conf: float | None
    accuracy: float | None


def _check(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int) -> tuple[np.ndarray, np.ndarray]:
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


def bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: (k/n, (k+1)/n] goes to bin k, and 0 goes to bin 0."""
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """Per-bin mean confidence and accuracy, the data of a reliability diagram."""
    c, y = _check(conf, correct, n_bins)
    idx = bin_index(c, n_bins)
    out = []
    for k in range(n_bins):
        m = idx == k
        n = int(m.sum())
        out.append(ReliabilityBin(k / n_bins, (k + 1) / n_bins, n,
                                  float(c[m].mean()) if n else None, float(y[m].mean()) if n else None))
    return out


def ece(conf: Sequence[float], correct: Sequence[bool | int], n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error: sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    bins = reliability_bins(conf, correct, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.accuracy - b.mean_conf) for b in bins if b.count))  # type: ignore[operator]
