"""Interrupted runs lose nothing, reruns are byte-identical (issue: reliability)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kb.paths import REPO_ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _cmd(script: str, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / script), "--model", str(model), "--output-dir", str(out / "td"),
            "--results-dir", str(out / "res"), "--device", "cpu", *extra]


def _outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json*")) if p.is_file()}


def _kill_when(cmd: list[str], records: Path, at_least: int, sig: int) -> int:
    """Start cmd, wait until `records` holds at least N lines, send `sig`; return how many were kept."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= at_least:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    return records.read_text().count("\n") if records.exists() else 0


PROBES = [
    ("run_ParaRel.py", "probe_ParaRel_ID_train.jsonl", ["--limit", "24", "--batch-size", "2", "--method", "uncertain"]),
    ("run_MMLU.py", "probe_MMLU_ID_train_5shot.jsonl", ["--limit", "60", "--batch-size", "2", "--method", "all"]),
    ("query_state.py", "state_MMLU_ID_train_5shot.jsonl", ["--dataset", "mmlu", "--limit", "60", "--batch-size", "2"]),
    ("query_state.py", "state_ParaRel_ID_train_3shot.jsonl",
     ["--dataset", "pararel", "--limit", "16", "--batch-size", "2", "--n-samples", "4", "--max-new-tokens", "6"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,records,extra", PROBES, ids=[f"{p[0]}-{p[1]}" for p in PROBES])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, script, records, extra):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(script, tiny_model_dir, ref, *extra), env=ENV, check=True, capture_output=True)
    expected = (ref / "td" / "tiny-llama" / records).read_text()
    n_total = expected.count("\n")
    run = tmp_path / "run"
    rec = run / "td" / "tiny-llama" / records
    kept = []
    for sig, at in ((signal.SIGKILL, 3), (signal.SIGINT, n_total // 3), (signal.SIGKILL, 2 * n_total // 3)):
        kept.append(_kill_when(_cmd(script, tiny_model_dir, run, *extra), rec, at, sig))
    assert kept[0] < n_total, "the run finished before it could be killed; the test proves nothing"
    subprocess.run(_cmd(script, tiny_model_dir, run, *extra), env=ENV, check=True, capture_output=True)
    assert rec.read_text() == expected  # identical records, none lost, none duplicated, same order
    ref_out, run_out = _outputs(ref / "td"), _outputs(run / "td")
    assert ref_out.keys() == run_out.keys()


@pytest.mark.slow
def test_same_seed_gives_byte_identical_outputs(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    extra = ["--limit", "16", "--batch-size", "3", "--method", "all"]
    subprocess.run(_cmd("run_ParaRel.py", tiny_model_dir, out, *extra), env=ENV, check=True, capture_output=True)
    first = _outputs(out)
    subprocess.run(_cmd("run_ParaRel.py", tiny_model_dir, out, *extra, "--restart"), env=ENV, check=True, capture_output=True)
    second = _outputs(out)
    assert first.keys() == second.keys() and len(first) >= 8
    for name in first:
        assert first[name] == second[name], name
