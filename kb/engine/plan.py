"""Batch planning: which questions go through the model together, and how many tokens a pass may hold.

Questions are length-sorted and cut into batches that trade padding against passes under a token
budget; the few-shot prefix that all questions of a group share is found here (the longest common
*token* prefix) so the scorer can run it once. Batches are planned over the whole question list,
deterministically, so a resumed run (or a rank of a multi-GPU run, kb/distributed.py) recomputes
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kb.engine.attention import cascade_supported, model_flash_supported
from kb.engine.decode import use_decoder
from kb.engine.memory import usable_cuda_bytes
from kb.models import LoadedModel, attention_dims, text_config

MIN_SHARED_PREFIX = 8  # tokens; below this a prefix cache is not worth its bookkeeping
BATCH_OVERHEAD_TOKENS = 256  # least fixed cost of one forward pass, in padded tokens; the planner trades the two


@dataclass(frozen=True)
class Batch:
    """Questions (indices into the stage's list) that go through the model together."""

    indices: tuple[int, ...]
    group: str
    prefix_len: int  # shared prefix tokens served from the group's KV cache (0 = none)

    def key(self) -> str:
        return f"{self.group}:{self.indices[0]}:{len(self.indices)}"


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

    The whole plan as a list; `iter_batches` yields the same batches group by group (a group's batches
    are known once its prompts are encoded, kb.engine.tokens.TokenStream).
    """
    return list(iter_batches(token_lists, groups, batch_size, max_batch_tokens, share_prefix, copies=copies,
                             extra_tokens=extra_tokens, overhead_tokens=overhead_tokens))


def iter_batches(
    token_lists: Sequence[Sequence[int]], groups: Sequence[str], batch_size: int, max_batch_tokens: int,
    share_prefix: bool = True, *, copies: int = 1, extra_tokens: int = 0, overhead_tokens: int | None = None,
) -> Iterator[Batch]:
    """plan_batches, lazily: groups in order of first appearance, each group's batches in plan order.

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
    for g, idx in order.items():
        p = common_prefix_len([token_lists[i] for i in idx]) if share_prefix else 0
        idx = sorted(idx, key=lambda i: (-len(token_lists[i]), i))
        lengths = np.array([len(token_lists[i]) for i in idx], dtype=np.int64)
        for a, b in _cut_points(lengths, p, batch_size, max_batch_tokens, copies, extra_tokens, overhead):
            yield Batch(tuple(idx[a:b]), g, p)


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
    free = usable_cuda_bytes()  # with this process's cached, reusable blocks; KB_GPU_SHARE caps it
    per_token = token_bytes(text_config(model), next(model.parameters()).dtype.itemsize, generation,
                            decoder=generation and use_decoder(model))
    return max(512, int(free * fraction / per_token))


def token_bytes(cfg: Any, itemsize: int, generation: bool, decoder: bool = False) -> int:
    """GPU memory one token of a batch holds (auto_token_budget's unit), for weights of `itemsize` bytes.

    transformers' generate also keeps fp32 logits over the whole vocabulary for the tokens it scores (and
    a copy for the sampling processors): with Gemma-3's 262k-token vocabulary that is 2 MB a token, more
    than all of its keys and values; leaving it out let a state query on a shared GPU run out of memory.
    The device decoder (`decoder`) holds logits per sequence, not per token, and sizes its own slots from
    free memory (kb.engine.graph.fitting_slots), so its batches are cut by keys/values and activations only:
    SmolLM2's ParaRel probe then runs in 2 batches instead of 10, each paying a graph capture and a tail."""
    layers = getattr(cfg, "num_hidden_layers", 32)
    _, kv_heads, head_dim = attention_dims(cfg)
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    kv_layer = 2 * kv_heads * head_dim * itemsize  # keys + values of one token in one layer
    act = 16 * cfg.hidden_size + 8 * inter  # the live activations of one token in one layer (bf16 + fp32 temps)
    if not generation:
        return 4 * kv_layer + act
    return layers * kv_layer + act + (0 if decoder else 2 * 4 * getattr(cfg, "vocab_size", 32000))


def pass_overhead_tokens(model: Any, *, cascade: bool | None = None, varlen: bool | None = None) -> int:
    """plan_batches' fixed cost of one scoring pass on this model and device, in padded suffix tokens.

    Calibrated on an H100 with a 7B model (bench/README.md): a pass costs ~0.43 ms per layer beyond its
    tokens, a token ~2 x params / 5e14 s (CPU: ~0.2 ms per layer, 1e11 FLOP/s). Under the cascade path
    (`cascade`, default: where the scorer takes it) padding only enters the suffixes' own attention, about
    1/20 of a token's cost, so passes weigh 20x more; with varlen flash attention (`varlen`, default: where
    it runs, kb.engine.scorer) padding enters nothing, so batches are cut as large as the budgets allow.
    """
    cfg = text_config(model)
    cuda = next(model.parameters()).device.type == "cuda"
    cascade = cascade_supported(model) if cascade is None else cascade
    varlen = cascade and model_flash_supported(model) if varlen is None else varlen
    params = sum(p.numel() for p in model.parameters())
    per_pass = getattr(cfg, "num_hidden_layers", 32) * (0.43e-3 if cuda else 0.2e-3)
    per_token = 2 * params / (5e14 if cuda else 1e11)
    tokens = per_pass / per_token * (1000 if cascade and varlen else 20 if cascade else 1)
    return int(min(max(tokens, 1), 1 << 20))


def token_budget(lm: LoadedModel, requested: int | None, generation: bool = True) -> int:
    """Tokens per forward pass: `requested`, else sized from free GPU memory (auto_token_budget).

    `generation=True` (the safe default) sizes for keeping every layer's KV cache; scoring needs far less."""
    if requested:
        return requested
    return auto_token_budget(lm.model, generation=generation)


def decode_step_tokens(model: Any) -> int | None:
    """What one decoding step of a batch costs, in padded prompt tokens, for plan_batches' cut points.

    CPU: about 35 tokens (SmolLM2-135M on 2 cores: 0.11 s per step of 16 rows, 3 ms per prompt token), so
    a long prompt gets a batch of its own instead of padding fifteen short ones (1.7x faster on 64 MMLU
    questions than the default, which assumes a GPU). GPU: decoding is launch-bound; keep the default.
    """
    return 32 if next(model.parameters()).device.type == "cpu" else None


def batch_seed(seed: int, batch: Batch) -> int:
    """A sampling seed fixed by the batch's identity, so resumed runs sample exactly as a full run."""
    return int(hashlib.sha256(f"{seed}|{batch.key()}".encode()).hexdigest()[:8], 16)

