"""The decoding step's own half (each row's query over its own generated keys) as one Triton kernel, and the
cascade scorer's merge of two attention halves (`lse_merge`).

Why: in that half every (row, head) has a single query and its own keys, so it is a matrix-vector
product. Flash attention tiles queries by 64-128, which for one query wastes that factor of its math:
on a Llama-2-7B shape with 2,560 rows flash attention (both halves, this one the larger) took 48% of a
decoding step (bench/README.md, v4); this kernel brought the step from 136.6 to 106.7 ms (v5).
One program per (row, head) reads the row's earlier keys and values once, in chunks, with an online
softmax; this step's key and value come in as registers, are written into the row's buffer (by the first
query head of each key head) and join the softmax directly, so the step needs no separate scatter; the
prompt half's output and log-sum-exp (flash attention's) are merged in the same program, so the output is
the step's attention output in the model's dtype. Default where Triton and flash attention run
(kb.engine.graph falls back to flash attention for this half when the kernel fails to compile); its math is
tested on CPU through Triton's interpreter (tests/test_decode.py) and on a GPU by bench/decode_check.py.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

_KERNEL: Any = None


def triton_runs(device: torch.device) -> bool:
    """Whether kb's Triton kernels can run on `device`: CUDA with Triton installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can run here: CUDA, Triton installed, a power-of-two head size."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and triton_runs(device)


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        # s_lh (the row count: flash attention's log-sum-exps are [H, B]) only addresses one scalar a program:
        # unspecialised, one build serves every batch size instead of one per class of value (1, 16k, other).
        @triton.jit(do_not_specialize=["s_lh"])
        def own_half_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, o_ptr, used_ptr,
                            s_qb, s_qh, s_nb, s_nh, s_kb, s_kt, s_kh, s_pb, s_ph, s_lh, s_ob, s_oh,
                            rep, scale, D: tl.constexpr, BLOCK_T: tl.constexpr):
            b = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
            h = tl.program_id(1)
            kvh = h // rep
            last = tl.load(used_ptr + b) - 1  # this step's position in the row
            d = tl.arange(0, D)
            q = tl.load(q_ptr + b * s_qb + h * s_qh + d).to(tl.float32) * scale
            kn = tl.load(kn_ptr + b * s_nb + kvh * s_nh + d)
            vn = tl.load(vn_ptr + b * s_nb + kvh * s_nh + d)
            if h % rep == 0:  # one writer per key head; the readers below never read position `last`
                tl.store(k_ptr + b * s_kb + last * s_kt + kvh * s_kh + d, kn)
                tl.store(v_ptr + b * s_kb + last * s_kt + kvh * s_kh + d, vn)
            m = tl.sum(kn.to(tl.float32) * q, axis=0)  # the new token's score starts the online softmax
            l_sum = m * 0.0 + 1.0
            acc = vn.to(tl.float32)
            for start in range(0, last, BLOCK_T):
                t = start + tl.arange(0, BLOCK_T)
                ok = t < last
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
            own = acc / l_sum
            # Merge with the prompt half: its share of the softmax mass is sigmoid(lse_prompt - lse_own).
            lse_own = m + tl.log(l_sum)
            lse_prompt = tl.load(plse_ptr + h * s_lh + b)
            share = 1.0 / (1.0 + tl.exp(lse_own - lse_prompt))
            prompt = tl.load(po_ptr + b * s_pb + h * s_ph + d).to(tl.float32)
            tl.store(o_ptr + b * s_ob + h * s_oh + d, (own + share * (prompt - own)).to(o_ptr.dtype.element_ty))

        _KERNEL = own_half_kernel
    return _KERNEL


# Launch parameters of the own-half kernel: keys per loop iteration (at most), warps per program, software
# pipelining stages (None: Triton's default). bench/tune_own_half.py times the alternatives on a GPU: on an H200,
# 7B shape, 2,560 rows x 49 keys, one warp over 16 keys at a time reads at 4.0 TB/s (the measured copy bandwidth
# is 4.2), 1.65x the first choice (64 keys, 4 warps: 2.4 TB/s); a program's work is one query's matrix-vector
# product over a few dozen keys, so more programs in flight beat more threads per program.
OWN_HALF_LAUNCH: dict[str, int | None] = {"block_t": 16, "num_warps": 1, "num_stages": 2}


def own_half_merged(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    used: torch.Tensor, prompt_out: torch.Tensor, prompt_lse: torch.Tensor,
                    scale: float, launch: dict[str, int | None] | None = None) -> torch.Tensor:
    """The step's attention output [B, H, D] (q's dtype), this step's key/value written into the buffers.

    q [B, H, D]; k_new, v_new [B, Hkv, D] (this step's, same strides); k, v [B, T, Hkv, D] (D contiguous);
    used [B] int32 (this step's position + 1); prompt_out [B, H, D] and prompt_lse [H, B] fp32: the prompt
    half's output and log-sum-exp of the scaled scores, as flash attention reports them. `launch` overrides
    OWN_HALF_LAUNCH (the tuning bench)."""
    b, h, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    cfg = {**OWN_HALF_LAUNCH, **(launch or {})}
    assert k.stride() == v.stride() and k_new.stride() == v_new.stride() and prompt_lse.stride(1) == 1
    assert k.stride(-1) == 1 and q.stride(-1) == 1 and k_new.stride(-1) == 1 and prompt_out.stride(-1) == 1
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    block = min(int(cfg["block_t"] or 64), 1 << max(0, (t - 1).bit_length()))
    extra = {"num_stages": cfg["num_stages"]} if cfg["num_stages"] else {}
    _kernel()[(b, h)](q, k_new, v_new, k, v, prompt_out, prompt_lse, out, used,
                      q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), k.stride(0), k.stride(1),
                      k.stride(2), prompt_out.stride(0), prompt_out.stride(1), prompt_lse.stride(0),
                      out.stride(0), out.stride(1), h // hkv, scale, D=d, BLOCK_T=max(block, 16),
                      num_warps=int(cfg["num_warps"] or 4), **extra)
    return out


_MERGE: Any = None


def _merge_kernel() -> Any:
    global _MERGE
    if _MERGE is None:
        import triton
        import triton.language as tl

        @triton.jit(do_not_specialize=["heads", "s_lah", "s_lbh"])  # the token count: one build for all
        def lse_merge_kernel(a_ptr, b_ptr, la_ptr, lb_ptr, o_ptr, heads, s_at, s_ah, s_bt, s_bh, s_lah, s_lat, s_lbh,
                             s_lbt, s_ot, s_oh, D: tl.constexpr, HB: tl.constexpr):
            t = tl.program_id(0).to(tl.int64)
            h = tl.program_id(1) * HB + tl.arange(0, HB)
            hm = h < heads
            d = tl.arange(0, D)
            la = tl.load(la_ptr + h * s_lah + t * s_lat, mask=hm, other=0.0)
            lb = tl.load(lb_ptr + h * s_lbh + t * s_lbt, mask=hm, other=0.0)
            w = (1.0 / (1.0 + tl.exp(la - lb)))[:, None]  # b's share of the softmax mass: sigmoid(lb - la)
            m = hm[:, None]
            a = tl.load(a_ptr + t * s_at + h[:, None] * s_ah + d[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + t * s_bt + h[:, None] * s_bh + d[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(o_ptr + t * s_ot + h[:, None] * s_oh + d[None, :], (a + w * (b - a)).to(o_ptr.dtype.element_ty), mask=m)
        _MERGE = lse_merge_kernel
    return _MERGE


def lse_merge(a: torch.Tensor, b: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over the union of two key sets from its halves: a, b [T, H, D] (D a power of two,
    contiguous) with log-sum-exps lse_a, lse_b [H, T] (fp32, flash attention's layout) -> [T, H, D] in a's dtype;
    lerp(a, b, sigmoid(lse_b - lse_a)) in fp32, one read of each input (the cascade scorer's merge).
    `out` may be `a` itself (each element is read before it is written)."""
    t, h, d = a.shape
    out = torch.empty_like(a) if out is None else out
    hb = min(8, 1 << max(0, (h - 1).bit_length()))
    if a.numel():
        _merge_kernel()[(t, -(-h // hb))](
            a, b, lse_a, lse_b, out, h, a.stride(0), a.stride(1), b.stride(0), b.stride(1), lse_a.stride(0),
            lse_a.stride(1), lse_b.stride(0), lse_b.stride(1), out.stride(0), out.stride(1), D=d, HB=hb, num_warps=4)
    return out
