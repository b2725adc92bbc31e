"""Counter-based sampling noise: a sample depends on its question's key and its index, never on its batch.

Sampling is Gumbel-max with splitmix64 noise keyed by (the question's key, the sample index, the token
index), computed on the device, so the device decoder (kb.engine.decode) draws the same sample of a
question whichever other questions share its batch and whenever its slot was filled.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_C1, _C2, _C3 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def vocab_term(vocab: int, device: Any) -> torch.Tensor:
    """The token id's share of the noise counter, token id x C3 (int64, [vocab])."""
    return torch.arange(vocab, device=device, dtype=torch.int64) * _C3


def uniform_noise(keys: torch.Tensor, t: torch.Tensor, vocab: int, vterm: torch.Tensor | None = None) -> torch.Tensor:
    """u in (0, 1), [B, vocab] float32, a pure function of (keys[b], t[b], token id): splitmix64."""
    v = vterm if vterm is not None else vocab_term(vocab, keys.device)
    x = (keys * _C1 + t * _C2)[:, None] + v[None, :]
    x = (x ^ _shr(x, 30)) * _C2
    x = (x ^ _shr(x, 27)) * _C3
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def row_key(question_key: int, sample: int) -> int:
    """The noise key of one sample of one question."""
    x = (question_key * 0x9E3779B97F4A7C15 + (sample + 1) * 0xD1B54A32D192ED03) & _MASK64
    x ^= x >> 29
    return _i64(x * 0xBF58476D1CE4E5B9)


def pick(logits: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, temperature: float | None,
         want_logp: bool, vterm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row: argmax (temperature None) or a draw from softmax(logits / T) by Gumbel-max."""
    logits = logits.float()
    if temperature is None:
        nxt = logits.argmax(-1)
    else:
        u = uniform_noise(keys, t, logits.shape[-1], vterm)
        nxt = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
    lp = None
    if want_logp:
        scaled = logits if temperature is None else logits / temperature
        lp = torch.log_softmax(scaled, dim=-1).gather(1, nxt[:, None])[:, 0]
    return nxt, lp


def question_key(seed: int, question_id: str) -> int:
    """A question's sampling key: fixed by the run's seed and the question, not by its batch."""
    return _i64(int(hashlib.sha256(f"{seed}|{question_id}".encode()).hexdigest()[:16], 16))
