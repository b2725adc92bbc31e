"""The device decoder: greedy replies and N samples per prompt at the device's pace.

- Each prompt is prefilled once; its keys/values sit in a static per-question buffer and are read once
  per group of N samples in every decoding step (kb.engine.step: the prompt half and the samples' own
  half are two attentions merged by their log-sum-exp).
- The decoding step runs over static buffers (the group's prompt cache, every row's generated
  keys/values, the tokens, the stop flags), so on CUDA it is captured once as a CUDA graph and
  replayed: no per-kernel launches from Python (kb.engine.graph, the base of Decoder).
- Sampling and the stop checks stay on the device (kb.engine.noise: a sample depends on its question
  and seed only, never on which other questions share the batch or when its slot was filled).
- A group whose samples have all stopped frees its slot, which the next queued question takes
  (continuous batching): early stops do not leave the batch idle.

`Decoder.run` serves R-Tuning's greedy probe, the evaluation replies and CRaFT's N-sample query.
Models: the Llama family (llama, mistral, qwen2, qwen3) with full attention; others fall back to
transformers' generate in kb.engine.generation (`decoder_supported`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kb.engine.attention import decoder_stack, plain_attention_model
from kb.engine.graph import StepGraph
from kb.engine.noise import row_key
from kb.engine.scorer import pack
from kb.engine.step import StopRule, emit_tokens

SUPPORTED_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def decoder_supported(model: Any) -> bool:
    """Whether Decoder computes exactly this model's function."""
    return plain_attention_model(model, SUPPORTED_TYPES) and hasattr(decoder_stack(model), "rotary_emb")


def use_decoder(model: Any) -> bool:
    """The stages use Decoder on CUDA (CPU keeps transformers' generate, whose outputs are fixed by tests)."""
    return next(model.parameters()).device.type == "cuda" and decoder_supported(model)


# ----------------------------------------------------------------------------------------------------
# The decoder


@dataclass
class Reply:
    """One decoded sequence."""

    tokens: list[int]  # new tokens, stop tokens left out
    logps: list[float] | None  # their log-probs (want_logps)


class Decoder(StepGraph):
    """Greedy or sampled decoding of many prompts, N sequences each, with slot refill.

    `slots` (questions decoded at once) defaults to what fits in free memory on CUDA, 64 on CPU.
    `graphs` (default: on CUDA) captures the decoding step as a CUDA graph (kb.engine.graph.StepGraph: the
    buffers and the step; this class decides which question sits in which slot).
    """

    def __init__(self, model: Any, pad_id: int, stop_ids: Sequence[int], *, graphs: bool | None = None,
                 slots: int | None = None, refill_fraction: float = 0.25, prefill_tokens: int | None = None,
                 fused: bool | None = None, sampler_kernel: bool | None = None, flash: bool | None = None,
                 own_kernel: bool = True, fused_kernels: bool | None = None) -> None:
        if not decoder_supported(model):
            raise ValueError(f"Decoder does not support model type {model.config.model_type!r}")
        super().__init__(model, stop_ids, graphs=graphs, fused=fused, sampler_kernel=sampler_kernel, flash=flash,
                         own_kernel=own_kernel, fused_kernels=fused_kernels)
        self.asked_own_kernel = bool(own_kernel)
        self.pad_id = pad_id
        self.slots = slots
        self.refill_fraction = refill_fraction
        self.prefill_tokens = prefill_tokens or (32768 if self.device.type == "cuda" else 4096)
        self._state: dict[str, Any] | None = None
        self._planned_slots = 1
        self._first: dict[int, torch.Tensor] | None = None
        self.first_logprobs: torch.Tensor | None = None
        self.stats: dict[str, Any] = {}

    # -------------------------------------------------------------- admission (prefill)

    def _admit(self, st: dict[str, Any], seqs: Sequence[Sequence[int]], items: list[tuple[int, int]],
               qkeys: Sequence[int]) -> None:
        """Prefill questions `items` = [(slot, question index)] and draw their first tokens."""
        dec, model, n = decoder_stack(self.model), self.model, st["n"]
        start = 0
        while start < len(items):  # chunks under the prefill token budget
            end, width = start, 0
            while end < len(items):
                w = max(width, len(seqs[items[end][1]]))
                if end > start and w * (end - start + 1) > self.prefill_tokens:
                    break
                width, end = w, end + 1
            chunk = items[start:end]
            start = end
            k = len(chunk)
            ids, mask, row_lens = pack([seqs[q] for _, q in chunk], self.pad_id, left=False)  # right-padded
            lens = torch.from_numpy(row_lens)
            ids, mask, lens = ids.to(self.device), mask.to(self.device), lens.to(self.device)
            pos = torch.arange(width, device=self.device)[None, :].expand(k, -1)
            out = self.fusion.run(dec, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            h = out.last_hidden_state[torch.arange(k, device=self.device), lens - 1]
            logits = model.get_output_embeddings()(h)
            if self._first is not None:  # the first step's log-probs, per question (GreedyDecoder's letter reading)
                lsm = torch.log_softmax(logits.float(), dim=-1).cpu()
                for r, (_, q) in enumerate(chunk):
                    self._first[q] = lsm[r]
            slots = torch.tensor([g for g, _ in chunk], dtype=torch.long, device=self.device)
            for layer, (kp, vp) in zip(out.past_key_values.layers, st["kp"]):
                kp[slots, :width] = layer.keys.transpose(1, 2)
                vp[slots, :width] = layer.values.transpose(1, 2)
            st["plen"][slots] = lens
            st["prompt_ok"][slots] = (st["pos_p"][None, :] < lens[:, None])[:, None, None, :]
            if self.fused:
                st["prompt_bias"][slots] = torch.zeros_like(st["prompt_bias"][slots]).masked_fill_(
                    ~st["prompt_ok"][slots], float("-inf"))
            del out
            rows = (slots[:, None] * n + torch.arange(n, device=self.device)[None, :]).reshape(-1)
            keys = torch.tensor([row_key(qkeys[q], j) for _, q in chunk for j in range(n)], dtype=torch.long,
                                device=self.device)
            st["keys"][rows] = keys
            st["step"][rows] = 0
            st["done"][rows] = False
            st["seen"][rows] = False
            st["length"][rows] = 0
            zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            # The first token through the steps' sampler too (the kernel takes any row count with one build).
            nxt, lp = self._pick(logits.repeat_interleave(n, dim=0), keys, zero, st["temperature"], st["want_logps"])
            emit_tokens(st, rows, nxt, lp, zero)

    # -------------------------------------------------------------- the loop

    @torch.inference_mode()
    def run(self, seqs: Sequence[Sequence[int]], max_new: int, *, n: int = 1, temperature: float | None = None,
            keys: Sequence[int] | None = None, want_logps: bool = False,
            stop_rule: StopRule | None = None, want_first: bool = False) -> list[list[Reply]]:
        """replies[q][k] for every prompt q and sample k. temperature None: greedy (n should be 1).

        want_first: also keep the first step's log-probs, [Q, V] float32 on CPU, in `first_logprobs`.

        keys[q]: the question's sampling key (default its index); sample k of question q is then the same
        whatever else is decoded with it. Out of GPU memory, the run starts again with fewer slots (the
        samples do not depend on the slot count)."""
        self._first = {} if want_first else None
        self.first_logprobs = None
        while True:
            try:
                out = self._run(seqs, max_new, n, temperature, keys, want_logps, stop_rule)
                if self._first is not None and seqs and max_new >= 1:
                    self.first_logprobs = torch.stack([self._first[q] for q in range(len(seqs))])
                    self._first = None
                return out
            except torch.cuda.OutOfMemoryError:
                g = self._planned_slots
                self._state = None
                torch.cuda.empty_cache()
                if g <= 1:
                    raise
                self.slots = max(1, g // 2)

    def _run(self, seqs: Sequence[Sequence[int]], max_new: int, n: int, temperature: float | None,
             keys: Sequence[int] | None, want_logps: bool, stop_rule: StopRule | None) -> list[list[Reply]]:
        if not seqs:
            return []
        if max_new < 1:
            return [[Reply([], [] if want_logps else None) for _ in range(n)] for _ in seqs]
        qkeys = list(keys) if keys is not None else list(range(len(seqs)))
        p = max(len(s) for s in seqs)
        p = -(-p // 64) * 64  # rounded so that later calls with similar prompts reuse the captured step
        t = max(1, max_new - 1)
        want = (n, p, t, temperature, want_logps, stop_rule is not None, max_new)
        st = self._state
        if st is not None and (st["key"][1:] != want or st["g"] < min(len(seqs), st["cap"])):
            self._state = st = None  # its buffers count as free memory for the next one
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if st is None:
            cap = self.slots or self.fitting_slots(n, p, t)
            waves = -(-len(seqs) // cap)
            g = -(-len(seqs) // waves)  # equal waves: as few as memory allows, no emptier than needed
            self._planned_slots = g
            st = self._alloc(g, n, p, t, temperature, want_logps, stop_rule, max_new)
            st["cap"] = cap
            self._state = st
        else:
            g = st["g"]
            st["done"].fill_(True)
            st["plen"].fill_(1)
            st["prompt_ok"].zero_()
        st["prompt_ok"][:, :, :, 0] = True  # empty slots attend to one zero key: no NaN
        if self.fused:
            st["prompt_bias"].copy_(torch.zeros_like(st["prompt_bias"]).masked_fill_(~st["prompt_ok"], float("-inf")))
        if stop_rule is not None:  # copied into the tensors the captured step reads
            for name in ("ends", "ends_lead", "content"):
                getattr(st["rule"], name).copy_(getattr(stop_rule, name))
        # Longest prompts first: the prefill chunks pad less.
        queue = deque(sorted(range(len(seqs)), key=lambda q: (-len(seqs[q]), q)))
        slot_q: list[int | None] = [None] * g
        replies: list[list[Reply]] = [[] for _ in seqs]
        refill_at = max(1, int(g * self.refill_fraction))
        steps = admitted = 0
        first = [(s, queue.popleft()) for s in range(min(g, len(queue)))]
        for s, q in first:
            slot_q[s] = q
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        t_start = time.perf_counter()
        self._admit(st, seqs, first, qkeys)
        sync()
        t_prefill = time.perf_counter() - t_start
        t_first = 0.0
        admitted += 1

        busy = np.zeros(g, dtype=bool)
        busy[[s for s, _ in first]] = True
        while any(q is not None for q in slot_q):
            gdone = st["done"].view(g, n).all(1).cpu().numpy()
            finished = np.flatnonzero(gdone & busy).tolist()
            if finished:
                self._harvest(st, finished, slot_q, replies)
                for s in finished:
                    slot_q[s] = None
                busy[finished] = False
            free = [s for s in range(g) if slot_q[s] is None]
            active = g - len(free)
            if queue and free and (len(free) >= refill_at or active == 0 or len(queue) <= len(free)):
                items = [(s, queue.popleft()) for s in free[:len(queue)]]
                for s, q in items:
                    slot_q[s] = q
                    busy[s] = True
                t0 = time.perf_counter()
                self._admit(st, seqs, items, qkeys)
                sync()
                t_prefill += time.perf_counter() - t0
                admitted += 1
                continue
            if active == 0:
                break
            if steps == 0:  # the first step of a new state captures the graph (and compiles the kernels on first use)
                t0 = time.perf_counter()
                self._run_step(st)
                sync()
                t_first = time.perf_counter() - t0
            else:
                self._run_step(st)
            steps += 1
        total = time.perf_counter() - t_start
        self.stats = {"slots": g, "rows": g * n, "steps": steps, "admissions": admitted, "prompt_width": p,
                      "graph": self.graphs, "fused_attention": self.fused, "flash_attention": self.flash,
                      "own_kernel": self.own_kernel, "fused_layers": self.fusion.on,
                      "sampler": self.sampler,
                      "prefill_s": round(t_prefill, 3), "first_step_s": round(t_first, 3),
                      "other_steps_s": round(total - t_prefill - t_first, 3)}
        return replies

    def release(self) -> None:
        """Free the buffers and the captured step."""
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _harvest(self, st: dict[str, Any], slots: list[int], slot_q: list[int | None],
                 replies: list[list[Reply]]) -> None:
        n = st["n"]
        rows = torch.tensor([s * n + j for s in slots for j in range(n)], dtype=torch.long, device=self.device)
        toks = st["out_tok"][rows].cpu().tolist()
        lens = st["length"][rows].cpu().tolist()
        lps = st["out_lp"][rows].cpu().tolist() if st["want_logps"] else None
        for i, s in enumerate(slots):
            q = slot_q[s]
            assert q is not None
            out = []
            for j in range(n):
                r = i * n + j
                m = lens[r]
                out.append(Reply(toks[r][:m], lps[r][:m] if lps is not None else None))
            replies[q] = out


_DECODERS: dict[int, Decoder] = {}


def decoder_for(model: Any, pad_id: int, stop_ids: Sequence[int], *, own_kernel: bool | None = None) -> Decoder:
    """One Decoder per model (its captured step and buffers are reused across batches); `own_kernel` None keeps
    the cached decoder's choice (a new one gets the default, the kernel where it runs)."""
    d = _DECODERS.get(id(model))
    if d is None or d.model is not model or d.pad_id != pad_id or d.stop_ids != sorted(set(stop_ids)) \
            or d.dtype != next(model.parameters()).dtype or own_kernel not in (None, d.asked_own_kernel):
        _DECODERS.clear()
        d = _DECODERS[id(model)] = Decoder(model, pad_id, stop_ids, own_kernel=own_kernel is not False)
    return d
