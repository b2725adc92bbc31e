"""One writer per output: an exclusive lock on a stage's outputs, held until the stage's main() returns.

The lock is `flock` on a small file beside the output (`probe_X.jsonl` -> `probe_X.lock`, a fine-tuning
dir `run/` -> `run.lock`), holding the holder's pid, host and start time. The kernel drops a flock when
its process dies (SIGKILL included), so a lock file left by a dead run is simply taken over by the next
one. A second run on the same outputs stops at once with one line naming the file and the holder.
Ranks of one data-parallel launch lock different files: rank 0 the final file, rank r > 0 its shard.

Guarantee and limits: this holds on one machine and on shared file systems whose flock is
cluster-wide (NFSv4, Lustre with `flock` mounted, GPFS); on a file system without working flock two
hosts could still write at once.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from kb.errors import KbError, at_stage_end
from kb.paths import lock_path, shard_path

_HELD: dict[str, tuple[int, Path | None]] = {}  # lock file -> (open fd, the first folder made for it)


def rank_path(path: Path) -> Path:
    """What this process writes for `path` in a torchrun/accelerate launch: rank 0 the file, rank r its shard
    (kb.engine.driver.shard_path's, computed here from the environment so no torch import is needed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1 or rank == 0:
        return Path(path)
    return shard_path(Path(path), rank, world)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def lock_output(path: Path) -> Path:
    """Hold the lock of `path` for this process (re-entrant); another holder is a one-line KbError."""
    lock = lock_path(Path(path)).absolute()
    if str(lock) in _HELD:
        return lock
    made = next((p for p in reversed([lock.parent, *lock.parent.parents]) if not p.exists()), None)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # mode through the umask, like any output
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise KbError(f"{lock}: cannot lock ({err.strerror})") from None
            raise KbError(f"{path}: in use by another run ({_holder(lock)}); wait for it to finish, "
                          "or write to another --output-dir") from None
        # The holder before us may have removed the file between our open and our flock: then we hold a
        # lock on a deleted file and must take the new one.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD[str(lock)] = (fd, made)
        return lock
    raise KbError(f"{lock}: could not take the lock (the file keeps being replaced)")


def release_all() -> None:
    """Drop every lock this process holds (end of a stage's main(); also at exit). Folders made only for
    a lock are removed again when they stayed empty, so a run refused on bad input leaves nothing behind."""
    for name, (fd, made) in list(_HELD.items()):
        try:
            os.unlink(name)  # while still holding it, so nobody can lock the old file after us
        except OSError:
            pass
        os.close(fd)
        del _HELD[name]
        folder = Path(name).parent
        while made is not None and (folder == made or made in folder.parents):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
            folder = folder.parent


atexit.register(release_all)
at_stage_end(release_all)  # cli_main: at the end of each stage's main(), not only at exit
