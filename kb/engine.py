"""The probing engine: batched next-token scoring with a shared-prefix KV cache, and batched generation.

Why it is fast: one forward pass per MCQ question (not one per option, not a generate() call); the
few-shot prefix that all questions of a subject share is run once and its KV cache reused; questions
are length-sorted into batches under a token budget; only the last position goes through the LM head.
Why it is exact: token sequences are exactly the full prompt's tokenisation (the shared prefix is the
longest common *token* prefix), suffixes are left-padded with explicit position ids, so padding
changes nothing but float rounding; tests compare it with the one-at-a-time path.

Batches are planned over the whole question list, deterministically, so a resumed run recomputes
exactly the batches an uninterrupted run would (identical numbers, identical sampling seeds).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kb.data import LETTERS

MIN_SHARED_PREFIX = 8  # tokens; below this a prefix cache is not worth its bookkeeping


@dataclass(frozen=True)
class Batch:
    indices: tuple[int, ...]
    group: str
    prefix_len: int  # shared prefix tokens served from the group's KV cache (0 = none)

    def key(self) -> str:
        return f"{self.group}:{self.indices[0]}:{len(self.indices)}"


def letter_candidates(tokenizer: Any, n: int = len(LETTERS)) -> list[list[int]]:
    """Single-token ids that spell each letter: 'A' and ' A' (after 'Answer:' or a chat header)."""
    out = []
    for letter in LETTERS[:n]:
        ids = []
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
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


def plan_batches(
    token_lists: Sequence[Sequence[int]], groups: Sequence[str], batch_size: int, max_batch_tokens: int,
    share_prefix: bool = True,
) -> list[Batch]:
    """Group by `groups` (subject), share each group's prefix, sort by length, cut under the budgets."""
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g if share_prefix else "", []).append(i)
    batches = []
    for g, idx in order.items():
        p = common_prefix_len([token_lists[i] for i in idx]) if share_prefix else 0
        idx = sorted(idx, key=lambda i: (-len(token_lists[i]), i))
        cur: list[int] = []
        for i in idx:
            width = len(token_lists[cur[0]]) if cur else len(token_lists[i])  # longest first
            if cur and (len(cur) >= batch_size or (len(cur) + 1) * width > max_batch_tokens):
                batches.append(Batch(tuple(cur), g, p))
                cur = []
            cur.append(i)
        if cur:
            batches.append(Batch(tuple(cur), g, p))
    return batches


def _decoder(model: Any) -> Any:
    getter = getattr(model, "get_decoder", None)
    dec = getter() if getter else None
    return dec if dec is not None else model.base_model


class PrefixScorer:
    """Next-token log-probs (and last-layer states) at the end of each prompt."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_cache: Any = None

    def _prefix(self, ids: Sequence[int]) -> Any:
        key = tuple(ids)
        if key != self._prefix_key:
            self._prefix_cache = None  # free the old cache before building the next one
            x = torch.tensor([list(ids)], device=self.device)
            out = self.model(input_ids=x, use_cache=True)
            self._prefix_key, self._prefix_cache = key, out.past_key_values
        return self._prefix_cache

    @torch.inference_mode()
    def score(
        self, seqs: Sequence[Sequence[int]], prefix_len: int, candidate_ids: Sequence[int] | None = None,
        want_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return float32 log-probs at the last position ([B, V] or [B, K] for candidates) and [B, H] states."""
        try:
            return self._score(seqs, prefix_len, candidate_ids, want_hidden)
        except torch.cuda.OutOfMemoryError:
            if len(seqs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(seqs) // 2  # memory-aware fallback: split and retry
            a = self.score(seqs[:half], prefix_len, candidate_ids, want_hidden)
            b = self.score(seqs[half:], prefix_len, candidate_ids, want_hidden)
            hid = torch.cat([a[1], b[1]]) if want_hidden else None
            return torch.cat([a[0], b[0]]), hid

    def _score(self, seqs, prefix_len, candidate_ids, want_hidden):  # type: ignore[no-untyped-def]
        b = len(seqs)
        suffixes = [list(s[prefix_len:]) for s in seqs]
        width = max(len(s) for s in suffixes)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, s in enumerate(suffixes):  # left padding: the last real token sits at position -1
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
        kwargs: dict[str, Any] = {}
        if prefix_len:
            cache = copy.deepcopy(self._prefix(seqs[0][:prefix_len]))
            cache.batch_repeat_interleave(b)
            kwargs["past_key_values"] = cache
            mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long), mask], dim=1)
        captured: list[torch.Tensor] = []
        hook = None
        if want_hidden:
            def grab(_m: Any, _i: Any, out: Any) -> None:
                h = out[0] if isinstance(out, tuple) else out.last_hidden_state
                captured.append(h[:, -1].float())
            hook = _decoder(self.model).register_forward_hook(grab)
        try:
            out = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
                use_cache=bool(prefix_len), logits_to_keep=1, **kwargs,
            )
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[:, -1].float()
        if candidate_ids is not None:
            logp = torch.log_softmax(logits, dim=-1)[:, list(candidate_ids)]
        else:
            logp = torch.log_softmax(logits, dim=-1)
        return logp.cpu(), (captured[0].cpu() if want_hidden else None)


def letter_probs(logp: torch.Tensor, candidates: list[list[int]], n_choices: Sequence[int]) -> list[list[float]]:
    """Sum each letter's token variants, keep the question's letters, renormalise over them."""
    flat = [t for c in candidates for t in c]
    pos = {t: i for i, t in enumerate(flat)}
    out = []
    for r, n in enumerate(n_choices):
        per = torch.stack([torch.logsumexp(logp[r, [pos[t] for t in candidates[k]]], 0) for k in range(n)])
        p = torch.softmax(per.double(), 0)
        out.append([float(x) for x in p])
    return out


def batch_seed(seed: int, batch: Batch) -> int:
    """A sampling seed fixed by the batch's identity, so resumed runs sample exactly as a full run."""
    return int(hashlib.sha256(f"{seed}|{batch.key()}".encode()).hexdigest()[:8], 16)


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, *, do_sample: bool = False,
    temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0, want_scores: bool = False,
) -> tuple[list[list[str]], list[list[float]] | None]:
    """Batched generation from token lists (left-padded): texts[q][k] and, greedy, mean token log-prob."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(list(s))
        mask[r, width - len(s):] = 1
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
        pad_token_id=pad, return_dict_in_generate=True, output_scores=want_scores,
    )
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
    new = out.sequences[:, width:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    grouped = [texts[i * num_return_sequences:(i + 1) * num_return_sequences] for i in range(len(seqs))]
    mean_logp = None
    if want_scores:
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu().float()
        stop_ids = {pad, tokenizer.eos_token_id}
        mean_logp = []
        for r in range(new.shape[0]):
            keep = [j for j in range(new.shape[1]) if int(new[r, j]) not in stop_ids]
            mean_logp.append(float(scores[r, keep].mean()) if keep else None)
        mean_logp = [mean_logp[i * num_return_sequences:(i + 1) * num_return_sequences] for i in range(len(seqs))]
    return grouped, mean_logp
