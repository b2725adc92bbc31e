"""JSON I/O shared by every stage: atomic final files, append-only resumable record files.

Every reader here turns a bad file (not UTF-8, malformed JSON, a torn last line, a failed read) into one
KbError line naming the file and row; every writer turns a failed write (full disk, lost mount) into one
line too. Files are created with the mode the umask gives, like any other file the user creates.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kb.errors import KbError, data_error
from kb.locks import lock_output


def _dumps(obj: Any, indent: int | None) -> str:
    # allow_nan=False: a NaN in an output is a bug upstream, never something to write silently.
    return json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False, sort_keys=False)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically (temp file + rename): a killed run never leaves a truncated file."""
    return write_text(path, _dumps(obj, indent) + "\n")


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_failed(path: Path, err: OSError, kept: str = "") -> KbError:
    """The one line for a write that failed (ENOSPC, EDQUOT, EIO, ...)."""
    return KbError(f"{path}: write failed ({err.strerror or err}){kept}; free space or fix the folder, then rerun "
                   "the same command to continue")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write atomically: a temp file in the same folder, fsync, rename. mkstemp makes 0600 files, so the
    mode is set to what the umask gives an ordinary new file (0644 under umask 022, 0664 under 002)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_failed(path, err) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, err, "; the previous version of the file is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    return write_text(path, "".join(_dumps(r, None) + "\n" for r in rows))


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes; missing, a folder or unreadable is one line."""
    path = Path(path)
    if not path.is_file():
        raise KbError(f"{path}: file not found")
    try:
        return path.read_bytes()
    except OSError as err:
        raise KbError(f"{path}: cannot read ({err.strerror or err})") from None


def decode_text(path: str | os.PathLike[str], raw: bytes, row: int | None = None) -> str:
    """UTF-8 text (a leading UTF-8 BOM is dropped); anything else is one line saying where and what."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        hint = "; it looks like UTF-16: save it as UTF-8" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise data_error(path, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}){hint}",
                         row=row) from None
    if "\x00" in text:
        raise data_error(path, f"NUL byte at offset {raw.index(0)} (a binary or UTF-16 file?)", row=row)
    return text


def read_text(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file (BOM dropped, CRLF and CR read as LF), or one line saying why not."""
    text = decode_text(path, read_bytes(path))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_json(path: str | os.PathLike[str], text: str, row: int | None = None) -> Any:
    """json.loads with NaN/Infinity refused and every failure one line naming the file (and row)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        where = f" at line {err.lineno} column {err.colno}" if row is None else ""
        raise data_error(path, f"malformed JSON{' line' if row is not None else ''} ({err.msg}{where})", row=row) from None
    except RecursionError:
        raise data_error(path, "JSON nested too deeply", row=row) from None
    except ValueError as err:
        raise data_error(path, str(err), row=row) from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line KbError naming it."""
    return parse_json(path, read_text(path))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number")


def iter_jsonl(path: str | os.PathLike[str], tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record). A torn last line (a run killed mid-write) is skipped when asked."""
    path = Path(path)
    raw = read_bytes(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, else a last line cut off mid-write
    for i, line in enumerate(lines + ([torn] if torn else []), start=1):
        last = i > len(lines)
        try:
            text = decode_text(path, line, row=i)
            if not text.strip():
                continue
            rec = parse_json(path, text, row=i)
        except KbError:
            if tolerate_torn_tail and last:
                return
            raise
        if not isinstance(rec, dict):
            raise data_error(path, "each line must be a JSON object", row=i)
        yield i, rec


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_jsonl(path)]


class RecordLog:
    """Append-only per-question records with resume.

    Each record is one JSON line written as soon as it is known, so an interrupted run keeps every
    finished question. Reopening skips ids already present; a torn last line is dropped and rewritten.
    A failed write (full disk) cuts the file back to its last complete record and raises one line, so a
    rerun continues from there. The file is locked (kb.locks) for this process until its script ends.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        lock_output(self.path)
        if self.path.exists():
            good: list[str] = []
            for lineno, rec in iter_jsonl(self.path, tolerate_torn_tail=True):
                if key not in rec:
                    raise data_error(self.path, f"record has no '{key}'", row=lineno)
                if not isinstance(rec[key], str):
                    raise data_error(self.path, f"must be a string, got {type(rec[key]).__name__}", row=lineno, field=key)
                if rec[key] in self.records:
                    raise data_error(self.path, f"duplicate id {rec[key]!r}", row=lineno)
                self.records[rec[key]] = rec
                good.append(_dumps(rec, None) + "\n")
            # Rewrite only if a torn tail was dropped, so the append below starts on a clean line.
            raw = read_bytes(self.path)
            if raw and not raw.endswith(b"\n"):
                write_text(self.path, "".join(good))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_failed(self.path, err) from None

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, rec: dict[str, Any]) -> None:
        """Write one record to the end of the file (one write call for a line up to the pipe buffer size)."""
        assert self._fd is not None, "append after close"
        data = memoryview((_dumps(rec, None) + "\n").encode("utf-8"))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as err:
            try:
                os.ftruncate(self._fd, start)  # drop the partial line: the file ends on a complete record
            except OSError:
                pass  # the rerun drops it as a torn tail
            raise write_failed(self.path, err, f" after {len(self.records)} complete records, all kept") from None
        self.records[rec[self.key]] = rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finite(x: float) -> float:
    """Guard a number going into JSON; NaN/inf means a numerical bug, so fail loudly."""
    if not math.isfinite(x):
        raise KbError(f"non-finite value {x} produced; refusing to write it")
    return x
