"""kb's Triton kernels built in the background while a model loads (kb.models.load_model starts it).

Why: Triton builds a kernel on its first launch in a process (MLIR passes, ptxas, and a C launcher per
signature built with the system's C compiler) and caches the result on disk. On a machine that has never
run kb, the first probe paid for those builds one after another inside its first decoding pass (v7 on an
H200: 14.8 s to probe after loading the first time, 7.4 s the next). Here each kernel the model will use
is launched once on small tensors with the dtypes, launch constants and argument classes of its real
launches (Triton builds once per class: 1, a multiple of 16, anything else), in parallel threads that
start while the tokenizer and the weights load. The first real launch then finds its build in memory.
Any failure here is ignored: the real launch builds or fails exactly as it would have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch

from kb.engine.attention import flash_supported
from kb.engine.fused import FUSED_MODEL_TYPES, rms_norm, rope, silu_mul
from kb.engine.noise import pick_kernel_problem
from kb.engine.own_attention import lse_merge, own_half_merged, triton_available, triton_runs
from kb.models import attention_dims

_ROWS = 16  # rows of the stand-in tensors: a multiple of 16, as the real row counts mostly are


def kernel_launches(cfg: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    """The kernels a model of text config `cfg` in `dtype` will launch on `device` (by the same rules the
    decoder, the scorer and kb.engine.fused apply), each as a function that launches it on stand-ins."""
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 0) or 0
    heads, kv, d = attention_dims(cfg)
    z = lambda *shape, dt=dtype: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
    calls: dict[str, Callable[[], Any]] = {}
    # The sampler (every decoding step): the decoder's check runs it greedy and sampled, and is then cached.
    calls["sampler"] = lambda: pick_kernel_problem(device, cfg.vocab_size, dtype)
    if getattr(cfg, "model_type", None) in FUSED_MODEL_TYPES and getattr(cfg, "hidden_act", None) == "silu":
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))

        def ropes() -> None:
            for h in sorted({heads, kv}):  # queries and keys: the launch constant HB depends on the head count
                for seq in (1, _ROWS):  # decoding and prefill: the attention layer's [B, S, H * D] projection
                    x = z(2, seq, h * d).view(2, seq, h, d).transpose(1, 2)
                    rope(x, z(2, seq, d), z(2, seq, d))

        calls["rms_norm"] = lambda: rms_norm(z(_ROWS, hidden), z(hidden), eps)
        if inter:
            calls["silu_mul"] = lambda: silu_mul(z(_ROWS, inter), z(_ROWS, inter))
        calls["rope"] = ropes
    if flash_supported(device, dtype, d) and triton_available(device, d):
        def own_half() -> None:  # the decoding step's own half, with its real strides
            q = z(_ROWS, 1, heads * d).view(_ROWS, 1, heads, d).transpose(1, 2)[:, :, 0]
            k_new = z(_ROWS, 1, kv * d).view(_ROWS, 1, kv, d).transpose(1, 2)[:, :, 0]
            k = z(_ROWS, 32, kv, d)
            own_half_merged(q, k_new, k_new, k, k.clone(), torch.ones(_ROWS, dtype=torch.int32, device=device),
                            z(_ROWS, heads, d), z(heads, _ROWS, dt=torch.float32), d ** -0.5)

        def merge() -> None:  # the cascade scorer's merge of its two halves
            a, lse = z(_ROWS, heads, d), z(heads, _ROWS, dt=torch.float32)
            lse_merge(a, a.clone(), lse, lse.clone(), out=a)

        calls["own_half"], calls["lse_merge"] = own_half, merge
    return calls


class Prebuild:
    """The background builds for one model; `wait()` before the first real launch (load_model does).
    `failed` and `seconds` (per kernel) say what happened, for benches and tests."""

    def __init__(self, cfg: Any, device: str | torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.cfg = cfg
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="kb-prebuild", daemon=True)
        self._thread.start()

    def _on_device(self) -> Any:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                if self.device.index is None:  # the parameters' device once the model is moved: cuda:<current>
                    self.device = torch.device("cuda", torch.cuda.current_device())
                with self._on_device():
                    import triton

                    triton.runtime.driver.active.get_current_device()  # Triton's driver (one build) before the fan-out
            calls = kernel_launches(self.cfg, self.device, self.dtype)
            with ThreadPoolExecutor(len(calls), thread_name_prefix="kb-prebuild") as pool:
                list(pool.map(self._one, calls, calls.values()))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as err:  # noqa: BLE001 - the real launches build (or fail) as without this
            self.failed["prebuild"] = _first_line(err)

    def _one(self, name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            with self._on_device(), torch.inference_mode():
                fn()
        except Exception as err:  # noqa: BLE001
            self.failed[name] = _first_line(err)
        self.seconds[name] = time.perf_counter() - t0

    def wait(self) -> None:
        self._thread.join()


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def start_prebuild(config: Callable[[], Any], device: str | torch.device, dtype: torch.dtype) -> Prebuild | None:
    """Start building the kernels a model will use on `device`, where kb's kernels run (CUDA with Triton);
    None elsewhere, or where `config()` (the model's text config) fails: the model's own loading then
    reports why."""
    if not triton_runs(torch.device(device)):
        return None
    try:
        cfg = config()
    except Exception:  # noqa: BLE001
        return None
    return Prebuild(cfg, device, dtype)
