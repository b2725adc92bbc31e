"""One decoding step of the device decoder: its attention and its on-device stop rule.

The step's attention reads each group's prompt keys/values once for its N samples (the prompt half)
and each row's generated keys/values (the own half), and merges the two softmax halves by their
log-sum-exp; every buffer is static, so on CUDA the step is captured once as a graph. The stop rule
turns kb.answers.answer_ended into per-token tables that `emit_tokens` checks on the device as it
records each step's token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kb.engine.attention import attention_as
from kb.engine.own_attention import own_half_merged

DECODE_ATTN = "kb_decode"  # name under which decode_attention is registered with transformers


@dataclass
class StopRule:
    """Per-token tables of the answer-end rule (kb.answers.answer_ended): a reply ends at the first '.' or
    newline after its first non-blank character. `ends` holds '.'/'\\n' anywhere, `ends_lead` the same
    after the token's leading blanks, `content` a non-blank character."""

    ends: torch.Tensor
    ends_lead: torch.Tensor
    content: torch.Tensor

    @classmethod
    def answer_end(cls, tokenizer: Any, vocab: int) -> StopRule:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ends, lead, content = (torch.zeros(vocab, dtype=torch.bool) for _ in range(3))
        texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))], skip_special_tokens=False)
        for i, s in enumerate(texts):
            if i in special:
                continue
            ends[i] = "." in s or "\n" in s
            st = s.lstrip()
            lead[i] = "." in st or "\n" in st
            content[i] = bool(st)
        return cls(ends, lead, content)

    def to(self, device: torch.device) -> StopRule:
        return StopRule(self.ends.to(device), self.ends_lead.to(device), self.content.to(device))


_RULES: dict[tuple[int, int], StopRule] = {}


def answer_end_rule(tokenizer: Any, model: Any) -> StopRule:
    """The answer-end StopRule of this tokenizer and head size (built once: it decodes every token)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    key = (id(tokenizer), vocab)
    if key not in _RULES:
        _RULES.clear()
        _RULES[key] = StopRule.answer_end(tokenizer, vocab)
    return _RULES[key]


@dataclass
class StepContext:
    """What decode_attention reads in one decoding step (set by `decode_step`, static buffers on CUDA)."""

    kp: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [G, P, Hkv, D]: the groups' prompt keys/values
    kg: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, T, Hkv, D]: every row's generated keys/values
    prompt_ok: torch.Tensor  # [G, 1, 1, P] bool
    own_ok: torch.Tensor  # [B, 1, 1, T] bool
    step: torch.Tensor  # [B] long: where this step's key/value goes in its row
    rows: torch.Tensor  # [B] arange
    n: int
    write_at: torch.Tensor  # [B] long: row * T + step, this step's slot in the flattened [B * T] buffer
    fused: bool = False  # CUDA: the fused memory-efficient attention kernel for both halves
    prompt_bias: torch.Tensor | None = None  # [G, 1, 1, P] 0 / -inf (fused)
    own_bias: torch.Tensor | None = None  # [B, 1, 1, T] 0 / -inf (fused)
    flash: FlashIndex | None = None  # CUDA bf16/fp16: flash attention over the used keys only (replaces fused)


@dataclass
class FlashIndex:
    """Where each varlen sequence of the flash path starts and how many keys it uses (int32, static buffers).

    The buffers are [rows, length, Hkv, D], so row r's keys start at r * length; `seqused_k` tells the
    kernel how many of them are real, so a step reads the prompt's true length and the tokens generated
    so far, never the padding (the fused path reads whole buffers and masks them)."""

    prompt_q: torch.Tensor  # [G + 1]: g * n (the n samples of group g query its prompt together)
    prompt_k: torch.Tensor  # [G + 1]: g * P
    prompt_used: torch.Tensor  # [G]: each prompt's length
    own_q: torch.Tensor  # [B + 1]: r
    own_k: torch.Tensor  # [B + 1]: r * T
    own_used: torch.Tensor  # [B]: step + 1
    own_kernel: bool = False  # the own half through kb.engine.own_attention's kernel instead of flash

    @classmethod
    def alloc(cls, g: int, n: int, p: int, t: int, device: torch.device, own_kernel: bool = False) -> FlashIndex:
        i32 = dict(dtype=torch.int32, device=device)
        b = g * n
        return cls(torch.arange(g + 1, **i32) * n, torch.arange(g + 1, **i32) * p, torch.ones(g, **i32),
                   torch.arange(b + 1, **i32), torch.arange(b + 1, **i32) * t, torch.ones(b, **i32), own_kernel)


_ACTIVE: StepContext | None = None


@contextmanager
def decode_step(model: Any, ctx: StepContext) -> Iterator[None]:
    """Route `model`'s attention through decode_attention over `ctx` for one decoding step."""
    global _ACTIVE
    _ACTIVE = ctx
    try:
        with attention_as(model, DECODE_ATTN):
            yield
    finally:
        _ACTIVE = None


def emit_tokens(st: dict[str, Any], rows: torch.Tensor | None, nxt: torch.Tensor, lp: torch.Tensor | None,
                index: torch.Tensor) -> None:
    """Record token `nxt` at `index` for the still-active rows of the decoder state `st` (all `rows` when None)
    and update the stop flags: stop tokens, the length limit and the stop rule, all on the device."""
    sel = (lambda x: x) if rows is None else (lambda x: x[rows])
    done = sel(st["done"])
    is_stop = torch.isin(nxt, st["stops"])
    keep = ~done & ~is_stop
    trash = st["max_new"]
    col = torch.where(keep, index, torch.full_like(index, trash))
    r = st["rows"] if rows is None else rows
    st["out_tok"][r, col] = nxt
    if lp is not None:
        st["out_lp"][r, col] = lp
    length = sel(st["length"]) + keep.long()
    ended = is_stop | (index + 1 >= st["max_new"])
    rule = st["rule"]
    if rule is not None:
        seen = sel(st["seen"])
        ended = ended | (keep & torch.where(seen, rule.ends[nxt], rule.ends_lead[nxt]))
        seen = seen | (keep & rule.content[nxt])
    new_done = done | ended
    if rows is None:
        st["length"].copy_(length)
        st["done"].copy_(new_done)
        if rule is not None:
            st["seen"].copy_(seen)
        st["tok"].copy_(torch.where(new_done, st["tok"], nxt))
    else:
        st["length"][rows] = length
        st["done"][rows] = new_done
        if rule is not None:
            st["seen"][rows] = seen
        st["tok"][rows] = nxt


def _masked_lse(s: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    return e, m[..., 0], e.sum(-1)


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for one decoding step: query [B, H, 1, D], this step's key/value [B, Hkv, 1, D]."""
    ctx = _ACTIVE
    assert ctx is not None, "decode attention runs only inside Decoder"
    b, h, _, d = query.shape
    hkv = key.shape[1]
    rep, n, g = h // hkv, ctx.n, b // ctx.n
    scale = scaling if scaling is not None else d ** -0.5
    kg, vg = ctx.kg[module.layer_idx]
    kp, vp = ctx.kp[module.layer_idx]
    if ctx.flash is not None and ctx.flash.own_kernel:  # the kernel writes this step's key/value itself
        return _flash_own_kernel(ctx.flash, query, key, value, kp, vp, kg, vg, n, scale), None
    kg.view(-1, hkv * d).index_copy_(0, ctx.write_at, key.reshape(b, hkv * d))  # one contiguous row per sequence
    vg.view(-1, hkv * d).index_copy_(0, ctx.write_at, value.reshape(b, hkv * d))
    if ctx.flash is not None:
        return _flash_halves(ctx.flash, query, kp, vp, kg, vg, n, scale), None
    kp, vp, kg, vg = (x.transpose(1, 2) for x in (kp, vp, kg, vg))  # [rows, Hkv, length, D] views
    qg = query.view(g, n, hkv, rep, d).permute(0, 2, 1, 3, 4).reshape(g, hkv, n * rep, d)
    if ctx.fused:
        return _fused_halves(ctx, query, qg, kp, vp, kg, vg, scale), None
    # Prompt half: the N samples of a group and the heads sharing a key head read that prompt once.
    ep, mp, sp = _masked_lse(torch.matmul(qg, kp.transpose(-1, -2)).float() * scale, ctx.prompt_ok)
    op = torch.matmul(ep.to(vp.dtype), vp).float()  # [G, Hkv, n*rep, D]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [G, Hkv, n*rep, ...] -> [B, Hkv, rep, ...]
        return x.view(g, hkv, n, rep, *x.shape[3:]).transpose(1, 2).reshape(b, hkv, rep, *x.shape[3:])

    op, mp, sp = rows(op), rows(mp), rows(sp)
    # Own half: each row's generated tokens, this one included.
    qo = query.view(b, hkv, rep, d)
    eo, mo, so = _masked_lse(torch.matmul(qo, kg.transpose(-1, -2)).float() * scale, ctx.own_ok)
    oo = torch.matmul(eo.to(vg.dtype), vg).float()
    m = torch.maximum(mp, mo)
    wp, wo = torch.exp(mp - m), torch.exp(mo - m)
    out = (op * wp[..., None] + oo * wo[..., None]) / (sp * wp + so * wo)[..., None]
    return out.to(query.dtype).reshape(b, 1, h, d), None


def _fused_halves(ctx: StepContext, query: torch.Tensor, qg: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
                  kg: torch.Tensor, vg: torch.Tensor, scale: float) -> torch.Tensor:
    """Both halves through the fused memory-efficient kernel (queries of a key head folded into its rows)."""
    b, h, _, d = query.shape
    g, hkv, nr, _ = qg.shape
    rep, n = h // hkv, ctx.n
    eff = torch.ops.aten._scaled_dot_product_efficient_attention
    assert ctx.prompt_bias is not None and ctx.own_bias is not None
    bp = ctx.prompt_bias.expand(g, hkv, nr, kp.shape[2])
    op, lp, _, _ = eff(qg, kp, vp, bp, True, 0.0, False, scale=scale)  # [G, Hkv, n*rep, D], [G, Hkv, >= n*rep]
    qo = query.view(b, hkv, rep, d)
    bo = ctx.own_bias.expand(b, hkv, rep, kg.shape[2])
    oo, lo, _, _ = eff(qo, kg, vg, bo, True, 0.0, False, scale=scale)  # [B, Hkv, rep, D], [B, Hkv, >= rep]
    op = op.view(g, hkv, n, rep, d).transpose(1, 2).reshape(b, hkv, rep, d)
    lp = lp[:, :, :nr].reshape(g, hkv, n, rep).transpose(1, 2).reshape(b, hkv, rep)
    share = torch.sigmoid(lp - lo[:, :, :rep])[..., None]  # the prompt's share of the softmax mass
    out = torch.lerp(oo.float(), op.float(), share)
    return out.to(query.dtype).reshape(b, 1, h, d)


def _prompt_half(ix: FlashIndex, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, n: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's n queries over its prompt's used keys (varlen flash): output [B, H, D], lse [H, B]."""
    g, p, hkv, d = kp.shape
    fa = torch.ops.aten._flash_attention_forward
    out, lse = fa(q, kp.view(g * p, hkv, d), vp.view(g * p, hkv, d), ix.prompt_q, ix.prompt_k, n, p, 0.0, False,
                  False, scale=scale, seqused_k=ix.prompt_used)[:2]
    return out, lse


def _flash_halves(ix: FlashIndex, query: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, kg: torch.Tensor,
                  vg: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Both halves as varlen flash attention: each group's n queries over its prompt, each row's query over
    its own tokens so far; keys are read up to their used length (FlashIndex), heads grouped natively."""
    b, h, _, d = query.shape
    hkv, t = kg.shape[2], kg.shape[1]
    q = query[:, :, 0]  # [B, H, D]: rows are group-major, so group g's n queries are contiguous
    op, lp = _prompt_half(ix, q, kp, vp, n, scale)
    oo, lo = torch.ops.aten._flash_attention_forward(
        q, kg.view(b * t, hkv, d), vg.view(b * t, hkv, d), ix.own_q, ix.own_k, 1, t, 0.0, False, False,
        scale=scale, seqused_k=ix.own_used)[:2]
    share = torch.sigmoid(lp - lo).transpose(0, 1)[..., None]  # [B, H, 1]: the prompt's share of the softmax mass
    out = torch.lerp(oo.float(), op.float(), share)
    return out.to(query.dtype).reshape(b, 1, h, d)


def _flash_own_kernel(ix: FlashIndex, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kp: torch.Tensor,
                      vp: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """The prompt half by varlen flash attention; the own half, this step's key/value write and the merge
    of the halves in kb.engine.own_attention's kernel (one query per row and head: a matrix-vector pass)."""
    b, h, _, d = query.shape
    q = query[:, :, 0]
    op, lp = _prompt_half(ix, q, kp, vp, n, scale)
    k_new, v_new = key[:, :, 0], value[:, :, 0]  # [B, Hkv, D]
    if k_new.stride() != v_new.stride() or k_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    return own_half_merged(q, k_new, v_new, kg, vg, ix.own_used, op, lp, scale).reshape(b, 1, h, d)
