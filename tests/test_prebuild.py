"""kb.engine.prebuild: the kernels' background builds while a model loads.

On a GPU the point is timing (bench/README.md, v7); here: the stand-in launches are valid calls of every
kernel wrapper (run through Triton's interpreter), the thread pool reports failures instead of raising,
and load_model starts the builds for the model's config and waits for them before it returns."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from kb.engine import prebuild
from kb.models import load_model
from kb.paths import REPO_ROOT
from kb.testing import in_triton_interpreter, triton_interpreter_env

HERE = "tests/test_prebuild.py"


def _llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, vocab_size=400, hidden_act="silu")


def test_nothing_starts_where_the_kernels_do_not_run(monkeypatch):
    def config():
        raise AssertionError("the config is not even read")

    assert prebuild.start_prebuild(config, "cpu", torch.float32) is None
    monkeypatch.setattr(prebuild, "triton_runs", lambda device: True)  # a GPU machine, a config that fails
    assert prebuild.start_prebuild(lambda: 1 / 0, "cuda", torch.float32) is None


def test_launches_run_in_threads_and_failures_are_reported_not_raised(monkeypatch):
    ran: dict[str, str] = {}

    def fine() -> None:
        ran["fine"] = threading.current_thread().name

    def broken() -> None:
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(prebuild, "kernel_launches", lambda cfg, device, dtype: {"fine": fine, "broken": broken})
    job = prebuild.Prebuild(_llama(), "cpu", torch.float32)
    job.wait()
    assert ran["fine"].startswith("kb-prebuild")
    assert job.failed == {"broken": "no compiler here"}
    assert set(job.seconds) == {"fine", "broken"}


def test_stand_ins_launch_every_kernel_a_model_uses(monkeypatch):
    if not in_triton_interpreter(f"{HERE}::test_stand_ins_launch_every_kernel_a_model_uses"):
        return
    monkeypatch.setattr(prebuild, "flash_supported", lambda *a: True)  # CUDA-only paths, run on CPU here
    monkeypatch.setattr(prebuild, "triton_available", lambda *a: True)
    launched: list[str] = []
    for name in ("rms_norm", "silu_mul", "rope", "own_half_merged", "lse_merge"):
        real = getattr(prebuild, name)
        monkeypatch.setattr(prebuild, name, lambda *a, _n=name, _f=real, **k: (launched.append(_n), _f(*a, **k))[1])
    calls = prebuild.kernel_launches(_llama(), torch.device("cpu"), torch.float32)
    assert set(calls) == {"sampler", "rms_norm", "silu_mul", "rope", "own_half", "lse_merge"}
    for name, fn in calls.items():
        out = fn()
        if name == "sampler":
            assert out is None  # kb.engine.noise.pick_kernel_problem: the kernel draws as the eager sampler
    assert launched.count("rope") == 2 * 2  # queries and keys (4 and 2 heads), decoding and prefill widths
    assert set(launched) == {"rms_norm", "silu_mul", "rope", "own_half_merged", "lse_merge"}
    # A family kb.engine.fused does not cover: the sampler and the attention kernels only.
    gpt2 = GPT2Config(n_embd=64, n_head=4, n_layer=1, vocab_size=400)
    assert set(prebuild.kernel_launches(gpt2, torch.device("cpu"), torch.float32)) == {"sampler", "own_half",
                                                                                         "lse_merge"}


def test_load_model_builds_for_its_config_and_waits(monkeypatch, tiny_model_dir):
    started: list[tuple[str, str, torch.dtype]] = []
    waited: list[bool] = []

    class Job:
        def wait(self) -> None:
            waited.append(True)

    def start(config, device, dtype):
        started.append((config().model_type, device, dtype))
        return Job()

    monkeypatch.setattr(prebuild, "start_prebuild", start)
    load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert started == [("llama", "cpu", torch.float32)] and waited == [True]
    load_model(str(tiny_model_dir), device="cpu", dtype="float32", for_training=True)  # training: no kernels
    assert len(started) == 1


def test_trace_builds_runs_a_stage_and_reports(tmp_path, tiny_model_dir):
    """bench/trace_builds.py against the installed Triton's internals (CPU: no builds, the loading steps)."""
    env = triton_interpreter_env()
    if env is None:
        pytest.skip("no Triton to be had")
    out = subprocess.run(
        [sys.executable, "bench/trace_builds.py", "--no-prebuild", "run_ParaRel.py", "--model", str(tiny_model_dir),
         "--domain", "ID", "--split", "train", "--limit", "4", "--device", "cpu", "--dtype", "float32",
         "--output-dir", str(tmp_path / "td"), "--results-dir", str(tmp_path / "res")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== builds and loading steps" in out.stdout
    assert re.search(r"^load +weights +at .* \[MainThread\]", out.stdout, re.M)
    assert "kernel: 0 builds" in out.stdout and "c-module: 0 builds" in out.stdout
