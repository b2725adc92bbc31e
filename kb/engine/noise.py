"""Counter-based sampling noise: a sample depends on its question's key and its index, never on its batch.

Sampling is Gumbel-max with splitmix64 noise keyed by (the question's key, the sample index, the token
index), computed on the device, so the device decoder (kb.engine.decode) draws the same sample of a
question whichever other questions share its batch and whenever its slot was filled.

On CUDA the decoder draws through `pick_kernel`: one Triton program per row reads the row's logits once,
in chunks, and keeps the running Gumbel-max and log-sum-exp, so a step's sampling is one launch and one read
of the logits. It replaces a `torch.compile` of `pick` whose first use cost seconds of compiling on every new
machine (the real SmolLM2's probe: 12.3 s cold against 7.9 s warm, bench/README.md v6); a Triton kernel
builds like kb's other kernels and is cached on disk. Same noise, same draw as `pick` up to float rounding
(the scaled logit and the Gumbel term may be fused into one rounding): its math is tested on CPU through
Triton's interpreter, its build for sm_80/sm_90 by tests/test_kernel_builds.py, and on a GPU it is compared
with `pick` by bench/decode_check.py and, once per process, by `pick_kernel_problem` before the decoder uses it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
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


_KERNEL: Any = None
_BLOCK = 2048  # logits per chunk: 8 KB of fp32 per program, a few chunks for a 32-128 k vocabulary


_KERNEL_PROBLEM: dict[tuple[str, int, torch.dtype], str | None] = {}


def pick_kernel_problem(device: torch.device, vocab: int, dtype: torch.dtype = torch.float32) -> str | None:
    """Why `pick_kernel` should not be used on this device (it fails to build, or its draws are not `pick`'s on
    64 rows of random logits, sampled and greedy), or None. Checked once per device, vocabulary size and
    logits dtype (the one the decoder will pass: the check's build is the one it reuses)."""
    at = (str(device), vocab, dtype)
    if at not in _KERNEL_PROBLEM:
        g = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(64, vocab, generator=g, device=device) * 4).to(dtype)
        keys = torch.randint(-2**62, 2**62, (64,), generator=g, device=device)
        t = torch.arange(64, device=device) % 9 + 1
        problem = None
        try:
            for temperature in (None, 1.0):
                (a, la), (b, lb) = (f(logits, keys, t, temperature, True) for f in (pick, pick_kernel))
                if int((a != b).sum()) > 1 or float((la - lb).abs().max()) > 1e-3:  # a tie within rounding: 1 row
                    problem = f"its draws differ from kb.engine.noise.pick's (T={temperature})"
                    break
        except Exception as err:  # noqa: BLE001  (a Triton that cannot build it here)
            problem = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        _KERNEL_PROBLEM[at] = problem
    return _KERNEL_PROBLEM[at]


class CompiledPick:
    """The sampler where the kernel cannot run: `pick` through torch.compile for sampling (the noise and the
    Gumbel-max fused), eager `pick` for greedy steps (an argmax needs no noise)."""

    def __init__(self) -> None:
        self._compiled = torch.compile(pick, dynamic=True)

    def __call__(self, logits: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, temperature: float | None,
                 want_logp: bool, vterm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        fn = pick if temperature is None else self._compiled
        return fn(logits, keys, t, temperature, want_logp, vterm)


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def pick_one_row(x_ptr, keys_ptr, t_ptr, tok_ptr, lp_ptr, s_x, vocab, inv_t, BLOCK: tl.constexpr):
            # One build for greedy (inv_t 0) and sampled steps, with the log-prob always: a run compiles once.
            row = tl.program_id(0).to(tl.int64)
            sample = inv_t > 0
            scale = tl.where(sample, inv_t, 1.0)
            key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
            t = tl.load(t_ptr + row).to(tl.uint64, bitcast=True)
            base = key * 0x9E3779B97F4A7C15 + t * 0xBF58476D1CE4E5B9  # splitmix64's counter, as uniform_noise
            best = tl.full([], -float("inf"), tl.float32)
            best_i = tl.zeros([], dtype=tl.int64)
            m = tl.full([], -float("inf"), tl.float32)
            total = tl.zeros([], dtype=tl.float32)
            for start in range(0, vocab, BLOCK):
                v = start + tl.arange(0, BLOCK)
                ok = v < vocab
                scaled = tl.load(x_ptr + row * s_x + v, mask=ok, other=-float("inf")).to(tl.float32) * scale
                if sample:
                    h = base + v.to(tl.uint64) * 0x94D049BB133111EB
                    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9
                    h = (h ^ (h >> 27)) * 0x94D049BB133111EB
                    h = h ^ (h >> 31)
                    u = ((h >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216)
                    score = tl.where(ok, scaled - tl.log(-tl.log(u)), -float("inf"))
                else:
                    score = scaled
                top = tl.max(score, axis=0)
                at = tl.argmax(score, axis=0)  # the first of equal maxima, as torch's argmax
                take = top > best  # strictly: an earlier chunk keeps a tie
                best_i = tl.where(take, start + at, best_i)
                best = tl.where(take, top, best)
                m_new = tl.maximum(m, tl.max(scaled, axis=0))  # online log-sum-exp of the scaled logits
                total = total * tl.exp(m - m_new) + tl.sum(tl.exp(scaled - m_new), axis=0)
                m = m_new
            tl.store(tok_ptr + row, best_i)
            x_best = tl.load(x_ptr + row * s_x + best_i).to(tl.float32) * scale
            tl.store(lp_ptr + row, x_best - (m + tl.log(total)))

        _KERNEL = pick_one_row
    return _KERNEL


def pick_kernel(logits: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, temperature: float | None,
                want_logp: bool, vterm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pick` as one Triton kernel (CUDA, or CPU under Triton's interpreter); `vterm` is not needed."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    tok = torch.empty(rows, dtype=torch.long, device=logits.device)
    lp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    # CUDA's eager `logits / T` multiplies by the fp32 reciprocal of T; so does the kernel (0: greedy).
    inv_t = 0.0 if temperature is None else float(np.float32(1.0) / np.float32(temperature))
    if rows:
        _kernel()[(rows,)](logits, keys.contiguous(), t.contiguous(), tok, lp, logits.stride(0), vocab, inv_t,
                           BLOCK=_BLOCK, num_warps=8)
    return tok, (lp if want_logp else None)


def question_key(seed: int, question_id: str) -> int:
    """A question's sampling key: fixed by the run's seed and the question, not by its batch."""
    return _i64(int(hashlib.sha256(f"{seed}|{question_id}".encode()).hexdigest()[:16], 16))
