"""Greedy replies for evaluation, with the first step's log-probs and the prompt's cache kept for a probe."""

from __future__ import annotations

import copy
from typing import Any

import torch

from kb.engine.decode import decoder_for, use_decoder
from kb.engine.scorer import pack


class GreedyDecoder:
    """Batched greedy decoding that reuses the group's shared prompt prefix (its KV cache is computed
    once per prefix and copied per batch), returns the first step's log-probs, and keeps the prompt's
    cache so R-Tuning's "Are you sure" probe only runs its own ~25 tokens.

    Why not generate + PrefixScorer: on a 2-core CPU an evaluation is dominated by prompt
    prefill. Here each prompt is prefilled once (minus the shared preamble) and serves three readings:
    the letter distribution (first decoding step), the greedy reply, and p(sure) after
    "<prompt><answer>. Are you sure ...? I am" (the prompt's cache + the probe tokens). Layout per
    batch: [shared prefix][left padding][question][probe or reply], explicit positions, so padding
    changes nothing but float rounding; tests compare it with generate and PrefixScorer.
    """

    def __init__(self, model: Any, pad_id: int, stop_ids: set[int]) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = sorted(stop_ids)
        self.device = next(model.parameters()).device
        self._key: tuple[int, ...] | None = None
        self._cache: Any = None
        # GPU: replies and the first step's log-probs from the device Decoder (captured step); the sure-probe then
        # takes PrefixScorer's pass instead of the kept prompt cache. CPU keeps the path below.
        self.fast = use_decoder(model)

    def _prefix(self, ids: list[int], rows: int) -> Any:
        key = tuple(ids)
        if key != self._key:
            self._cache = None
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
            self._key, self._cache = key, out.past_key_values
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(rows)
        return cache

    @torch.inference_mode()
    def decode(self, seqs: list[list[int]], prefix_len: int, max_new: int,
               keep_prompt: bool = False) -> tuple[list[list[int]], torch.Tensor, list[list[float]], Any]:
        """(new token ids per row without stop tokens, first-step log-probs [B, V] on CPU, the reply
        tokens' log-probs, and the prompt state for probe() when keep_prompt; None on the fast path)."""
        if self.fast:
            dec = decoder_for(self.model, self.pad_id, self.stop_ids)
            try:
                out = dec.run(seqs, max_new, want_logps=True, want_first=True)
                first_lp = dec.first_logprobs
            finally:
                dec.release()
            assert first_lp is not None
            return [r[0].tokens for r in out], first_lp, [list(r[0].logps or []) for r in out], None
        b = len(seqs)
        ids, own, _ = pack([s[prefix_len:] for s in seqs], self.pad_id, left=True)
        mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long), own], dim=1)
        pos = (mask[:, prefix_len:].cumsum(-1) - 1).clamp(min=0) + prefix_len
        kwargs: dict[str, Any] = {"past_key_values": self._prefix(seqs[0][:prefix_len], b)} if prefix_len else {}
        mask, pos = mask.to(self.device), pos.to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **kwargs)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        first = logp.cpu()
        nxt_pos = pos[:, -1:] + 1
        state = (copy.deepcopy(out.past_key_values), mask, nxt_pos) if keep_prompt else None
        stop = torch.tensor(self.stop_ids, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        toks: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        for step in range(max_new):
            nxt = logp.argmax(-1)
            lp = logp.gather(1, nxt[:, None])[:, 0]
            is_stop = torch.isin(nxt, stop)
            for r in (~done & ~is_stop).nonzero()[:, 0].tolist():
                toks[r].append(int(nxt[r]))
                lps[r].append(float(lp[r]))
            done |= is_stop
            if bool(done.all()) or step == max_new - 1:
                break
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos,
                             past_key_values=out.past_key_values, use_cache=True)
            nxt_pos = nxt_pos + 1
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return toks, first, lps, state

    @torch.inference_mode()
    def probe(self, state: Any, suffixes: list[list[int]], candidate_ids: list[int]) -> torch.Tensor:
        """Log-probs of `candidate_ids` after prompt + each row's suffix tokens ([B, K], CPU), continuing
        from the prompt's cache (right padding: real probe tokens never see the pads)."""
        cache, mask, nxt_pos = state
        b = len(suffixes)
        ids, pmask, _ = pack(suffixes, self.pad_id, left=False)
        width = ids.shape[1]
        pos = nxt_pos + torch.arange(width, device=self.device)[None, :]
        out = self.model(input_ids=ids.to(self.device), attention_mask=torch.cat([mask, pmask.to(self.device)], dim=1),
                         position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=width)
        last = torch.tensor([len(x) - 1 for x in suffixes], device=self.device)
        logits = out.logits[torch.arange(b, device=self.device), last - width + out.logits.shape[1]].float()
        return torch.log_softmax(logits, dim=-1)[:, candidate_ids].cpu()
