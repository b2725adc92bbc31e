"""Interrupted runs lose nothing, reruns are byte-identical, one run writes an output at a time, failed writes
keep every complete record, outputs follow the umask, a killed fine-tune resumes."""

from __future__ import annotations

import errno
import os
import signal
import socket
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
        if records.exists() and records.read_bytes().count(b"\n") >= at_least:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    return records.read_bytes().count(b"\n") if records.exists() else 0


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


# ---------------------------------------------------------------- one writer per output


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} lines (exit {proc.poll()})")


def _ids(path: Path) -> list[str]:
    import json

    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_second_run_on_the_same_outputs_is_refused_in_one_line(tmp_path, tiny_model_dir):
    extra = ["--limit", "40", "--batch-size", "2", "--method", "unsure", "--shots", "0"]
    cmd = _cmd("run_MMLU.py", tiny_model_dir, tmp_path, *extra)
    rec = tmp_path / "td" / "tiny-llama" / "probe_MMLU_ID_train_0shot.jsonl"
    first = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(rec, 2, first)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken, so the race is deterministic
        second = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert "Loading weights" not in second.stderr  # refused before it loads the model
    lines = [line for line in lines if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "probe_MMLU_ID_train_0shot.jsonl: in use by another run" in lines[0]
    assert f"pid {first.pid} on {socket.gethostname()}" in lines[0]
    ids = _ids(rec)
    assert len(ids) == 40 and len(set(ids)) == 40  # one writer: no record twice
    assert not rec.with_name("probe_MMLU_ID_train_0shot.lock").exists()  # released at the end
    rerun = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]  # the study is not stuck
    assert _ids(rec) == ids


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_model_dir):
    extra = ["--limit", "24", "--batch-size", "2", "--method", "unsure"]
    cmd = _cmd("run_ParaRel.py", tiny_model_dir, tmp_path, *extra)
    rec = tmp_path / "td" / "tiny-llama" / "probe_ParaRel_ID_train.jsonl"
    lock = rec.with_name("probe_ParaRel_ID_train.lock")
    first = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_lines(rec, 2, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert f'"pid": {first.pid}' in lock.read_text()  # the dead run's lock file is still there
    rerun = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = _ids(rec)
    assert len(ids) == 24 and len(set(ids)) == 24 and not lock.exists()


def test_lock_holder_is_named_and_stale_lock_files_are_taken_over(tmp_path):
    from kb.errors import KbError
    from kb.layout import lock_path
    from kb.locks import _HELD, lock_output, release_all

    out = tmp_path / "probe_X.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kb.locks import lock_output; "
                               "lock_output(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KbError, match=rf"probe_X.jsonl: in use by another run \(pid {holder.pid} on "):
            lock_output(out)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file names a dead pid, and the next run takes it over
    assert f'"pid": {holder.pid}' in lock_path(out).read_text()
    lock_output(out)
    assert f'"pid": {os.getpid()}' in lock_path(out).read_text()
    lock_output(out)  # re-entrant within one process
    release_all()
    assert not lock_path(out).exists() and not _HELD


def test_data_parallel_ranks_lock_their_own_files(tmp_path, monkeypatch):
    from kb.locks import lock_output, rank_path, release_all

    rec = tmp_path / "probe_X.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from kb.distributed import Dist
    from kb.engine import shard_path

    assert rank_path(rec) == shard_path(rec, Dist(1, 2)) == tmp_path / "probe_X.jsonl.shard-1-of-2"  # what rank 1 writes
    lock_output(rank_path(rec))
    monkeypatch.setenv("RANK", "0")
    assert rank_path(rec) == rec
    lock_output(rec)  # rank 0's lock does not collide with rank 1's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe_X.lock", "probe_X.shard-1-of-2.lock"]
    release_all()


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    from kb.io import RecordLog, write_json
    from kb.locks import release_all

    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.meta.json", {"x": 1})
        with RecordLog(tmp_path / "r.jsonl") as log:
            log.append({"id": "a"})
        (tmp_path / "plain.txt").write_text("x")  # what ordinary file creation gives
    finally:
        os.umask(old)
        release_all()
    for name in ("a.meta.json", "r.jsonl", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ---------------------------------------------------------------- write failures


def _failing_write(monkeypatch, target: str, after_records: int):
    """os.write that fails with ENOSPC on `target` once N records are in, after writing half a line."""
    real = os.write
    state = {"records": 0, "failed": False}

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(target):
            return real(fd, data)
        if state["records"] >= after_records:
            if not state["failed"]:
                state["failed"] = True
                return real(fd, bytes(data[: len(data) // 2]))  # a partial line reaches the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        state["records"] += 1
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return state


def test_full_disk_keeps_every_complete_record_and_the_rerun_continues(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from run_ParaRel import main

    def argv(root: Path) -> list[str]:
        return ["--model", str(tiny_model_dir), "--output-dir", str(root / "td"), "--results-dir", str(root / "res"),
                "--device", "cpu", "--limit", "12", "--batch-size", "2", "--method", "unsure"]

    main(argv(tmp_path / "ref"))
    expected = (tmp_path / "ref" / "td" / "tiny-llama" / "probe_ParaRel_ID_train.jsonl").read_bytes()
    rec = tmp_path / "run" / "td" / "tiny-llama" / "probe_ParaRel_ID_train.jsonl"
    capsys.readouterr()
    state = _failing_write(monkeypatch, "probe_ParaRel_ID_train.jsonl", after_records=5)
    with pytest.raises(SystemExit) as err:
        main(argv(tmp_path / "run"))
    monkeypatch.undo()
    assert err.value.code == 2 and state["failed"]
    err_text = capsys.readouterr().err
    msg = ["error:" + tail for tail in err_text.split("error:")[1:]]  # a progress bar may precede it on its line
    assert "Traceback" not in err_text and len(msg) == 1, err_text[-2000:]
    assert "write failed (No space left on device) after 5 complete records, all kept" in msg[0]
    assert rec.read_bytes() == b"".join(expected.splitlines(keepends=True)[:5])  # no partial line left behind
    main(argv(tmp_path / "run"))
    assert rec.read_bytes() == expected  # continued, nothing lost or repeated


def test_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    from kb.errors import KbError
    from kb.io import write_json

    target = tmp_path / "rtuning_unsure_X.json"
    write_json(target, {"v": 1})

    def full(fd, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KbError, match="rtuning_unsure_X.json: write failed .No space left on device.; the previous"):
        write_json(target, {"v": 2})
    monkeypatch.undo()
    assert target.read_text() == '{\n "v": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == [target.name]


# ---------------------------------------------------------------- fine-tune killed with SIGKILL


def _complete(ckpt: Path) -> bool:
    import json

    try:
        return bool(json.loads((ckpt / "trainer_state.json").read_text()))
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_finetune_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir):
    import json

    import yaml

    from kb.models import load_model

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "finetune_cpu_demo.yaml").read_text())
    cfg.update(learning_rate=5e-3, max_steps=60, per_device_train_batch_size=4, gradient_accumulation_steps=1,
               logging_steps=1, save_steps=5, save_total_limit=2, max_length=128, keep_checkpoints=False)
    cfg["lora"].update(layers=None, r=8, alpha=16, dropout=0.0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    pairs = [(f"Question: what is {i} plus {i}? Answer:", f" {2 * i}.") for i in range(16)]
    (tmp_path / "train.json").write_text(json.dumps({"type": "text2text",
                                                     "instances": [{"input": q, "output": a} for q, a in pairs]}))
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "finetune.py"), "--model", str(tiny_model_dir), "--recipe",
           str(tmp_path / "cfg.yaml"), "--train-file", str(tmp_path / "train.json"), "--output-dir", str(out),
           "--results-dir", str(tmp_path / "res")]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(_complete(p) for p in ckpts.glob("checkpoint-*")):  # one checkpoint is safely on disk
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the fine-tune ended before it could be killed"
    assert json.loads((out / "kb_finetune.json").read_text())["status"] == "running"
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if _complete(p))
    assert done and done[-1] < 60

    rerun = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    meta = json.loads((out / "kb_finetune.json").read_text())
    assert meta["status"] == "complete" and meta["steps"] == 60
    resumed = int(meta["resumed_from"].split("-")[1])
    assert resumed >= done[-1] and resumed % 5 == 0  # from its last complete checkpoint, not from step 0
    steps = json.loads((out / "loss.json").read_text())["step"]
    assert steps == list(range(1, 61))  # every step logged once: none repeated, none lost
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert lm.adapter and not (out / "checkpoints").exists() and not (tmp_path / "run.lock").exists()


# ---------------------------------------------------------------- remote code


class DownloadAttempted(BaseException):
    """Not an Exception, so no error handler on the way can swallow it."""


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch or import a model from the hub fails the test."""
    import huggingface_hub
    import transformers

    def boom(*a, **k):
        raise DownloadAttempted(f"a download was attempted: {a} {k}")

    for mod, name in [(transformers.AutoTokenizer, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_pretrained"),
                      (transformers.AutoConfig, "from_pretrained"), (huggingface_hub, "hf_hub_download"),
                      (huggingface_hub, "snapshot_download")]:
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("model", ["Qwen/Qwen-7B", "THUDM/chatglm2-6b"])
def test_remote_code_model_without_the_flag_is_refused_before_any_download(model, tmp_path, no_download, capsys):
    from run_MMLU import main

    with pytest.raises(SystemExit) as err:
        main(["--model", model, "--output-dir", str(tmp_path / "td"), "--results-dir", str(tmp_path / "res"),
              "--limit", "2", "--device", "cpu"])
    assert err.value.code == 2
    text = capsys.readouterr().err
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text
    assert f"model '{model}' runs Python code from its hub repository" in lines[0]
    assert "add --trust-remote-code --revision <commit you read>" in lines[0]
    assert not (tmp_path / "td").exists()


def test_remote_code_needs_a_pinned_commit(no_download):
    from kb.errors import KbError
    from kb.models import load_model

    for rev in (None, "main", "v1.0", "ef3c5c9"):
        with pytest.raises(KbError, match="needs --revision <40-hex commit>"):
            load_model("Qwen/Qwen-7B", device="cpu", trust_remote_code=True, revision=rev)
    with pytest.raises(DownloadAttempted, match="download was attempted.*revision.: .ef3c5c9c57b252f3149c1408daf4d649ec8b6c85"):
        load_model("Qwen/Qwen-7B", device="cpu", trust_remote_code=True, revision="ef3c5c9c57b252f3149c1408daf4d649ec8b6c85")


def test_revision_and_flag_are_in_the_provenance(tiny_lm):
    import dataclasses

    from kb.provenance import make_meta

    meta = make_meta("probe", {}, tiny_lm, None)
    assert meta["model"]["revision"] is None and meta["model"]["trust_remote_code"] is False
    pinned = dataclasses.replace(tiny_lm, revision="a" * 40, trust_remote_code=True)
    meta = make_meta("probe", {}, pinned, None)
    assert meta["model"]["revision"] == "a" * 40 and meta["model"]["trust_remote_code"] is True


@pytest.mark.parametrize("script", ["run_qwen_7b.sh", "run_chatglm2_6b.sh"])
def test_remote_code_launchers_pin_a_commit(script):
    import re

    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / script), "--dry-run", "--limit", "2"], capture_output=True,
                         text=True, cwd=REPO_ROOT, env={**ENV, "PY": sys.executable}, timeout=120)
    assert out.returncode == 0, out.stderr
    loads = [line for line in out.stdout.splitlines() if " --model " in line and "build_rait.py" not in line]
    assert loads and all(re.search(r"--trust-remote-code --revision [0-9a-f]{40}( |$)", line) for line in loads), loads
