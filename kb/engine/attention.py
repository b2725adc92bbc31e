"""kb's own attention paths and when they apply: the cascade attention of the prefix scorer.

Cascade attention: a batch's suffixes arrive packed end to end (no padding goes through the weights);
each suffix token attends to the shared prefix and to its own question separately, and the two softmax
halves are merged exactly by their log-sum-exp. `plain_attention_model` says which models such paths
reproduce exactly (the device decoder's step, kb.engine.step, uses it too); others take the scorer's
padded path, which broadcasts the prefix cache instead of copying it (`shared_view`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kb.engine.own_attention import lse_merge, triton_available
from kb.models import attention_dims, text_config

CASCADE = "kb_cascade"  # name under which the cascade attention is registered with transformers
# Model families whose CausalLM logits are exactly lm_head(last hidden state) and whose attention is
# plain scaled dot-product (no softcapping, no sinks): the cascade path computes them itself.
CASCADE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "phi3"}


def decoder_stack(model: Any) -> Any:
    """The model without its LM head (embeddings, layers, final norm): kb's paths apply the head themselves."""
    getter = getattr(model, "get_decoder", None)
    dec = getter() if getter else None
    return dec if dec is not None else model.base_model


_REGISTERED: set[str] = set()


def register_attention(name: str, fn: Any) -> None:
    """Make `fn` selectable as attn_implementation `name` in transformers (once per process)."""
    if name not in _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(name, fn)
        _REGISTERED.add(name)


@contextmanager
def attention_as(model: Any, name: str) -> Iterator[None]:
    """Run `model`'s layers with the registered attention `name` for the duration (restored after)."""
    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = saved


def cascade_supported(model: Any) -> bool:
    """Whether the cascade path computes exactly this model's function (else the KV-view path is used)."""
    return plain_attention_model(model, CASCADE_MODEL_TYPES)


def plain_attention_model(model: Any, model_types: set[str] | frozenset[str]) -> bool:
    """A model of one of `model_types` with full causal attention everywhere (no sliding window, no logit
    softcapping, sdpa or eager attention) and a separate output head: what kb's own attention paths
    (the cascade scorer, the device decoder) reproduce exactly."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in model_types:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    sliding = cfg.use_sliding_window if hasattr(cfg, "use_sliding_window") else getattr(cfg, "sliding_window", None)
    if sliding or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager", None):
        return False
    dec = decoder_stack(model)
    return hasattr(dec, "layers") and model.get_output_embeddings() is not None


def flash_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this torch build can run the flash path here (CUDA, half precision, a head size it supports)."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0
            and head_dim <= 256 and hasattr(torch.ops.aten, "_flash_attention_forward"))


def model_flash_supported(model: Any) -> bool:
    """flash_supported for `model`'s device, dtype and head size (the cascade scorer's varlen path)."""
    first = next(model.parameters())
    return flash_supported(first.device, first.dtype, attention_dims(text_config(model))[2])


# ----------------------------------------------------------------------------------------------------
# Cascade attention: softmax over [prefix keys ; own keys] computed as two attentions merged by LSE.


@dataclass
class CascadeContext:
    """What cascade_attention reads for one packed batch (set by `cascade`, per forward pass)."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys, values (layout: see `varlen`)
    dest: torch.Tensor | None  # [T]: where each packed token sits in the [rows * width] right-padded layout
    rows: int
    width: int
    # Varlen flash attention (CUDA, half precision): cu_seqlens [rows + 1] int32 of the packed suffixes,
    # and of the prefix half ([0, T], [0, P]); the prefix is then [P, Hkv, D] (heads as stored), else
    # [1, H, P, D] with heads expanded, and the suffixes go through the padded layout (`dest`).
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Varlen only: the prefix's own `fresh_prefix` tokens lead the packed input (sequence 0, positions 0..P-1)
    # instead of coming from a cache; each layer's prefix keys/values are copied into `store` for later batches.
    fresh_prefix: int = 0
    store: list[tuple[torch.Tensor, torch.Tensor]] | None = None


_ACTIVE: CascadeContext | None = None


@contextmanager
def cascade(model: Any, ctx: CascadeContext) -> Iterator[None]:
    """Route `model`'s attention through cascade_attention over `ctx` for one forward pass."""
    global _ACTIVE
    _ACTIVE = ctx
    try:
        with attention_as(model, CASCADE):
            yield
    finally:
        _ACTIVE = None


def _attn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, L, D] and its log-sum-exp [B, H, L] (fp32); causal is top-left aligned (L == S)."""
    if flash_supported(q.device, q.dtype, q.shape[-1]):
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out[0], out[1]
    if q.device.type == "cpu" and q.dtype == torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # fp32 reference path (fp32 on GPU)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys/values [B, Hkv, S, D] expanded to the query's head count (grouped-query attention)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention over packed sequences: q [Tq, H, D], k/v [Tk, Hkv, D] (heads grouped natively),
    sequence i = rows cu[i]:cu[i+1]; causal is top-left aligned. Output [Tq, H, D] and lse [H, Tq] (fp32)."""
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def cascade_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed suffixes: [1, H, T, D], causal per question, all see the prefix.

    The suffixes of a batch arrive concatenated (no padding goes through the projections and the MLP).
    On CUDA in half precision both halves are varlen flash attention over the packed tokens themselves;
    elsewhere the suffixes' own attention runs laid out right-padded, [rows, width], and back.
    """
    ctx = _ACTIVE
    assert ctx is not None, "cascade attention runs only inside PrefixScorer"
    _, h, t, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    if ctx.varlen is not None:
        return _cascade_varlen(ctx, module.layer_idx, query, key, value, scale), None

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h', T, D] -> [rows, h', width, D]
        buf = x.new_zeros((ctx.rows * ctx.width, x.shape[1], d))
        buf.index_copy_(0, ctx.dest, x[0].transpose(0, 1))
        return buf.view(ctx.rows, ctx.width, x.shape[1], d).transpose(1, 2)

    assert ctx.dest is not None
    out_pad, lse_pad = _attn_lse(padded(query), repeat_heads(padded(key), h), repeat_heads(padded(value), h), True, scale)
    out_s = out_pad.transpose(1, 2).reshape(ctx.rows * ctx.width, h, d).index_select(0, ctx.dest)  # [T, H, D]
    if ctx.prefix is None:
        return out_s[None], None
    lse_s = lse_pad.transpose(1, 2).reshape(ctx.rows * ctx.width, h).index_select(0, ctx.dest)  # [T, H]
    pk, pv = ctx.prefix[module.layer_idx]
    out_p, lse_p = _attn_lse(query, pk, pv, False, scale)  # every token sees the whole prefix: one batch-1 call
    # softmax over [prefix ; own keys] = lerp of the two halves by the prefix's share of the total mass.
    share = torch.sigmoid(lse_p[0].transpose(0, 1) - lse_s)[..., None]
    out = torch.empty((1, t, h, d), dtype=query.dtype, device=query.device)
    torch.lerp(out_s, out_p[0].transpose(0, 1).to(query.dtype), share.to(query.dtype), out=out[0])
    return out, None


def _cascade_varlen(ctx: CascadeContext, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Both halves as varlen flash attention on the packed tokens: no padded copies, no head expansion.

    With `fresh_prefix` P the prefix itself is sequence 0 of the pass (its causal attention is the own
    half's first sequence) and the suffixes' prefix half reads its keys/values from this very layer, so a
    new group needs no pass of its own for the prefix (a small, inefficient pass per subject)."""
    assert ctx.varlen is not None
    cu, cu_all, cu_prefix = ctx.varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H(kv), D]: transformers' views, unpacked
    out_s, lse_s = varlen_flash(q, k, v, cu, cu, ctx.width, ctx.width, True, scale)
    p = ctx.fresh_prefix
    if p:
        pk, pv = k[:p].contiguous(), v[:p].contiguous()  # copies: a view would keep the pass's k/v alive
        assert ctx.store is not None and len(ctx.store) == layer
        ctx.store.append((pk, pv))
    elif ctx.prefix is not None:
        pk, pv = ctx.prefix[layer]
    else:
        return out_s[None]
    qs = q[p:]
    out_p, lse_p = varlen_flash(qs, pk, pv, cu_all, cu_prefix, qs.shape[0], pk.shape[0], False, scale)
    if not p:
        return merge_halves(out_s, out_p, lse_s, lse_p)[None]
    rest = out_s[p:]
    merge_halves(rest, out_p, lse_s[:, p:], lse_p, out=rest)  # in place; the prefix's rows are its own attention
    return out_s[None]


_MERGE_KERNEL = [True]  # off for good after a first failure (a machine whose Triton cannot build the kernel)


def merge_halves(out_s: torch.Tensor, out_p: torch.Tensor, lse_s: torch.Tensor, lse_p: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax over [prefix ; own keys] from its halves ([T, H, D] outputs, [H, T] log-sum-exps): a lerp
    by the prefix's share of the mass; one Triton kernel on CUDA (kb.engine.own_attention.lse_merge), else torch.
    `out` may be `out_s` (in place)."""
    if _MERGE_KERNEL[0] and triton_available(out_s.device, out_s.shape[-1]):
        try:
            return lse_merge(out_s, out_p, lse_s, lse_p, out=out)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"kb.engine.attention: the merge kernel failed ({str(err).splitlines()[0][:200]}); "
                          "using torch.lerp", stacklevel=2)
            _MERGE_KERNEL[0] = False
    share = torch.sigmoid(lse_p - lse_s).transpose(0, 1)[..., None]  # [T, H, 1]: the prefix's share of the mass
    if out is None:
        return torch.lerp(out_s, out_p.to(out_s.dtype), share.to(out_s.dtype))
    return torch.lerp(out_s, out_p.to(out_s.dtype), share.to(out_s.dtype), out=out)


def view_supported(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and getattr(layer, "is_initialized", False)
        and not getattr(layer, "record_past", False) for layer in layers)


def shared_view(cache: Any, rows: int) -> Any:
    """The prefix cache seen by `rows` rows: keys/values broadcast, concatenated per layer, never stored."""
    view = copy.copy(cache)  # shares the layer objects, so lengths and mask sizes read as the prefix's

    def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        layer = cache.layers[layer_idx]
        k = layer.keys.expand(rows, -1, -1, -1)
        v = layer.values.expand(rows, -1, -1, -1)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    view.update = update
    return view

