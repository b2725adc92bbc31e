"""Batched decoding at the device's pace: greedy replies and N samples per prompt from one decoder.

- Each prompt is prefilled once; its keys/values sit in a static per-question buffer and are read once
  per group of N samples in every decoding step (cascade attention: the prompt half and the samples'
  own half are two attentions merged by their log-sum-exp).
- The decoding step runs over static buffers (the group's prompt cache, every row's generated
  keys/values, the tokens, the stop flags), so on CUDA it is captured once as a CUDA graph and
  replayed: no per-kernel launches from Python.
- Sampling and the stop checks stay on the device. Sampling is Gumbel-max with counter-based noise
  keyed by (the question's key, the sample index, the token index), so a sample depends on its question
  and seed only, never on which other questions share the batch or when its slot was filled.
- A group whose samples have all stopped frees its slot, which the next queued question takes
  (continuous batching): early stops do not leave the batch idle.

`Decoder.run` serves R-Tuning's greedy probe, the evaluation replies and CRaFT's N-sample query.
Models: the Llama family (llama, mistral, qwen2, qwen3) with full attention; others fall back to
kb.engine.generate in the callers (`decoder_supported`).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kb.engine import _decoder, plain_attention_model, register_attention, text_config

DECODE_ATTN = "kb_decode"
SUPPORTED_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_MASK64 = (1 << 64) - 1


def decoder_supported(model: Any) -> bool:
    """Whether Decoder computes exactly this model's function."""
    return plain_attention_model(model, SUPPORTED_TYPES) and hasattr(_decoder(model), "rotary_emb")


def use_decoder(model: Any) -> bool:
    """The stages use Decoder on CUDA (CPU keeps engine.generate, whose outputs are fixed by tests)."""
    return next(model.parameters()).device.type == "cuda" and decoder_supported(model)


# ----------------------------------------------------------------------------------------------------
# Counter-based noise


def _i64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_C1, _C2, _C3 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def vocab_term(vocab: int, device: Any) -> torch.Tensor:
    """The token id's share of the noise counter, token id x C3 (int64, [vocab])."""
    return torch.arange(vocab, device=device, dtype=torch.int64) * _C3


def uniform_noise(keys: torch.Tensor, t: torch.Tensor, vocab: int, vterm: torch.Tensor | None = None) -> torch.Tensor:
    """u in (0, 1), [B, vocab] float32, a pure function of (keys[b], t[b], token id): splitmix64."""
    v = vterm if vterm is not None else vocab_term(vocab, keys.device)
    x = (keys * _C1 + t * _C2)[:, None] + v[None, :]
    x = (x ^ _shr(x, 30)) * _C2
    x = (x ^ _shr(x, 27)) * _C3
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def row_key(question_key: int, sample: int) -> int:
    """The noise key of one sample of one question."""
    x = (question_key * 0x9E3779B97F4A7C15 + (sample + 1) * 0xD1B54A32D192ED03) & _MASK64
    x ^= x >> 29
    return _i64(x * 0xBF58476D1CE4E5B9)


def pick(logits: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, temperature: float | None,
         want_logp: bool, vterm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row: argmax (temperature None) or a draw from softmax(logits / T) by Gumbel-max."""
    logits = logits.float()
    if temperature is None:
        nxt = logits.argmax(-1)
    else:
        u = uniform_noise(keys, t, logits.shape[-1], vterm)
        nxt = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
    lp = None
    if want_logp:
        scaled = logits if temperature is None else logits / temperature
        lp = torch.log_softmax(scaled, dim=-1).gather(1, nxt[:, None])[:, 0]
    return nxt, lp


# ----------------------------------------------------------------------------------------------------
# Stop rules on the device


@dataclass
class StopRule:
    """Per-token tables of the answer-end rule (kb.state.answer_ended): a reply ends at the first '.' or
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


# ----------------------------------------------------------------------------------------------------
# Attention of one decoding step


@dataclass
class _StepContext:
    kp: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [G, Hkv, P, D]: the groups' prompt keys/values
    kg: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, Hkv, T, D]: every row's generated keys/values
    prompt_ok: torch.Tensor  # [G, 1, 1, P] bool
    own_ok: torch.Tensor  # [B, 1, 1, T] bool
    step: torch.Tensor  # [B] long: where this step's key/value goes
    rows: torch.Tensor  # [B] arange
    n: int
    fused: bool = False  # CUDA: the fused memory-efficient attention kernel for both halves
    prompt_bias: torch.Tensor | None = None  # [G, 1, 1, P] 0 / -inf (fused)
    own_bias: torch.Tensor | None = None  # [B, 1, 1, T] 0 / -inf (fused)


_ACTIVE: _StepContext | None = None


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
    kg[ctx.rows, :, ctx.step] = key[:, :, 0]
    vg[ctx.rows, :, ctx.step] = value[:, :, 0]
    kp, vp = ctx.kp[module.layer_idx]
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


def _fused_halves(ctx: _StepContext, query: torch.Tensor, qg: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
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


# ----------------------------------------------------------------------------------------------------
# The decoder


@dataclass
class Reply:
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

    def _emit(self, st: dict[str, Any], rows: torch.Tensor | None, nxt: torch.Tensor, lp: torch.Tensor | None,
              index: torch.Tensor) -> None:
        """Record token `nxt` at `index` for the still-active rows and update the stop flags (all on device)."""
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

    def _step(self, st: dict[str, Any]) -> None:
        """One decoding step over all rows: feed tok at position plen + step, pick and record the next token."""
        global _ACTIVE
        model, dec = self.model, _decoder(self.model)
        step = st["step"]
        pos = (st["plen"][st["group_of_row"]] + step)[:, None]
        x = model.get_input_embeddings()(st["tok"][:, None])
        pe = dec.rotary_emb(x, pos)
        st["own_ok"].copy_((st["pos_t"][None, :] <= step[:, None])[:, None, None, :])
        cfg = model.config
        saved = cfg._attn_implementation
        if self.fused:
            st["own_bias"].copy_(torch.zeros_like(st["own_bias"]).masked_fill_(~st["own_ok"], float("-inf")))
        _ACTIVE = _StepContext(st["kp"], st["kg"], st["prompt_ok"], st["own_ok"], step, st["rows"], st["n"],
                               self.fused, st.get("prompt_bias"), st.get("own_bias"))
        cfg._attn_implementation = DECODE_ATTN
        try:
            for layer in dec.layers:
                out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
                x = out[0] if isinstance(out, tuple) else out
        finally:
            cfg._attn_implementation = saved
            _ACTIVE = None
        h = dec.norm(x)[:, 0]
        logits = model.get_output_embeddings()(h)
        nxt, lp = self._pick(logits, st["keys"], step + 1, st["temperature"], st["want_logps"], st["vterm"])
        self._emit(st, None, nxt, lp, step + 1)
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
                warnings.warn(f"kb.decode: fast step failed ({str(err).splitlines()[0][:200]}); using the plain one",
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
        dec, model, n = _decoder(self.model), self.model, st["n"]
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
            ids = torch.full((k, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((k, width), dtype=torch.long)
            for r, (_, q) in enumerate(chunk):
                s = seqs[q]
                ids[r, :len(s)] = torch.tensor(list(s), dtype=torch.long)
                mask[r, :len(s)] = 1
            lens = torch.tensor([len(seqs[q]) for _, q in chunk], dtype=torch.long)
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
            self._emit(st, rows, nxt, lp, zero)

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
        import time

        import numpy as np

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


def question_key(seed: int, question_id: str) -> int:
    """A question's sampling key: fixed by the run's seed and the question, not by its batch."""
    import hashlib

    return _i64(int(hashlib.sha256(f"{seed}|{question_id}".encode()).hexdigest()[:16], 16))


def generation_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """What ends a reply: the tokenizer's EOS and the generation config's (generate's rule)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return sorted(i for i in ids if i is not None)


_RULES: dict[tuple[int, int], StopRule] = {}


def answer_end_rule(tokenizer: Any, model: Any) -> StopRule:
    vocab = model.get_output_embeddings().weight.shape[0]
    key = (id(tokenizer), vocab)
    if key not in _RULES:
        _RULES.clear()
        _RULES[key] = StopRule.answer_end(tokenizer, vocab)
    return _RULES[key]


def decode_texts(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new: int, *, n: int = 1,
                 temperature: float | None = None, keys: Sequence[int] | None = None, want_scores: bool = False,
                 stop_at_answer_end: bool = False) -> tuple[list[list[str]], list[list[float | None]] | None]:
    """engine.generate's result through Decoder: texts[q][k] and, if asked, each reply's mean token log-prob."""
    dec = decoder_for(model, tokenizer.pad_token_id, generation_stop_ids(model, tokenizer))
    rule = answer_end_rule(tokenizer, model) if stop_at_answer_end else None
    try:
        out = dec.run(seqs, max_new, n=n, temperature=temperature, keys=keys, want_logps=want_scores, stop_rule=rule)
    finally:
        dec.release()  # the stage's scorer and embedder get the memory back between batches
    texts = [tokenizer.batch_decode([r.tokens for r in row], skip_special_tokens=True) for row in out]
    scores = None
    if want_scores:
        scores = [[(sum(r.logps) / len(r.logps)) if r.logps else None for r in row] for row in out]  # type: ignore[arg-type]
    return texts, scores
