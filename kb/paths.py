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
