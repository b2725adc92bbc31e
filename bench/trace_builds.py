"""Run a kb script in this process and list every Triton build it pays for: each kernel compile and each C
module Triton builds (its driver, one launcher per kernel signature), with start time, seconds and thread,
and the loading steps around them (tokenizer, weights, the move to the device, kb's prebuild).

Why: the first run on a machine builds kb's kernels; this shows what that costs and whether the builds
happen in kb.engine.prebuild's threads (while the model loads) or on the main thread (inside the first
pass). Run it with an empty Triton cache to see the first run:

    TRITON_CACHE_DIR=$(mktemp -d) python bench/trace_builds.py run_ParaRel.py --model smollm2-135m \
        --domain ID --split train --restart
    TRITON_CACHE_DIR=$(mktemp -d) python bench/trace_builds.py --no-prebuild run_ParaRel.py ...   # the baseline

Needs CUDA and Triton (the builds it traces happen on a GPU machine only).
"""

from __future__ import annotations

import argparse
import atexit
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
EVENTS: list[tuple[str, str, float, float, str, str]] = []  # kind, name, start, seconds, thread, detail


def _record(kind: str, name: str, start: float, detail: str = "") -> None:
    EVENTS.append((kind, name, start - T0, time.perf_counter() - start, threading.current_thread().name, detail))


def _timed(owner: Any, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _record("load", label, start)
        return out

    setattr(owner, attr, wrapper)


def _traced_module_build(build: Any) -> Any:
    def compile_module(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = build(*args, **kwargs)
        _record("c-module", kwargs.get("name", args[1] if len(args) > 1 else "?"), start)
        return out

    return compile_module


def install(prebuild: bool) -> None:
    """Wrap Triton's builders and the loading steps (Triton 3.x's JITFunction and NVIDIA driver modules)."""
    import torch
    import transformers
    import triton.backends.nvidia.driver as nvidia
    import triton.runtime.jit as jit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kb.engine.prebuild as pb
    import kb.models

    compile_kernel = jit.JITFunction._do_compile

    def do_compile(self: Any, key: Any, signature: Any, device: Any, constexprs: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = compile_kernel(self, key, signature, device, constexprs, *args, **kwargs)
        _record("kernel", self.fn.__name__, start, f"{signature} {dict(constexprs)}"[:300])
        return out

    jit.JITFunction._do_compile = do_compile
    # Triton's C modules: its driver, and (Triton <= 3.6) a launcher per kernel signature, built from source
    # text (`_src`) or from a file (`_file`, newer Triton), each named by its second argument.
    for attr in ("compile_module_from_src", "compile_module_from_file"):
        if hasattr(nvidia, attr):
            setattr(nvidia, attr, _traced_module_build(getattr(nvidia, attr)))
    _timed(transformers.AutoTokenizer, "from_pretrained", "tokenizer")
    _timed(transformers.AutoModelForCausalLM, "from_pretrained", "weights")
    _timed(torch.nn.Module, "to", "module.to")
    wait = pb.Prebuild.wait

    def timed_wait(self: Any) -> None:
        start = time.perf_counter()
        wait(self)
        seconds = {k: round(v, 2) for k, v in self.seconds.items()}
        _record("load", "prebuild.wait", start, f"failed={self.failed} seconds per kernel={seconds}")

    pb.Prebuild.wait = timed_wait
    if not prebuild:
        kb.models._start_prebuild = lambda *args, **kwargs: None


def report() -> None:
    print(f"== builds and loading steps: {len(EVENTS)} events in {time.perf_counter() - T0:.2f} s")
    for kind, name, at, seconds, thread, detail in sorted(EVENTS, key=lambda e: e[2]):
        print(f"{kind:8s} {name:18s} at {at:7.2f} s took {seconds:6.3f} s [{thread}] {detail}")
    for kind in ("kernel", "c-module"):
        mine = [e for e in EVENTS if e[0] == kind]
        main = sum(e[3] for e in mine if e[4] == "MainThread")
        print(f"{kind}: {len(mine)} builds, {sum(e[3] for e in mine):.2f} s in all, {main:.2f} s on the main thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-prebuild", action="store_true", help="build on first use, as before kb.engine.prebuild")
    ap.add_argument("script", help="the kb script to run (e.g. run_ParaRel.py)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = ap.parse_args()
    install(prebuild=not args.no_prebuild)
    atexit.register(report)
    sys.argv = [args.script, *args.args]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
