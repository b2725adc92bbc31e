"""Fused element-wise kernels for Llama-family layers on CUDA: RMSNorm, RoPE and SiLU·up, one Triton kernel each.

Why: transformers' eager layers spend a large share of a pass on element-wise work that reads and writes
whole activations several times (RMSNorm's fp32 round trips, RoPE's rotate-half `cat`, SiLU then the
product): about 28 ms of a 136.6-ms 7B decoding step over 2,560 rows (bench/README.md, v4's profile) and
about 30% of the MCQ scorer's passes (its H100 profile). Each kernel here reads its inputs once and writes its output once,
and rounds each bf16 intermediate where transformers rounds it. Measured on an H200 in bf16
(bench/decode_check.py): SiLU·up is identical to the eager op, RMSNorm on all but 1e-5 of elements (the
order of one fp32 sum), RoPE on 76% (the rest one bf16 step apart: the compiler may fuse a product into
the sum); in fp32 all three agree with the eager ops to 1e-6.

`fused_layers(model)` swaps them in for the duration of a pass (the decoding step, the scorer's forward),
only for the model families whose layers are written exactly this way (`fused_supported`); everything else,
and every CPU run, keeps transformers' code.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kb.engine.attention import decoder_stack

# Families whose layers are input_layernorm -> attention (RoPE by the module's apply_rotary_pos_emb) ->
# post_attention_layernorm -> gate/up/down MLP, with RMSNorm as weight * (x / rms(x)).to(dtype).
FUSED_MODEL_TYPES = {"llama", "mistral", "qwen2"}

_KERNELS: dict[str, Any] = {}
_ACTIVE: set[int] = set()  # decoder stacks inside fused_layers now


def _kernels() -> dict[str, Any]:
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, o_ptr, s_x, s_o, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n
        y = (x * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)  # hidden_states.to(input_dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(o_ptr + row * s_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=ok, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)  # silu rounds, then the product
        tl.store(o_ptr + i, (a * u).to(o_ptr.dtype.element_ty), mask=ok)

    # `seq` and `heads` only bound loops and masks: unspecialised, one build serves decoding (seq 1) and
    # every prefill width, instead of one per value class (1, multiples of 16, the rest).
    @triton.jit(do_not_specialize=["seq", "heads"])
    def rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, seq, heads, s_xb, s_xh, s_xs, s_ob, s_oh, s_os, s_cb, s_cs,
                    s_sb, s_ss, HALF: tl.constexpr, BLOCK: tl.constexpr, HB: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq
        s = tok % seq
        h = tl.program_id(1) * HB + tl.arange(0, HB)
        j = tl.arange(0, BLOCK)
        ok = (h[:, None] < heads) & (j[None, :] < HALF)
        x_at = x_ptr + b * s_xb + s * s_xs + h[:, None] * s_xh + j[None, :]
        x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
        jm = j < HALF
        c1 = tl.load(c_ptr + b * s_cb + s * s_cs + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(c_ptr + b * s_cb + s * s_cs + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        n1 = tl.load(s_ptr + b * s_sb + s * s_ss + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        n2 = tl.load(s_ptr + b * s_sb + s * s_ss + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        dt = o_ptr.dtype.element_ty
        # (x * cos) + (rotate_half(x) * sin), rotate_half(x) = cat(-x2, x1); each product rounded, then the sum.
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * n1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * n2).to(dt).to(tl.float32)).to(dt)
        o_at = o_ptr + b * s_ob + s * s_os + h[:, None] * s_oh + j[None, :]
        tl.store(o_at, o1, mask=ok)
        tl.store(o_at + HALF, o2, mask=ok)

    _KERNELS.update(rms_norm=rms_norm_kernel, silu_mul=silu_mul_kernel, rope=rope_kernel)
    return _KERNELS


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype), over the last dimension."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = _pow2(shape[-1])
    if x2.shape[0]:
        _kernels()["rms_norm"][(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), shape[-1], eps,
                                               BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.view(shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded as eager bf16/fp16 ops round them."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _kernels()["silu_mul"][(-(-n // 1024),)](gate, up, out, n, BLOCK=1024, num_warps=4)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] (any strides, D contiguous), cos/sin [B or 1, S, D]: (x * cos) + (rotate_half(x) * sin)."""
    b, h, s, d = x.shape
    cos, sin = cos.expand(b, s, d), sin.expand(b, s, d)
    out = torch.empty_like(x)  # keeps x's layout (transformers' q/k are transposed views)
    hb = min(8, _pow2(h))
    if x.numel():
        _kernels()["rope"][(b * s, -(-h // hb))](
            x, cos, sin, out, s, h, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            out.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            HALF=d // 2, BLOCK=_pow2(d // 2), HB=hb, num_warps=4)
    return out


def _rope_fn(original: Any) -> Any:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        ok = (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
              and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0
              and q.dtype == k.dtype == cos.dtype == sin.dtype and q.stride(-1) == k.stride(-1) == 1
              and cos.stride(-1) == sin.stride(-1) == 1)
        if not ok:  # partial rotary, other layouts or mixed dtypes: transformers' own function
            return original(q, k, cos, sin, unsqueeze_dim)
        return rope(q, cos, sin), rope(k, cos, sin)

    return apply_rotary_pos_emb


def _norm_forward(norm: Any) -> Any:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    return lambda hidden_states: rms_norm(hidden_states, norm.weight, eps)


def _mlp_forward(mlp: Any) -> Any:
    return lambda x: mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def fused_supported(model: Any, *, any_device: bool = False) -> bool:
    """Whether fused_layers computes this model's function: a family of FUSED_MODEL_TYPES written the
    standard way, on CUDA with Triton installed (`any_device`: skip the device check, for Triton's interpreter)."""
    device = next(model.parameters()).device
    if not any_device and device.type != "cuda":
        return False
    if importlib.util.find_spec("triton") is None or getattr(model.config, "model_type", None) not in FUSED_MODEL_TYPES:
        return False
    if getattr(model.config, "hidden_act", None) != "silu":
        return False
    dec = decoder_stack(model)
    layers = getattr(dec, "layers", None)
    if not layers or not type(getattr(dec, "norm", None)).__name__.endswith("RMSNorm"):
        return False
    for layer in layers:
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        mlp = getattr(layer, "mlp", None)
        if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
            return False
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) or \
                type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            return False
    module = sys.modules.get(type(layers[0].self_attn).__module__)
    return hasattr(module, "apply_rotary_pos_emb") and hasattr(module, "rotate_half")


@contextmanager
def fused_layers(model: Any, enabled: bool = True) -> Iterator[None]:
    """Run `model`'s norms, RoPE and MLP activations through the fused kernels for the duration (restored
    after). `enabled` False (or a model fused_layers does not cover, checked by the caller) changes nothing."""
    dec = decoder_stack(model)
    if not enabled or id(dec) in _ACTIVE:  # nested: the outer context has them in already
        yield
        return
    _ACTIVE.add(id(dec))
    patched: list[Any] = []
    module: Any = None
    original: Any = None
    try:  # everything patched so far is undone, whatever fails
        for layer in dec.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.forward = _norm_forward(norm)
                patched.append(norm)
            layer.mlp.forward = _mlp_forward(layer.mlp)
            patched.append(layer.mlp)
        dec.norm.forward = _norm_forward(dec.norm)
        patched.append(dec.norm)
        module = sys.modules[type(dec.layers[0].self_attn).__module__]
        original = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = _rope_fn(original)
        yield
    finally:
        if original is not None:
            module.apply_rotary_pos_emb = original
        _ACTIVE.discard(id(dec))
        for m in patched:
            del m.forward  # the instance attribute; the class's forward shows through again


class Fusion:
    """Whether a caller's passes go through fused_layers: by default where fused_supported; `enabled` True
    also off CUDA (Triton's interpreter), never for a model the kernels do not compute; off for good, with a
    warning, after a first pass that fails (a machine whose Triton cannot build the kernels).
    Out-of-memory errors pass through: the callers split their batches on them."""

    def __init__(self, model: Any, enabled: bool | None = None) -> None:
        self.model = model
        self.on = enabled is not False and fused_supported(model, any_device=bool(enabled))
        self.proven = False

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return fn(*args, **kwargs)
        try:
            with fused_layers(self.model):
                out = fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001
            if self.proven:
                raise
            warnings.warn(f"kb.engine.fused: the fused kernels failed ({str(err).splitlines()[0][:200]}); "
                          "using transformers' layers", stacklevel=2)
            self.on = False
            return fn(*args, **kwargs)
        self.proven = True
        return out
