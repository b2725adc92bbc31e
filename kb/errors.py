"""One error type for everything a user can get wrong, printed as one line by the scripts."""

from __future__ import annotations

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


def cli_main(func: F) -> F:
    """Run a script's main(); a KbError or Ctrl-C becomes one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except KbError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished records are kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
