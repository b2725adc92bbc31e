"""Paths are arguments relative to the repo root, so no script needs a `cd`."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(path: str | os.PathLike[str]) -> Path:
    """Resolve a user path: absolute stays, relative is taken from the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as a reader of a written file can use it: relative to the repo when inside it."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)


def cache_dir() -> Path:
    """Where converted checkpoints and other reusable artefacts live (override with KB_CACHE)."""
    root = os.environ.get("KB_CACHE") or Path.home() / ".cache" / "kb"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(name: str) -> str:
    """A file-name-safe label for a model or dataset ('Qwen/Qwen-7B' -> 'Qwen-7B')."""
    tail = name.rstrip("/").split("/")[-1]
    tail = re.sub(r"\.gguf$", "", tail)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail) or "model"


# The two names kb.locks needs sit here, below it, so that locking imports no dataset code; kb.layout
# re-exports them with every other file name.
def lock_path(output: Path) -> Path:
    """The lock of an output (file or dir, kb.locks): its name minus `.jsonl`, plus `.lock`, in the same folder."""
    return output.with_name(output.name.replace(".jsonl", "") + ".lock")


def shard_path(path: Path, rank: int, world: int) -> Path:
    """What rank r > 0 of a data-parallel launch appends to instead of `path`: its shard."""
    return path.with_name(f"{path.name}.shard-{rank}-of-{world}")
