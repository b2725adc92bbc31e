"""CRSS, the static conflict of a RAIT set (CRaFT, docs/method.md section 5).

CRSS = |{x_i in D_idk : max_{x_j in D_van} cos(r_i, r_j) > tau_sim}| / |D_idk|: the share of "I don't
know" questions that have a near-twin (by the model's own question representation) trained to answer.
Conventions for the edge cases: D_idk empty -> undefined (None, nothing to conflict); D_van empty ->
0.0 (no vanilla twin can exist, the max over an empty set is -inf).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TAU_SIM = 0.97
SWEEP = tuple(round(0.90 + 0.01 * i, 2) for i in range(10))  # 0.90 .. 0.99


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def max_cosine(queries: np.ndarray, keys: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each query row, the max cosine similarity to any key row (-inf when there are no keys)."""
    q = np.asarray(queries)
    if q.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    if np.asarray(keys).shape[0] == 0:
        return np.full(q.shape[0], -np.inf, dtype=np.float32)
    qn, kn = _unit(q), _unit(keys)
    out = np.empty(qn.shape[0], dtype=np.float32)
    for a in range(0, qn.shape[0], chunk):  # bounded memory for 10k x 10k sets
        out[a:a + chunk] = (qn[a:a + chunk] @ kn.T).max(axis=1)
    return out


def crss_from_max(max_sims: np.ndarray, tau: float) -> float | None:
    """The share of idk questions whose nearest vanilla question is above tau (None for no idk question)."""
    if len(max_sims) == 0:
        return None
    return float((np.asarray(max_sims) > tau).mean())


def crss(idk_reps: np.ndarray, van_reps: np.ndarray, tau: float = TAU_SIM) -> float | None:
    return crss_from_max(max_cosine(idk_reps, van_reps), tau)


def crss_report(index: dict[str, int], reps: np.ndarray, van_ids: Sequence[str], idk_ids: Sequence[str],
                tau: float = TAU_SIM, sweep: Iterable[float] = SWEEP) -> dict[str, Any]:
    """CRSS at tau plus a sweep over thresholds, and the similarity quantiles behind them."""
    hidden = reps.shape[1]
    van = reps[[index[i] for i in van_ids]] if van_ids else np.zeros((0, hidden), np.float32)
    idk = reps[[index[i] for i in idk_ids]] if idk_ids else np.zeros((0, hidden), np.float32)
    m = max_cosine(idk, van)
    taus = sorted({round(float(t), 4) for t in (*sweep, tau)})
    finite = m[np.isfinite(m)]
    out: dict[str, Any] = {"tau_sim": tau, "crss": crss_from_max(m, tau),
                           "sweep": {f"{t:.2f}": crss_from_max(m, t) for t in taus}}
    if finite.size:
        out["max_cos_quantiles"] = {q: round(float(np.quantile(finite, float(q))), 6) for q in ("0.1", "0.5", "0.9")}
    if len(idk_ids) == 0:
        out["note"] = "no idk questions: CRSS undefined"
    elif len(van_ids) == 0:
        out["note"] = "no vanilla questions: CRSS is 0 by definition"
    return out
