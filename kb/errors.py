"""One error type for everything a user can get wrong, printed as one line by the scripts."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class KbError(Exception):
    """A user-facing error: bad input, missing file, unknown name. Printed without a traceback."""


def data_error(path: object, message: str, row: object | None = None, field: str | None = None) -> KbError:
    """Build the standard `file[:row][: field]: message` error so every stage reads the same."""
    where = str(path)
    if row is not None:
        where += f": row {row}"
    if field is not None:
        where += f": field '{field}'"
    return KbError(f"{where}: {message}")


# Failed writes a user fixes outside kb (full disk, quota, read-only or lost mount): one line, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}

_AT_STAGE_END: list[Callable[[], object]] = []


def at_stage_end(func: Callable[[], object]) -> None:
    """Run `func` whenever a script's main() (cli_main) returns or fails, as atexit does at process exit.

    How a module with per-stage state cleans up without this module importing it: kb.locks registers its
    release_all here, so a stage's outputs are free for the next run even in a process that goes on."""
    if func not in _AT_STAGE_END:
        _AT_STAGE_END.append(func)


def cli_main(func: F) -> F:
    """Run a script's main(); a KbError or Ctrl-C becomes one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except KbError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            print(f"error: {err.filename or 'output'}: {err.strerror}; finished records are kept: free space or fix "
                  "the folder, then rerun the same command to continue", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished records are kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        finally:
            for cleanup in _AT_STAGE_END:
                cleanup()  # e.g. kb.locks.release_all: the stage's outputs are free for the next run

    return wrapper  # type: ignore[return-value]
