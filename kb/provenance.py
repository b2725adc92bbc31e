"""What every output says about how it was made, and the check that a rerun may resume into it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kb.data import Sample
from kb.errors import KbError
from kb.io import read_json, write_json
from kb.layout import judged_path
from kb.locks import lock_output, rank_path
from kb.paths import REPO_ROOT

PACKAGES = ("torch", "transformers", "peft", "trl", "numpy")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def samples_digest(samples: Sequence[Sample]) -> str:
    """Hash of the exact questions used (content, not file names): the dataset version a run saw."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_json(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


OPERATIONAL_FLAGS = {"restart"}  # how a run was started, not what it computes: kept out of outputs


def recorded_args(args: Any) -> dict[str, Any]:
    """The resolved arguments to store with an output (minus operational flags, so reruns are byte-identical)."""
    items = vars(args) if not isinstance(args, dict) else args
    return {k: v for k, v in items.items() if k not in OPERATIONAL_FLAGS}


def make_meta(stage: str, run_key: dict[str, Any], lm: Any | None, samples: Sequence[Sample] | None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`run_key` holds everything that changes the records; it decides whether a rerun may resume."""
    meta: dict[str, Any] = {"stage": stage, "run_key": run_key}
    if lm is not None:
        meta["model"] = {"name": lm.name, "label": lm.label, "source": lm.source, "fingerprint": lm.fingerprint,
                         "adapter": lm.adapter, "device": lm.device, "dtype": lm.dtype,
                         "revision": lm.revision, "trust_remote_code": lm.trust_remote_code}
    if samples is not None:
        meta["questions"] = {"n": len(samples), "digest": samples_digest(samples)}
    meta["packages"] = package_versions()
    meta["git_commit"] = git_commit()
    if extra:
        meta.update(extra)
    return meta


def check_resumable(meta_path: Path, meta: dict[str, Any], restart: bool) -> None:
    """Refuse to append to records made with different arguments, model or questions."""
    if restart or not meta_path.exists():
        return
    old = read_json(meta_path)
    if not isinstance(old, dict) or not isinstance(old.get("model") or {}, dict):
        raise KbError(f"{meta_path}: not a meta file kb wrote (not a JSON object with a 'model' object); rerun with "
                      "--restart to start over")
    mine = {"run_key": meta.get("run_key"), "model": (meta.get("model") or {}).get("fingerprint"),
            "questions": meta.get("questions")}
    theirs = {"run_key": old.get("run_key"), "model": (old.get("model") or {}).get("fingerprint"),
              "questions": old.get("questions")}
    if mine != theirs:
        diff = [k for k in mine if mine[k] != theirs[k]]
        if "run_key" in diff:
            a, b = mine["run_key"] or {}, theirs["run_key"] or {}
            diff = [f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + \
                   [k for k in diff if k != "run_key"]
        raise KbError(
            f"{meta_path}: existing records were made differently ({'; '.join(map(str, diff))}); "
            "rerun with --restart to start over or choose another --output-dir"
        )


def start_records(rec_path: Path, meta_path: Path, meta: dict[str, Any], restart: bool) -> None:
    """Prepare a resumable record file: refuse mismatched old records, drop them on --restart or when
    their meta is missing (they cannot be trusted to match), then write this run's meta."""
    lock_output(rank_path(rec_path))  # before anything is read or written: one run per record file
    check_resumable(meta_path, meta, restart)
    if restart or (rec_path.exists() and not meta_path.exists()):
        rec_path.unlink(missing_ok=True)
        judged_path(rec_path).unlink(missing_ok=True)  # evaluate.py --reclassify's verdicts of those records
    write_json(meta_path, meta)
