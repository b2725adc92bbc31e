"""The device decoder: greedy replies and N samples per prompt at the device's pace.

- Each prompt is prefilled once; its keys/values sit in a static per-question buffer and are read once
  per group of N samples in every decoding step (kb.engine.step: the prompt half and the samples' own
  half are two attentions merged by their log-sum-exp).
- The decoding step runs over static buffers (the group's prompt cache, every row's generated
  keys/values, the tokens, the stop flags), so on CUDA it is captured once as a CUDA graph and
  replayed: no per-kernel launches from Python.
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
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kb.engine.attention import decoder_stack, plain_attention_model, register_attention
from kb.engine.noise import pick, row_key, vocab_term
from kb.engine.scorer import pack
from kb.engine.step import DECODE_ATTN, StepContext, StopRule, decode_attention, decode_step, emit_tokens
from kb.models import text_config

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


class Decoder:
    """Greedy or sampled decoding of many prompts, N sequences each, with slot refill.

    `slots` (questions decoded at once) defaults to what fits in free memory on CUDA, 64 on CPU.
    `graphs` (default: on CUDA) captures the decoding step as a CUDA graph.
    """

    def __init__(self, model: Any, pad_id: int, stop_ids: Sequence[int], *, graphs: bool | None = None,
                 slots: int | None = None, refill_fraction: float = 0.25, prefill_tokens: int | None = None,
                 fused: bool | None = None, compile_pick: bool | None = None) -> None:
        if not decoder_supported(model):
            raise ValueError(f"Decoder does not support model type {model.config.model_type!r}")
        register_attention(DECODE_ATTN, decode_attention)
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = sorted(set(stop_ids))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        self.fused = cuda if fused is None else fused
        self._compiled: Any = None
        if (cuda if compile_pick is None else compile_pick):
            self._compiled = torch.compile(pick, dynamic=False)  # the noise and the Gumbel-max: one kernel
        self._pick: Any = pick
        self.slots = slots
        self.refill_fraction = refill_fraction
        self.memory_fraction = 0.7  # of free memory for the buffers (the step's temporaries are counted in)
        self.prefill_tokens = prefill_tokens or (32768 if self.device.type == "cuda" else 4096)
        cfg = text_config(model)
        self.layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self._state: dict[str, Any] | None = None
        self._planned_slots = 1
        self._first: dict[int, torch.Tensor] | None = None
        self.first_logprobs: torch.Tensor | None = None
        self.stats: dict[str, Any] = {}

    # -------------------------------------------------------------- sizing

    def _auto_slots(self, n: int, p: int, t: int) -> int:
        if self.slots:
            return self.slots
        if self.device.type != "cuda":
            return 64
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        kv_tok = self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize
        per_group = kv_tok * (p + n * t) + n * self.vocab * 4 * 8  # caches + the step's [rows, V] temporaries
        per_group += n * self.heads * (p + t) * 4 * 4  # fp32 attention scores
        return max(1, int(free * self.memory_fraction / per_group))

    # -------------------------------------------------------------- buffers and the step

    def _alloc(self, g: int, n: int, p: int, t: int, temperature: float | None, want_logps: bool,
               stop_rule: StopRule | None, max_new: int) -> dict[str, Any]:
        dev, dt = self.device, self.dtype
        b = g * n
        kv = lambda rows, length: torch.zeros((rows, self.kv_heads, length, self.head_dim), dtype=dt, device=dev)  # noqa: E731
        st: dict[str, Any] = dict(
            key=(g, n, p, t, temperature, want_logps, stop_rule is not None, max_new),
            g=g, n=n, p=p, t=t, b=b, temperature=temperature, want_logps=want_logps, max_new=max_new,
            kp=[(kv(g, p), kv(g, p)) for _ in range(self.layers)],
            kg=[(kv(b, t), kv(b, t)) for _ in range(self.layers)],
            plen=torch.ones(g, dtype=torch.long, device=dev),
            tok=torch.zeros(b, dtype=torch.long, device=dev),
            step=torch.zeros(b, dtype=torch.long, device=dev),
            keys=torch.zeros(b, dtype=torch.long, device=dev),
            done=torch.ones(b, dtype=torch.bool, device=dev),
            seen=torch.zeros(b, dtype=torch.bool, device=dev),
            length=torch.zeros(b, dtype=torch.long, device=dev),
            out_tok=torch.zeros((b, max_new + 1), dtype=torch.long, device=dev),
            out_lp=torch.zeros((b, max_new + 1), dtype=torch.float32, device=dev),
            rows=torch.arange(b, device=dev),
            stops=torch.tensor(self.stop_ids or [-1], dtype=torch.long, device=dev),
            rule=stop_rule.to(dev) if stop_rule is not None else None,
            graph=None,
        )
        st["group_of_row"] = st["rows"] // n
        st["vterm"] = vocab_term(self.vocab, dev)
        st["pos_p"] = torch.arange(p, device=dev)
        st["pos_t"] = torch.arange(t, device=dev)
        return st

    def _step(self, st: dict[str, Any]) -> None:
        """One decoding step over all rows: feed tok at position plen + step, pick and record the next token."""
        model, dec = self.model, decoder_stack(self.model)
        step = st["step"]
        pos = (st["plen"][st["group_of_row"]] + step)[:, None]
        x = model.get_input_embeddings()(st["tok"][:, None])
        pe = dec.rotary_emb(x, pos)
        st["own_ok"].copy_((st["pos_t"][None, :] <= step[:, None])[:, None, None, :])
        if self.fused:
            st["own_bias"].copy_(torch.zeros_like(st["own_bias"]).masked_fill_(~st["own_ok"], float("-inf")))
        ctx = StepContext(st["kp"], st["kg"], st["prompt_ok"], st["own_ok"], step, st["rows"], st["n"],
                          self.fused, st.get("prompt_bias"), st.get("own_bias"))
        with decode_step(model, ctx):
            for layer in dec.layers:
                out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
                x = out[0] if isinstance(out, tuple) else out
        h = dec.norm(x)[:, 0]
        logits = model.get_output_embeddings()(h)
        nxt, lp = self._pick(logits, st["keys"], step + 1, st["temperature"], st["want_logps"], st["vterm"])
        emit_tokens(st, None, nxt, lp, step + 1)
        st["step"].copy_(torch.clamp(step + 1, max=st["t"] - 1))

    def _run_step(self, st: dict[str, Any]) -> None:
        if not self.graphs:
            self._step(st)
            return
        if st["graph"] is None:
            saved = {k: st[k].clone() for k in ("tok", "step", "done", "seen", "length", "out_tok", "out_lp")}
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):
                    self._step(st)  # warm-up (allocator, lazy inits, the sampler's compile) before capture
            except Exception as err:  # noqa: BLE001  (a kernel or compiler this machine lacks)
                if not (self.fused or self._pick is not pick):
                    raise
                warnings.warn(f"kb.engine.decode: fast step failed ({str(err).splitlines()[0][:200]}); using the plain one",
                              stacklevel=2)
                self.fused, self._pick, self._compiled = False, pick, None
                torch.cuda.synchronize(self.device)
                for k, v in saved.items():
                    st[k].copy_(v)
                with torch.cuda.stream(side):
                    self._step(st)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for k, v in saved.items():
                st[k].copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(st)
            for k, v in saved.items():
                st[k].copy_(v)
            st["graph"] = graph
        st["graph"].replay()

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
            out = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            h = out.last_hidden_state[torch.arange(k, device=self.device), lens - 1]
            logits = model.get_output_embeddings()(h)
            if self._first is not None:  # the first step's log-probs, per question (GreedyDecoder's letter reading)
                lsm = torch.log_softmax(logits.float(), dim=-1).cpu()
                for r, (_, q) in enumerate(chunk):
                    self._first[q] = lsm[r]
            slots = torch.tensor([g for g, _ in chunk], dtype=torch.long, device=self.device)
            for layer, (kp, vp) in zip(out.past_key_values.layers, st["kp"]):
                kp[slots, :, :width] = layer.keys
                vp[slots, :, :width] = layer.values
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
            nxt, lp = pick(logits.repeat_interleave(n, dim=0), keys, zero, st["temperature"], st["want_logps"])  # eager: shapes vary
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
            cap = self._auto_slots(n, p, t)
            waves = -(-len(seqs) // cap)
            g = -(-len(seqs) // waves)  # equal waves: as few as memory allows, no emptier than needed
            self._planned_slots = g
            st = self._alloc(g, n, p, t, temperature, want_logps, stop_rule, max_new)
            st["prompt_ok"] = torch.zeros((g, 1, 1, p), dtype=torch.bool, device=self.device)
            st["own_ok"] = torch.zeros((g * n, 1, 1, t), dtype=torch.bool, device=self.device)
            if self.fused:
                st["prompt_bias"] = torch.zeros((g, 1, 1, p), dtype=self.dtype, device=self.device)
                # The fused kernel wants the bias rows 16-aligned: a padded buffer, seen through a slice.
                st["own_bias"] = torch.zeros((g * n, 1, 1, -(-t // 16) * 16), dtype=self.dtype,
                                             device=self.device)[..., :t]
            st["cap"] = cap
            # Sampling compiles its noise into one kernel (per shape); greedy needs no noise: eager argmax.
            self._pick = self._compiled if (self._compiled is not None and temperature is not None) else pick
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
            if steps == 0:  # the first step of a new state captures the graph (and compiles the sampler)
                t0 = time.perf_counter()
                self._run_step(st)
                sync()
                t_first = time.perf_counter() - t0
            else:
                self._run_step(st)
            steps += 1
        total = time.perf_counter() - t_start
        self.stats = {"slots": g, "rows": g * n, "steps": steps, "admissions": admitted, "prompt_width": p,
                      "graph": self.graphs, "fused_attention": self.fused, "compiled_sampler": self._pick is not pick,
                      "prefill_s": round(t_prefill, 3), "first_step_s": round(t_first, 3),
                      "other_steps_s": round(total - t_prefill - t_first, 3)}
        return replies

    def release(self) -> None:
        """Free the buffers and the captured step (the compiled sampler stays: same shapes reuse it)."""
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


def decoder_for(model: Any, pad_id: int, stop_ids: Sequence[int]) -> Decoder:
    """One Decoder per model (its captured step and buffers are reused across batches)."""
    d = _DECODERS.get(id(model))
    if d is None or d.model is not model or d.pad_id != pad_id or d.stop_ids != sorted(set(stop_ids)) \
            or d.dtype != next(model.parameters()).dtype:
        _DECODERS.clear()
        d = _DECODERS[id(model)] = Decoder(model, pad_id, stop_ids)
    return d
