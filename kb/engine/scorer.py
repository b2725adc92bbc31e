"""The prefix scorer: next-token log-probs (and last-layer states) at the end of each prompt, batched.

Why it is fast: one forward pass per MCQ question (not one per option, not a generate() call); the
few-shot prefix that all questions of a group share is run once and its keys/values are reused by
every batch without being copied per row (cascade attention, kb.engine.attention); a batch's suffixes
are packed end to end, so no padding goes through the weights; only the last position goes through the
LM head; inputs reach the device without host syncs and results come back one batch behind
(`score_many`), so the GPU never waits for Python. Models the cascade path does not cover (sliding
windows, softcapping) take a padded path that broadcasts the prefix cache instead of copying it.
Why it is exact: token sequences are exactly the full prompt's tokenisation (the shared prefix is the
longest common *token* prefix, kb.engine.plan); positions are explicit, so padding and the prefix split
change nothing but float rounding; tests compare every path with the one-at-a-time forward.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kb.engine.attention import (
    CASCADE,
    CascadeContext,
    cascade,
    cascade_attention,
    cascade_supported,
    decoder_stack,
    model_flash_supported,
    register_attention,
    repeat_heads,
    shared_view,
    view_supported,
)
from kb.engine.fused import Fusion


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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without a stream sync (pageable copies wait for all queued GPU work)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def pack(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
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
    repeated per batch: the slow path, kept as the reference and for unusual cache types). `fused_kernels`
    (default: where kb.engine.fused supports the model) runs the layers' element-wise work as its kernels;
    `varlen` (default: where flash attention runs, CUDA in half precision) runs the cascade's attention as
    varlen flash attention on the packed tokens instead of through a padded copy of each layer's q/k/v.
    """

    def __init__(self, model: Any, pad_id: int, mode: str = "auto", fused_kernels: bool | None = None,
                 varlen: bool | None = None) -> None:
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
        self.fusion = Fusion(model, fused_kernels)  # RMSNorm, RoPE, SiLU·up as Triton kernels (CUDA, Llama family)
        can_varlen = model_flash_supported(model)
        if varlen and not can_varlen:
            raise ValueError("varlen cascade attention needs flash attention: CUDA, half precision")
        self.varlen = mode == "cascade" and can_varlen and varlen is not False
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
            x = to_device(torch.tensor([list(ids)]), self.device)
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            self._prefix_key, self._prefix_cache = key, out.past_key_values
            if self.mode == "view" and not view_supported(self._prefix_cache):
                self.mode = "copy"
            if self.mode == "cascade":  # (varlen runs a new prefix inside its first pass, never here)
                heads = self.model.config.num_attention_heads
                self._prefix_kv = [(repeat_heads(layer.keys, heads), repeat_heads(layer.values, heads))
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
            return self.fusion.run(self._forward, seqs, prefix_len, candidate_ids, want_hidden)
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
            self._index[key] = to_device(torch.tensor(key, dtype=torch.long), self.device)
        return logp.index_select(1, self._index[key])

    def _forward(self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None,
                 want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "cascade":
            return self._forward_cascade(seqs, prefix_len, candidate_ids, want_hidden)
        b = len(seqs)
        # Right padding with explicit positions: each row's real tokens sit right after the prefix in cache
        # order too, so sliding-window layers (which mask by cache index) see exactly the unpadded sequence.
        ids, mask, lens = pack([s[prefix_len:] for s in seqs], self.pad_id, left=False)
        pos = torch.arange(ids.shape[1]).expand(b, -1) + prefix_len
        last = to_device(torch.from_numpy(lens - 1), self.device)
        kwargs: dict[str, Any] = {}
        if prefix_len:
            cache = self._prefix(seqs[0][:prefix_len])
            if self.mode == "view":
                cache = shared_view(cache, b)
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

        hook = decoder_stack(self.model).register_forward_hook(gather)
        try:
            out = self.model(
                input_ids=to_device(ids, self.device), attention_mask=to_device(mask, self.device),
                position_ids=to_device(pos, self.device), use_cache=bool(prefix_len), logits_to_keep=1, **kwargs,
            )
        finally:
            hook.remove()
        logp = self._candidates(out.logits[:, -1], candidate_ids)
        return logp, (captured[0].float() if want_hidden else None)

    def _forward_cascade(self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None,
                         want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        prefix_kv, fresh = None, 0
        if prefix_len and self.varlen and tuple(seqs[0][:prefix_len]) != self._prefix_key:
            fresh = prefix_len  # a new group: its prefix runs in this pass, ahead of the suffixes
            self._prefix_key = self._prefix_kv = None  # free the old group's keys/values first
        elif prefix_len:
            self._prefix(seqs[0][:prefix_len])
            prefix_kv = self._prefix_kv
        suffixes = [s[prefix_len:] for s in seqs]
        if fresh:
            suffixes = [seqs[0][:prefix_len], *suffixes]
        lens = np.fromiter((len(x) for x in suffixes), dtype=np.int64, count=len(suffixes))
        width = int(lens.max())
        total = int(lens.sum())
        ids = torch.from_numpy(np.fromiter((t for x in suffixes for t in x), dtype=np.int64, count=total))
        pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]) + prefix_len)
        if fresh:
            pos[:prefix_len] -= prefix_len
        last = torch.from_numpy(np.cumsum(lens)[1 if fresh else 0:] - 1)
        store: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.varlen:
            cu = np.concatenate([[0], np.cumsum(lens), [0, total - fresh, 0, prefix_len]]).astype(np.int32)
            offsets = to_device(torch.from_numpy(cu), self.device)  # one copy: the three offset lists are views
            n = len(suffixes) + 1
            ctx = CascadeContext(prefix_kv, None, len(suffixes), width, fresh_prefix=fresh, store=store,
                                 varlen=(offsets[:n], offsets[n:n + 2], offsets[n + 2:n + 4]))
        else:
            dest = torch.from_numpy(np.concatenate([r * width + np.arange(n) for r, n in enumerate(lens)]))
            ctx = CascadeContext(prefix_kv, to_device(dest, self.device), len(seqs), width)
        with cascade(self.model, ctx):
            out = decoder_stack(self.model)(input_ids=to_device(ids[None], self.device),
                                            position_ids=to_device(pos[None], self.device), use_cache=False)
        if fresh:
            self._prefix_key, self._prefix_kv = tuple(seqs[0][:prefix_len]), store
        h = out.last_hidden_state[0].index_select(0, to_device(last, self.device))
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


def continuation_logprobs(scorer: PrefixScorer, seqs: list[list[int]], prefix_len: int,
                          continuations: list[list[int]]) -> np.ndarray:
    """log p(continuation | seq) for each seq and continuation ([B, C]); multi-token continuations
    take one extra pass per further token (SmolLM2's ' sure' / ' unsure' are single tokens)."""
    first = sorted({c[0] for c in continuations})
    logp, _ = scorer.score(seqs, prefix_len, first)
    col = {t: i for i, t in enumerate(first)}
    out = np.zeros((len(seqs), len(continuations)))
    for k, cont in enumerate(continuations):
        out[:, k] = logp[:, col[cont[0]]].numpy()
        for j in range(1, len(cont)):
            more, _ = scorer.score([s + cont[:j] for s in seqs], prefix_len, [cont[j]])
            out[:, k] += more[:, 0].numpy()
    return out
