"""bench/bench_finetune.py from a fresh clone: its own timing file, a random-init model, both trainers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_finetune_reports_tokens_and_mfu_with_equal_losses(tmp_path):
    out = tmp_path / "finetune.json"
    run = subprocess.run([sys.executable, "bench/bench_finetune.py", "--random-init", "llama-tiny", "--recipe",
                          "configs/finetune_rtuning.yaml", "--instances", "24", "--steps", "2", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [r["trainer"] for r in res["runs"]] == ["trl", "kb"]
    assert res["max_loss_diff"] < 1e-4  # the same loss through both trainers
    for r in res["runs"]:
        assert r["steps"] == 2 and r["tokens_seen"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert res["train_file"].startswith("timing file: mmlu:ID_train")
    assert "MFU" in run.stdout
