"""The decoding step's own half (each row's query over its own generated keys) as one Triton kernel.

Why: in that half every (row, head) has a single query and its own keys, so it is a matrix-vector
product. Flash attention tiles queries by 64-128, which for one query wastes that factor of its math:
on a Llama-2-7B shape with 2,560 rows flash attention (both halves, this one the larger) took 48% of a
decoding step (bench/README.md, v4).
Here one program per (row, head) reads the row's used keys and values once, in chunks, with an online
softmax, and writes the output and its log-sum-exp (merged with the prompt half by kb.engine.step).
Opt-in (Decoder(own_kernel=True), bench_open.py --own-kernel): its math is tested on CPU through Triton's
interpreter (tests/test_decode.py), but it has not yet been timed or checked on a GPU (bench/decode_check.py
does both). Where it fails to compile, kb.engine.graph falls back to flash attention for that half.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

_KERNEL: Any = None


def triton_available(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can run here: CUDA, Triton installed, a power-of-two head size."""
    return (device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and importlib.util.find_spec("triton") is not None)


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def own_half_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, used_ptr, s_qb, s_qh, s_kb, s_kt, s_kh, s_ob, s_oh,
                            n_heads, rep, scale, D: tl.constexpr, BLOCK_T: tl.constexpr):
            b = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
            h = tl.program_id(1)
            kvh = h // rep
            used = tl.load(used_ptr + b)
            d = tl.arange(0, D)
            q = tl.load(q_ptr + b * s_qb + h * s_qh + d).to(tl.float32) * scale
            m = tl.full([1], float("-inf"), tl.float32)
            l_sum = tl.zeros([1], tl.float32)
            acc = tl.zeros([D], tl.float32)
            for start in range(0, used, BLOCK_T):
                t = start + tl.arange(0, BLOCK_T)
                ok = t < used
                at = b * s_kb + t[:, None] * s_kt + kvh * s_kh + d[None, :]
                k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
                s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=0))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new)
                v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                l_sum = l_sum * alpha + tl.sum(p, axis=0)
                m = m_new
            tl.store(o_ptr + b * s_ob + h * s_oh + d, (acc / l_sum).to(o_ptr.dtype.element_ty))
            tl.store(lse_ptr + b * n_heads + h + tl.arange(0, 1), m + tl.log(l_sum))

        _KERNEL = own_half_kernel
    return _KERNEL


def own_half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, D]; k, v [B, T, Hkv, D] (D contiguous); used [B] int32 (>= 1 keys per row).

    Returns the attention output [B, H, D] (q's dtype) and its log-sum-exp [B, H] (fp32, of the scaled
    scores, as flash attention reports it)."""
    b, h, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    assert k.stride() == v.stride() and k.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h), dtype=torch.float32, device=q.device)
    block = min(64, 1 << max(0, (t - 1).bit_length()))
    _kernel()[(b, h)](q, k, v, out, lse, used, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                      out.stride(0), out.stride(1), h, h // hkv, scale, D=d, BLOCK_T=max(block, 16))
    return out, lse
