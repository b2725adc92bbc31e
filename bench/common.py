"""What both benchmarks share: the model under test, the device's measured peak, timers, the table.

A random-init model stands in for weights we do not have (the GPU machine has none): same shapes and
dtype, so the FLOPs, memory traffic and kernels are those of the real model; the tokenizer is
SmolLM2's real 49,152-token BPE (bench/tokenizer), so prompt lengths are realistic.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKENIZER_DIR = ROOT / "bench" / "tokenizer"
# Llama-2-7B's shape (vocab set by the tokenizer: 49,152 instead of 32,000; the body is identical).
RANDOM_INIT = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
    # SmolLM2-135M's shape (tied embeddings): the GPU machine has no weights, timing needs only the shape.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama-tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=4096),  # smoke runs of the GPU command
}


@dataclass
class Subject:
    """The model under test and where it runs."""

    model: Any
    tokenizer: Any
    name: str
    device: str
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="kb model name (offline alias, dir, hub id); or use --random-init")
    p.add_argument("--random-init", default=None, choices=sorted(RANDOM_INIT), help="random weights of this shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")


def random_model(shape: str, device: str, dtype: str) -> tuple[Any, Any]:
    """A random-init model of a RANDOM_INIT shape, built directly on `device`, and the bench tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **RANDOM_INIT[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return model, tok


def load_subject(args: argparse.Namespace) -> Subject:
    """A kb-loaded model, or a random-init one built directly on the device (no CPU init of 7B weights)."""
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.manual_seed(args.seed)
    if args.random_init:
        model, tok = random_model(args.random_init, args.device, dtype)
        model.eval()
        model.generation_config.pad_token_id = tok.pad_token_id
        return Subject(model, tok, f"random-init {args.random_init}", args.device, dtype)
    from kb.models import load_model

    lm = load_model(args.model or "smollm2-135m", args.device, dtype)
    return Subject(lm.model, lm.tokenizer, lm.label, args.device, dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """(result, wall seconds, peak device GiB during fn (CPU: the process's peak RSS so far), CPU seconds).

    CPU seconds (this process's user + system time) matter on a shared CPU, where wall time also counts
    the other jobs' turns."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out, dt, peak, dc


def peak_flops(device: str, dtype: str) -> float:
    """Measured matmul rate (FLOP/s): 8192^3 on GPU, 2048^3 on CPU; median of timed repeats."""
    n = 8192 if device.startswith("cuda") else 2048
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = []
    for i in range(13 if device.startswith("cuda") else 5):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 3 or not device.startswith("cuda"):
            times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def peak_bandwidth(device: str) -> float:
    """Measured device memory bandwidth (bytes/s): a 2 GiB copy (read + write), median of timed repeats."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.empty(2**30, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    del a, b
    return 2 * 2**31 / times[len(times) // 2]


def body_params(model: Any) -> int:
    """Parameters a token's forward pass multiplies through (embedding lookups and the LM head excluded)."""
    skip = {id(p) for p in model.get_input_embeddings().parameters()}
    skip |= {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    import os

    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}"


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def write_json(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")
