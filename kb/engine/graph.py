"""The device decoder's step (kb.engine.decode.Decoder): static buffers and one decoding step over them,
captured once as a CUDA graph and replayed.

Every buffer the step reads or writes (the prompt caches of g question slots, the generated keys/values of
their g * n rows, the tokens, the stop flags and the output tokens) is allocated once per shape, so on CUDA
the step is recorded as a graph and each later step is one replay: no per-kernel launches from Python.
The fast path (fused attention, the sampler as one Triton kernel) falls back to the plain one when this
machine lacks a kernel or compiler. Which question sits in which slot is kb.engine.decode's business.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from kb.engine.attention import decoder_stack, model_flash_supported, register_attention
from kb.engine.fused import Fusion, fused_layers
from kb.engine.memory import usable_cuda_bytes
from kb.engine.noise import CompiledPick, pick, pick_kernel, pick_kernel_problem, vocab_term
from kb.engine.own_attention import triton_available, triton_runs
from kb.engine.step import (
    DECODE_ATTN,
    FlashIndex,
    StepContext,
    StopRule,
    decode_attention,
    decode_step,
    emit_tokens,
)
from kb.models import attention_dims, text_config


class StepGraph:
    """The buffers and the decoding step of a supported model (kb.engine.decode.decoder_supported).

    `graphs` (default: on CUDA) captures the step as a CUDA graph; `fused` (default: on CUDA) uses a fused
    attention kernel: flash attention over the used keys in half precision (`flash`, default: where
    supported; `own_kernel` (default where Triton runs): its own half, this step's key/value write and the
    merge through kb.engine.own_attention's kernel), else the memory-efficient kernel over whole masked buffers (fp32);
    `sampler_kernel` (default: on CUDA where it builds and draws as `pick`, else `pick` compiled; True also
    forces it off CUDA, for Triton's interpreter) draws through kb.engine.noise's Triton kernel; `fused_kernels` (default: where
    kb.engine.fused supports the model) runs the layers' element-wise work as kb.engine.fused's kernels.
    """

    def __init__(self, model: Any, stop_ids: Sequence[int], *, graphs: bool | None = None, fused: bool | None = None,
                 sampler_kernel: bool | None = None, flash: bool | None = None, own_kernel: bool = True,
                 fused_kernels: bool | None = None) -> None:
        register_attention(DECODE_ATTN, decode_attention)
        self.model = model
        self.fusion = Fusion(model, fused_kernels)  # RMSNorm, RoPE, SiLU·up as Triton kernels (CUDA, Llama family)
        self.stop_ids = sorted(set(stop_ids))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        self.fused = cuda if fused is None else fused
        self._pick: Any = pick
        if sampler_kernel:  # forced (also off CUDA, for Triton's interpreter)
            self._pick = pick_kernel
        elif sampler_kernel is None and triton_runs(self.device):  # one launch, where it builds
            head = model.get_output_embeddings().weight
            problem = pick_kernel_problem(self.device, head.shape[0], head.dtype)
            if problem is None:
                self._pick = pick_kernel
            else:
                warnings.warn(f"kb.engine.graph: the sampler kernel is not used ({problem}); compiling the "
                              "sampler instead", stacklevel=2)
                self._pick = CompiledPick()
        self.memory_fraction = 0.7  # of free memory for the buffers (the step's temporaries are counted in)
        cfg = text_config(model)
        self.layers = cfg.num_hidden_layers
        self.heads, self.kv_heads, self.head_dim = attention_dims(cfg)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        can_flash = self.fused and model_flash_supported(model)
        self.flash = can_flash if flash is None else (flash and can_flash)
        self.own_kernel = bool(own_kernel) and self.flash and triton_available(self.device, self.head_dim)

    @property
    def sampler(self) -> str:
        """Which sampler the steps use: "kernel" (kb.engine.noise's Triton kernel), "compiled" or "eager"."""
        return "kernel" if self._pick is pick_kernel else "compiled" if isinstance(self._pick, CompiledPick) else "eager"

    # -------------------------------------------------------------- sizing

    def fitting_slots(self, n: int, p: int, t: int) -> int:
        """Questions (groups of n rows, p prompt and t generated tokens) whose buffers fit: 64 on CPU."""
        if self.device.type != "cuda":
            return 64
        free = usable_cuda_bytes(self.device)
        kv_tok = self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize
        per_group = kv_tok * (p + n * t) + n * self.vocab * 4 * 8  # caches + the step's [rows, V] temporaries
        per_group += n * self.heads * (p + t) * 4 * 4  # fp32 attention scores
        return max(1, int(free * self.memory_fraction / per_group))

    # -------------------------------------------------------------- buffers and the step

    def _alloc(self, g: int, n: int, p: int, t: int, temperature: float | None, want_logps: bool,
               stop_rule: StopRule | None, max_new: int) -> dict[str, Any]:
        dev, dt = self.device, self.dtype
        b = g * n
        # [rows, length, Hkv, D]: a row's keys are one contiguous run (the flash path's varlen layout).
        kv = lambda rows, length: torch.zeros((rows, length, self.kv_heads, self.head_dim), dtype=dt, device=dev)  # noqa: E731
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
        st["prompt_ok"] = torch.zeros((g, 1, 1, p), dtype=torch.bool, device=dev)
        st["own_ok"] = torch.zeros((g * n, 1, 1, t), dtype=torch.bool, device=dev)
        if self.fused:
            st["prompt_bias"] = torch.zeros((g, 1, 1, p), dtype=dt, device=dev)
            # The fused kernel wants the bias rows 16-aligned: a padded buffer, seen through a slice.
            st["own_bias"] = torch.zeros((g * n, 1, 1, -(-t // 16) * 16), dtype=dt, device=dev)[..., :t]
        st["flash"] = FlashIndex.alloc(g, n, p, t, dev, self.own_kernel) if self.flash else None
        return st

    def _step(self, st: dict[str, Any]) -> None:
        """One decoding step over all rows: feed tok at position plen + step, pick and record the next token."""
        model, dec = self.model, decoder_stack(self.model)
        step = st["step"]
        pos = (st["plen"][st["group_of_row"]] + step)[:, None]
        x = model.get_input_embeddings()(st["tok"][:, None])
        pe = dec.rotary_emb(x, pos)
        flash = st["flash"] if self.flash else None
        if flash is not None:  # used lengths instead of masks
            flash.own_kernel = self.own_kernel
            flash.own_used.copy_(step + 1)
            flash.prompt_used.copy_(st["plen"])
        else:
            st["own_ok"].copy_((st["pos_t"][None, :] <= step[:, None])[:, None, None, :])
            if self.fused:
                st["own_bias"].copy_(torch.zeros_like(st["own_bias"]).masked_fill_(~st["own_ok"], float("-inf")))
        ctx = StepContext(st["kp"], st["kg"], st["prompt_ok"], st["own_ok"], step, st["rows"], st["n"],
                          st["rows"] * st["t"] + step, self.fused, st.get("prompt_bias"), st.get("own_bias"), flash)
        with decode_step(model, ctx), fused_layers(model, self.fusion.on):
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
            while True:
                try:
                    with torch.cuda.stream(side):
                        self._step(st)  # warm-up (allocator, lazy inits, the kernels' compiles) before capture
                    break
                except Exception as err:  # noqa: BLE001  (a kernel or compiler this machine lacks)
                    if isinstance(err, torch.cuda.OutOfMemoryError) or not (
                            self.flash or self.fused or self.fusion.on or self._pick is not pick):
                        raise
                    # One step down at a time: the own-half kernel -> the fused element-wise kernels -> flash
                    # -> the memory-efficient kernel -> plain attention and the eager sampler.
                    dropped = ("the own-half kernel" if self.own_kernel else "the fused kernels" if self.fusion.on
                               else "flash attention" if self.flash else "the fast step")
                    warnings.warn(f"kb.engine.graph: {dropped} failed ({str(err).splitlines()[0][:200]}); "
                                  "using the next path", stacklevel=2)
                    if self.own_kernel:
                        self.own_kernel = False
                    elif self.fusion.on:
                        self.fusion.on = False
                    elif self.flash:
                        self.flash = False
                    else:
                        self.fused, self._pick = False, pick
                    torch.cuda.synchronize(self.device)
                    for k, v in saved.items():
                        st[k].copy_(v)
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
