"""Command-line error handling shared by the scripts: a user error prints `error: <message>` and exits 2.

`run_cli(main)` calls `main(argv)`; bad input (a `ValueError` such as `InvalidDataError`, an `OSError` such as a
missing file, a missing optional package, or a [`CliError`]) becomes one line on stderr and exit status 2 instead
of a traceback. `--debug` (stripped from the arguments when the script has no flag of that name) or `BCLS_DEBUG=1`
keeps the traceback. Imports only the standard library, so any part may use it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


class CliError(SystemExit):
    """A user error raised inside a script's `main`: exit status 2, `str(err)` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2  # SystemExit prints nothing for an int code: `run_cli` (or the caller) prints the message

    def __str__(self) -> str:
        return str(self.args[0])


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("BCLS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _message(err: BaseException) -> str:
    text = str(err)
    if type(err).__name__.startswith("StrictDataclass") and "\n" in text:  # huggingface_hub wraps a ValueError
        text = text.splitlines()[-1].strip()
    if isinstance(err, (KeyError,)) or not text:
        text = f"{type(err).__name__}: {text}"
    return text


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, strip_debug: bool = True) -> int:
    """Run `main(argv)`; 0 on success, 2 (after printing `error: ...`) for a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv) if strip_debug else debug_enabled(())
    if strip_debug:
        argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except CliError as err:
        if debug:  # the error it stands for, with its traceback
            traceback.print_exception(err.__cause__ or err, file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit:
        raise
    except Exception as err:
        user_error = isinstance(err, USER_ERRORS) or type(err).__name__.startswith("StrictDataclass")
        if debug or not user_error:
            raise
        print(f"error: {_message(err)} (BCLS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


__all__ = ["CliError", "USER_ERRORS", "debug_enabled", "run_cli"]
