"""JSON I/O shared by every stage: atomic final files, append-only resumable record files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kb.errors import KbError, data_error


def _dumps(obj: Any, indent: int | None) -> str:
    # allow_nan=False: a NaN in an output is a bug upstream, never something to write silently.
    return json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False, sort_keys=False)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically (temp file + rename): a killed run never leaves a truncated file."""
    return write_text(path, _dumps(obj, indent) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    return write_text(path, "".join(_dumps(r, None) + "\n" for r in rows))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line KbError naming it."""
    path = Path(path)
    if not path.is_file():
        raise KbError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise data_error(path, f"malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError as err:
        raise data_error(path, str(err)) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number")


def iter_jsonl(path: str | os.PathLike[str], tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record). A torn last line (a run killed mid-write) is skipped when asked."""
    path = Path(path)
    if not path.is_file():
        raise KbError(f"{path}: file not found")
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as err:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                return
            raise data_error(path, f"malformed JSON line ({err})", row=i) from None
        if not isinstance(rec, dict):
            raise data_error(path, "each line must be a JSON object", row=i)
        yield i, rec


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_jsonl(path)]


class RecordLog:
    """Append-only per-question records with resume.

    Each record is one JSON line flushed as soon as it is known, so an interrupted run keeps every
    finished question. Reopening skips ids already present; a torn last line is dropped and rewritten.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            good: list[str] = []
            for lineno, rec in iter_jsonl(self.path, tolerate_torn_tail=True):
                if key not in rec:
                    raise data_error(self.path, f"record has no '{key}'", row=lineno)
                if rec[key] in self.records:
                    raise data_error(self.path, f"duplicate id {rec[key]!r}", row=lineno)
                self.records[rec[key]] = rec
                good.append(_dumps(rec, None) + "\n")
            # Rewrite only if a torn tail was dropped, so the append below starts on a clean line.
            with open(self.path, encoding="utf-8") as fh:
                raw = fh.read()
            if raw and not raw.endswith("\n"):
                write_text(self.path, "".join(good))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, rec: dict[str, Any]) -> None:
        self.records[rec[self.key]] = rec
        self._fh.write(_dumps(rec, None) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finite(x: float) -> float:
    """Guard a number going into JSON; NaN/inf means a numerical bug, so fail loudly."""
    if not math.isfinite(x):
        raise KbError(f"non-finite value {x} produced; refusing to write it")
    return x
