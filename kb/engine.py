"""The probing engine: batched next-token scoring with a shared-prefix KV cache, and batched generation.

Why it is fast: one forward pass per MCQ question (not one per option, not a generate() call); the
few-shot prefix that all questions of a subject share is run once and its keys/values are reused by
every batch without being copied per row ("cascade" attention: each suffix token attends to the
shared prefix and to its own question separately, and the two softmax halves are merged exactly by
their log-sum-exp); a batch's suffixes are packed end to end, so no padding goes through the weights;
questions are length-sorted and cut into batches that trade padding against passes under a token
budget; only the last position goes through the LM head; inputs reach the device without host syncs
and results come back one batch behind (`score_many`), so the GPU never waits for Python. Models the
cascade path does not cover (sliding windows, softcapping) take a padded path that broadcasts the
prefix cache instead of copying it. Generation prefills each prompt once for its N samples and makes
its batches as large as memory allows (decoding is launch-bound).
Why it is exact: token sequences are exactly the full prompt's tokenisation (the shared prefix is the
longest common *token* prefix); positions are explicit, so padding and the prefix split change
nothing but float rounding; tests compare every path with the one-at-a-time forward.

Batches are planned over the whole question list, deterministically, so a resumed run (or a rank of a
multi-GPU run, kb/distributed.py) recomputes exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import copy
import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kb.data import LETTERS
from kb.models import text_config

MIN_SHARED_PREFIX = 8  # tokens; below this a prefix cache is not worth its bookkeeping
BATCH_OVERHEAD_TOKENS = 256  # least fixed cost of one forward pass, in padded tokens; the planner trades the two
CASCADE = "kb_cascade"  # name under which the cascade attention is registered with transformers
# Model families whose CausalLM logits are exactly lm_head(last hidden state) and whose attention is
# plain scaled dot-product (no softcapping, no sinks): the cascade path computes them itself.
CASCADE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "phi3"}


@dataclass(frozen=True)
class Batch:
    indices: tuple[int, ...]
    group: str
    prefix_len: int  # shared prefix tokens served from the group's KV cache (0 = none)

    def key(self) -> str:
        return f"{self.group}:{self.indices[0]}:{len(self.indices)}"


def letter_candidates(tokenizer: Any, n: int = len(LETTERS), rule: str = "summed_variants") -> list[list[int]]:
    """Token ids that count as each letter under `rule` (kb.prompts.letter_rule).

    summed_variants: the single tokens spelling 'A' and ' A' (after a chat header or "Answer: ").
    harness: the one token lm-evaluation-harness scores as the continuation " A" after "Answer:"
    (the tokens "Answer: A" adds to "Answer:"). A tokenizer that spells that continuation with more than
    one token (Gemma-3's GGUF tokenizer under transformers 5.17 does) gets the summed variants instead."""
    if rule not in ("harness", "summed_variants"):
        raise ValueError(f"unknown letter rule {rule!r}")
    out = []
    for letter in LETTERS[:n]:
        ids: list[int] = []
        if rule == "harness":
            ctx = tokenizer.encode("Answer:", add_special_tokens=False)
            whole = tokenizer.encode("Answer: " + letter, add_special_tokens=False)
            if whole[:len(ctx)] == ctx and len(whole) == len(ctx) + 1:
                ids.append(whole[-1])
            else:
                return letter_candidates(tokenizer, n, "summed_variants")
        else:
            for text in (letter, " " + letter):
                toks = tokenizer.encode(text, add_special_tokens=False)
                if len(toks) == 1 and toks[0] not in ids:
                    ids.append(toks[0])
        if not ids:
            raise ValueError(f"tokenizer has no single token for letter {letter!r}")
        out.append(ids)
    return out


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix, leaving at least one token of each sequence to score."""
    if len(seqs) < 2:
        return 0
    try:  # the common prefix of a set is that of its lexicographic min and max: two C-level scans
        lo, hi = min(seqs), max(seqs)  # type: ignore[type-var]
    except TypeError:  # mixed lists and tuples do not compare
        as_lists = [list(s) for s in seqs]
        lo, hi = min(as_lists), max(as_lists)
    n = min(len(s) for s in seqs) - 1
    i = 0
    while i < n and lo[i] == hi[i]:
        i += 1
    return i if i >= MIN_SHARED_PREFIX else 0


def plan_batches(
    token_lists: Sequence[Sequence[int]], groups: Sequence[str], batch_size: int, max_batch_tokens: int,
    share_prefix: bool = True, *, copies: int = 1, extra_tokens: int = 0, overhead_tokens: int | None = None,
) -> list[Batch]:
    """Group by `groups` (subject), share each group's prefix, sort by length, cut under the budgets.

    A batch holds at most `batch_size` rows and `rows * copies * (longest + extra_tokens)` tokens at most
    `max_batch_tokens` (generation: `copies` samples per question, `extra_tokens` new tokens each); a
    single row is always allowed. Within those limits the cut points minimise padded suffix tokens plus a
    fixed cost per pass (exact dynamic programming over the length-sorted rows). That cost defaults to
    1/32 of the budget (at least BATCH_OVERHEAD_TOKENS): a large budget means a fast device, whose passes
    must be big to keep it busy; generation pays it again for every new token.
    """
    if overhead_tokens is None:
        overhead_tokens = max(BATCH_OVERHEAD_TOKENS, max_batch_tokens // 32)
    overhead = overhead_tokens * (1 + extra_tokens)
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g if share_prefix else "", []).append(i)
    batches = []
    for g, idx in order.items():
        p = common_prefix_len([token_lists[i] for i in idx]) if share_prefix else 0
        idx = sorted(idx, key=lambda i: (-len(token_lists[i]), i))
        lengths = np.array([len(token_lists[i]) for i in idx], dtype=np.int64)
        for a, b in _cut_points(lengths, p, batch_size, max_batch_tokens, copies, extra_tokens, overhead):
            batches.append(Batch(tuple(idx[a:b]), g, p))
    return batches


def _cut_points(lengths: np.ndarray, prefix_len: int, batch_size: int, budget: int, copies: int,
                extra: int, overhead: int) -> list[tuple[int, int]]:
    """Optimal contiguous segmentation of descending `lengths` (the first row of a segment is its width)."""
    n = len(lengths)
    per_row = np.maximum(1, copies * (lengths + extra))
    cap = np.clip(budget // per_row, 1, max(1, batch_size))  # rows a batch starting at a may hold
    width = lengths - prefix_len
    best = np.zeros(n + 1, dtype=np.float64)
    back = np.zeros(n + 1, dtype=np.int64)
    longest = int(cap.max()) if n else 1
    for b in range(1, n + 1):
        a = np.arange(max(0, b - longest), b)
        rows = b - a
        ok = rows <= cap[a]
        cost = np.where(ok, best[a] + rows * width[a] + overhead, np.inf)
        k = int(np.argmin(cost))  # ties: the earliest start, i.e. the larger batch
        best[b], back[b] = cost[k], a[k]
    cuts, b = [], n
    while b > 0:
        cuts.append((int(back[b]), b))
        b = int(back[b])
    return cuts[::-1]


def auto_token_budget(model: Any, *, generation: bool = False, fraction: float | None = None) -> int:
    """Tokens per forward pass that fit in free GPU memory (plan_batches' `max_batch_tokens`).

    Scoring holds one layer's keys/values and activations at a time; generation holds every layer's
    keys/values for every token until the batch ends, so it gets a budget several times smaller. The
    default fraction of free memory (0.45 scoring, 0.6 generation: decoding is launch-bound, so bigger
    batches are nearly free) leaves room for the allocator; an OOM still splits the batch and retries.
    """
    fraction = fraction if fraction is not None else (0.6 if generation else 0.45)
    if next(model.parameters()).device.type != "cuda":
        return 16384
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # this process's cached, reusable blocks
    cfg = text_config(model)
    layers = getattr(cfg, "num_hidden_layers", 32)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 32)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    kv_layer = 2 * kv_heads * head_dim * 2  # bf16 keys + values of one token in one layer
    act = 16 * cfg.hidden_size + 8 * inter  # the live activations of one token in one layer (bf16 + fp32 temps)
    per_token = layers * kv_layer + act if generation else 4 * kv_layer + act
    return max(512, int(free * fraction / per_token))


def pass_overhead_tokens(model: Any) -> int:
    """plan_batches' fixed cost of one scoring pass on this model and device, in padded suffix tokens.

    Calibrated on an H100 with a 7B model (bench/README.md): a pass costs ~0.43 ms per layer beyond its
    tokens, a token ~2 x params / 5e14 s (CPU: ~0.2 ms per layer, 1e11 FLOP/s). Under the cascade path
    padding only enters the suffixes' own attention, about 1/20 of a token's cost, so passes weigh 20x more.
    """
    cfg = text_config(model)
    cuda = next(model.parameters()).device.type == "cuda"
    params = sum(p.numel() for p in model.parameters())
    per_pass = getattr(cfg, "num_hidden_layers", 32) * (0.43e-3 if cuda else 0.2e-3)
    per_token = 2 * params / (5e14 if cuda else 1e11)
    tokens = per_pass / per_token * (20 if cascade_supported(model) else 1)
    return int(min(max(tokens, 1), 1 << 20))


def _decoder(model: Any) -> Any:
    getter = getattr(model, "get_decoder", None)
    dec = getter() if getter else None
    return dec if dec is not None else model.base_model


# ----------------------------------------------------------------------------------------------------
# Cascade attention: softmax over [prefix keys ; own keys] computed as two attentions merged by LSE.


@dataclass
class _CascadeContext:
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys, values [1, H, P, D] (heads expanded)
    dest: torch.Tensor  # [T]: where each packed token sits in the [rows * width] right-padded layout
    rows: int
    width: int


_ACTIVE: _CascadeContext | None = None


def _attn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, L, D] and its log-sum-exp [B, H, L] (fp32); causal is top-left aligned (L == S)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
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


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def cascade_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed suffixes: [1, H, T, D], causal per question, all see the prefix.

    The suffixes of a batch arrive concatenated (no padding goes through the projections and the MLP);
    only for their own causal attention are they laid out right-padded, [rows, width], and back.
    """
    ctx = _ACTIVE
    assert ctx is not None, "cascade attention runs only inside PrefixScorer"
    _, h, t, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h', T, D] -> [rows, h', width, D]
        buf = x.new_zeros((ctx.rows * ctx.width, x.shape[1], d))
        buf.index_copy_(0, ctx.dest, x[0].transpose(0, 1))
        return buf.view(ctx.rows, ctx.width, x.shape[1], d).transpose(1, 2)

    out_pad, lse_pad = _attn_lse(padded(query), _repeat_heads(padded(key), h), _repeat_heads(padded(value), h), True, scale)
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


_REGISTERED: set[str] = set()


def register_attention(name: str, fn: Any) -> None:
    """Make `fn` selectable as attn_implementation `name` in transformers (once per process)."""
    if name not in _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(name, fn)
        _REGISTERED.add(name)


def cascade_supported(model: Any) -> bool:
    """Whether the cascade path computes exactly this model's function (else the KV-view path is used)."""
    return plain_attention_model(model, CASCADE_MODEL_TYPES)


def plain_attention_model(model: Any, model_types: set[str] | frozenset[str]) -> bool:
    """A model of one of `model_types` with full causal attention everywhere (no sliding window, no logit
    softcapping, sdpa or eager attention) and a separate output head: what kb's own attention paths
    (the cascade scorer, kb.decode) reproduce exactly."""
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
    dec = _decoder(model)
    return hasattr(dec, "layers") and model.get_output_embeddings() is not None


def _view_supported(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and getattr(layer, "is_initialized", False)
        and not getattr(layer, "record_past", False) for layer in layers)


def _shared_view(cache: Any, rows: int) -> Any:
    """The prefix cache seen by `rows` rows: keys/values broadcast, concatenated per layer, never stored."""
    view = copy.copy(cache)  # shares the layer objects, so lengths and mask sizes read as the prefix's

    def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        layer = cache.layers[layer_idx]
        k = layer.keys.expand(rows, -1, -1, -1)
        v = layer.values.expand(rows, -1, -1, -1)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    view.update = update
    return view


class _Pending:
    """Results of a launched batch, copied to pinned host memory behind an event: wait only for this batch."""

    def __init__(self, logp: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.event = None
        if logp.is_cuda:
            self.logp = torch.empty(logp.shape, dtype=logp.dtype, pin_memory=True)
            self.logp.copy_(logp, non_blocking=True)
            self.hidden = None
            if hidden is not None:
                self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                self.hidden.copy_(hidden, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.logp, self.hidden = logp, hidden

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.logp, self.hidden


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without a stream sync (pageable copies wait for all queued GPU work)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _pack(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """[B, W] ids and 0/1 mask, padded left (last token at -1) or right; also the row lengths."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lens.max())
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, s in enumerate(rows):
        n = len(s)
        if left:
            ids[r, width - n:] = s
            mask[r, width - n:] = 1
        else:
            ids[r, :n] = s
            mask[r, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask), lens


class PrefixScorer:
    """Next-token log-probs (and last-layer states) at the end of each prompt.

    `mode`: "auto" (cascade where the model family allows it, else the KV view), "cascade", "view"
    (prefix keys/values broadcast and concatenated per layer) or "copy" (the prefix cache deep-copied and
    repeated per batch: the slow path, kept as the reference and for unusual cache types).
    """

    def __init__(self, model: Any, pad_id: int, mode: str = "auto") -> None:
        if mode not in {"auto", "cascade", "view", "copy"}:
            raise ValueError(f"unknown PrefixScorer mode {mode!r}")
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        if mode == "auto":
            mode = "cascade" if cascade_supported(model) else "view"
        elif mode == "cascade" and not cascade_supported(model):
            raise ValueError(f"cascade attention does not support model type {model.config.model_type!r}")
        self.mode = mode
        if mode == "cascade":
            register_attention(CASCADE, cascade_attention)
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_cache: Any = None
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def _prefix(self, ids: Sequence[int]) -> Any:
        key = tuple(ids)
        if key != self._prefix_key:
            self._prefix_cache = self._prefix_kv = None  # free the old cache before building the next one
            x = _to_device(torch.tensor([list(ids)]), self.device)
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            self._prefix_key, self._prefix_cache = key, out.past_key_values
            if self.mode == "view" and not _view_supported(self._prefix_cache):
                self.mode = "copy"
            if self.mode == "cascade":
                heads = self.model.config.num_attention_heads
                self._prefix_kv = [(_repeat_heads(layer.keys, heads), _repeat_heads(layer.values, heads))
                                   for layer in self._prefix_cache.layers]
        return self._prefix_cache

    @torch.inference_mode()
    def score(
        self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None = None,
        want_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return float32 log-probs at the last position ([B, V] or [B, K] for candidates) and [B, H] states."""
        return _Pending(*self._launch(seqs, prefix_len, candidate_ids, want_hidden)).result()

    @torch.inference_mode()
    def score_many(
        self, jobs: Iterable[tuple[Sequence[Sequence[int]], int]], candidate_ids: Sequence[int] | None = None,
        want_hidden: bool = False, lookahead: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """`score` over (seqs, prefix_len) jobs, in order; the next batch is queued before a result is read."""
        queue: deque[_Pending] = deque()
        for seqs, prefix_len in jobs:
            queue.append(_Pending(*self._launch(seqs, prefix_len, candidate_ids, want_hidden)))
            if len(queue) > lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def _launch(self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None,
                want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            return self._forward(seqs, prefix_len, candidate_ids, want_hidden)
        except torch.cuda.OutOfMemoryError:
            if len(seqs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(seqs) // 2  # memory-aware fallback: split and retry
            a = self._launch(seqs[:half], prefix_len, candidate_ids, want_hidden)
            b = self._launch(seqs[half:], prefix_len, candidate_ids, want_hidden)
            hid = torch.cat([a[1], b[1]]) if want_hidden else None  # type: ignore[list-item]
            return torch.cat([a[0], b[0]]), hid

    def _candidates(self, logits: torch.Tensor, candidate_ids: Sequence[int] | None) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        if candidate_ids is None:
            return logp
        key = tuple(candidate_ids)
        if key not in self._index:
            self._index[key] = _to_device(torch.tensor(key, dtype=torch.long), self.device)
        return logp.index_select(1, self._index[key])

    def _forward(self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None,
                 want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "cascade":
            return self._forward_cascade(seqs, prefix_len, candidate_ids, want_hidden)
        b = len(seqs)
        # Right padding with explicit positions: each row's real tokens sit right after the prefix in cache
        # order too, so sliding-window layers (which mask by cache index) see exactly the unpadded sequence.
        ids, mask, lens = _pack([s[prefix_len:] for s in seqs], self.pad_id, left=False)
        pos = torch.arange(ids.shape[1]).expand(b, -1) + prefix_len
        last = _to_device(torch.from_numpy(lens - 1), self.device)
        kwargs: dict[str, Any] = {}
        if prefix_len:
            cache = self._prefix(seqs[0][:prefix_len])
            if self.mode == "view":
                cache = _shared_view(cache, b)
            else:
                cache = copy.deepcopy(cache)
                cache.batch_repeat_interleave(b)
            kwargs["past_key_values"] = cache
            mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long), mask], dim=1)
        captured: list[torch.Tensor] = []

        def gather(_m: Any, _i: Any, out: Any) -> Any:
            # Hand the LM head each row's last real token as position -1 (logits_to_keep=1 then reads it).
            h = out[0] if isinstance(out, tuple) else out.last_hidden_state
            h = h[torch.arange(b, device=h.device), last][:, None]
            captured.append(h[:, 0])
            if isinstance(out, tuple):
                return (h, *out[1:])
            out.last_hidden_state = h
            return out

        hook = _decoder(self.model).register_forward_hook(gather)
        try:
            out = self.model(
                input_ids=_to_device(ids, self.device), attention_mask=_to_device(mask, self.device),
                position_ids=_to_device(pos, self.device), use_cache=bool(prefix_len), logits_to_keep=1, **kwargs,
            )
        finally:
            hook.remove()
        logp = self._candidates(out.logits[:, -1], candidate_ids)
        return logp, (captured[0].float() if want_hidden else None)

    def _forward_cascade(self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None,
                         want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        global _ACTIVE
        prefix_kv = None
        if prefix_len:
            self._prefix(seqs[0][:prefix_len])
            prefix_kv = self._prefix_kv
        suffixes = [s[prefix_len:] for s in seqs]
        lens = np.fromiter((len(x) for x in suffixes), dtype=np.int64, count=len(suffixes))
        width = int(lens.max())
        ids = torch.from_numpy(np.fromiter((t for x in suffixes for t in x), dtype=np.int64, count=int(lens.sum())))
        pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]) + prefix_len)
        dest = torch.from_numpy(np.concatenate([r * width + np.arange(n) for r, n in enumerate(lens)]))
        last = torch.from_numpy(np.cumsum(lens) - 1)
        cfg = self.model.config
        saved = cfg._attn_implementation
        _ACTIVE = _CascadeContext(prefix_kv, _to_device(dest, self.device), len(seqs), width)
        cfg._attn_implementation = CASCADE
        try:
            out = _decoder(self.model)(input_ids=_to_device(ids[None], self.device),
                                       position_ids=_to_device(pos[None], self.device), use_cache=False)
        finally:
            cfg._attn_implementation = saved
            _ACTIVE = None
        h = out.last_hidden_state[0].index_select(0, _to_device(last, self.device))
        logits = self.model.get_output_embeddings()(h)
        return self._candidates(logits, candidate_ids), (h.float() if want_hidden else None)


def letter_probs(logp: torch.Tensor, candidates: list[list[int]], n_choices: Sequence[int]) -> list[list[float]]:
    """Sum each letter's token variants (one under the harness rule), keep the question's letters, renormalise.

    `logp` holds the log-probs of the flattened candidates (columns in `candidates` order)."""
    flat = [t for c in candidates for t in c]
    pos = {t: i for i, t in enumerate(flat)}
    n_letters = max(n_choices) if len(n_choices) else 0
    per = torch.stack([torch.logsumexp(logp[:, [pos[t] for t in candidates[k]]], dim=1) for k in range(n_letters)],
                      dim=1).double()
    n = torch.tensor(list(n_choices))
    per = per.masked_fill(torch.arange(n_letters)[None, :] >= n[:, None], float("-inf"))
    p = torch.softmax(per, dim=1)
    return [p[r, :k].tolist() for r, k in enumerate(n_choices)]


def batch_seed(seed: int, batch: Batch) -> int:
    """A sampling seed fixed by the batch's identity, so resumed runs sample exactly as a full run."""
    return int(hashlib.sha256(f"{seed}|{batch.key()}".encode()).hexdigest()[:8], 16)


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, *, do_sample: bool = False,
    temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0, want_scores: bool = False,
    stopping_criteria: Any = None,
) -> tuple[list[list[str]], list[list[float]] | None]:
    """Batched generation from token lists (left-padded): texts[q][k] and, greedy, mean token log-prob.

    With several return sequences the prompts are prefilled once and their cache shared by the samples.
    On GPU out-of-memory the questions are split in two and retried (the second half samples with seed+1).
    """
    try:
        return _generate(model, tokenizer, seqs, max_new_tokens, do_sample, temperature, num_return_sequences,
                         seed, want_scores, stopping_criteria)
    except torch.cuda.OutOfMemoryError:
        if len(seqs) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(seqs) // 2
        args = (max_new_tokens,)
        kw = dict(do_sample=do_sample, temperature=temperature, num_return_sequences=num_return_sequences,
                  want_scores=want_scores, stopping_criteria=stopping_criteria)
        ta, sa = generate(model, tokenizer, seqs[:half], *args, seed=seed, **kw)  # type: ignore[arg-type]
        tb, sb = generate(model, tokenizer, seqs[half:], *args, seed=seed + 1, **kw)  # type: ignore[arg-type]
        return ta + tb, (sa + sb if sa is not None and sb is not None else None)


def _generate(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool,
              temperature: float, n: int, seed: int, want_scores: bool,
              stopping_criteria: Any = None) -> tuple[list[list[str]], list[list[float]] | None]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids, mask, _ = _pack(seqs, pad, left=True)
    width = ids.shape[1]
    ids, mask = _to_device(ids, device), _to_device(mask, device)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, return_dict_in_generate=True,
        output_scores=want_scores,
    )
    if stopping_criteria is not None:  # e.g. kb.state's per-row stop once the cut answer is fixed
        gen_kwargs["stopping_criteria"] = stopping_criteria
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    if n > 1 and width > 1 and type(model).__module__.startswith("transformers."):
        # Prefill all but the last prompt token once, then let the n samples share that cache.
        pos = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, use_cache=True,
                    logits_to_keep=1)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(n)
        ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        gen_kwargs.update(past_key_values=cache, num_return_sequences=1)
    else:
        gen_kwargs.update(num_return_sequences=n)
    if do_sample:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    new = out.sequences[:, width:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    grouped = [texts[i * n:(i + 1) * n] for i in range(len(seqs))]
    mean_logp = None
    if want_scores:
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu().float()
        stop_ids = {pad, tokenizer.eos_token_id}
        flat_lp = []
        for r in range(new.shape[0]):
            keep = [j for j in range(new.shape[1]) if int(new[r, j]) not in stop_ids]
            flat_lp.append(float(scores[r, keep].mean()) if keep else None)
        mean_logp = [flat_lp[i * n:(i + 1) * n] for i in range(len(seqs))]
    return grouped, mean_logp  # type: ignore[return-value]
