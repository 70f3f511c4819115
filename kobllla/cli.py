"""The one CLI pattern every ``tools/*.py`` and ``eval/*.py`` follows.

    from kobllla.cli import make_parser, run

    def main(argv: list[str] | None = None) -> int:
        args = make_parser(__doc__, prog="python -m tools.x").parse_args(argv)  # + add_argument calls
        return run(lambda: _work(args))

``make_parser`` takes the whole module docstring (its first line is the description, the rest,
with its example commands, is shown after the flags in ``--help``). ``run`` turns a user error
into one line ``error: ...`` on stderr and exit status 2, never a traceback; any other exception
is a bug and propagates. Messages are capped so an echoed value (a whole file, a huge row) can
never flood the terminal.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """An error the user can fix (bad input, a missing file, a refused output); exit status 2."""


# What counts as the user's error: bad values, missing or unreadable paths, a refused output.
# OSError covers FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)

MAX_MESSAGE_CHARS = 2000


def cap(value: object, limit: int = 200) -> str:
    """``str(value)`` shortened to ``limit`` characters (with how much was cut) for error messages."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def one_line(message: object) -> str:
    """A message as one capped line: newlines folded, at most ``MAX_MESSAGE_CHARS`` characters."""
    text = " ".join(str(message).split())
    return cap(text, MAX_MESSAGE_CHARS)


def make_parser(doc: str | None, *, prog: str) -> argparse.ArgumentParser:
    """An argparse parser whose description is ``doc``'s first line and epilog the rest of it."""
    doc = (doc or "").strip("\n")
    first, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(prog=prog, description=first.strip(), epilog=rest.strip("\n") or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def error_exit(exc: BaseException, code: int = 2) -> int:
    """Prints ``error: <one line>`` to stderr and returns ``code``."""
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return code


def run(work: Callable[[], int | None], *, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Calls ``work``; a user error becomes one stderr line and exit 2, Ctrl-C exit 130."""
    try:
        code = work()
    except errors as exc:
        return error_exit(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else code


def exit_fast(code: int) -> NoReturn:
    """Ends a CLI process with ``code`` after its atexit handlers, without the interpreter's teardown.

    For the ``__main__`` of commands that hold a model: freeing thousands of modules and tensors one by
    one (and, on a GPU, the CUDA context) took 1.4 s after ``eval.run``'s work on a 2-core box with the
    mini model; the OS frees the same memory at once (mypy ends its runs the same way). Everything is
    still saved: every output file was closed and renamed by the work itself, atexit handlers (logging,
    tqdm, multiprocessing) run, stdout and stderr are flushed. If a thread other than a daemon is still
    running, or ``KOBLLLA_FAST_EXIT=0`` is set (to measure), the process exits the usual way instead.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or os.environ.get("KOBLLLA_FAST_EXIT", "1") == "0":
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)


def number_arg(kind: type, *, minimum: float, inclusive: bool = True, below: float | None = None):
    """An argparse ``type=``: ``kind(text)`` >= ``minimum`` (> when not ``inclusive``; < ``below`` if
    given), finite; argparse then names the flag in its one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        ok = value == value and (value >= minimum if inclusive else value > minimum) and value != float("inf")
        if below is not None:
            ok = ok and value < below
        if not ok:
            want = f"{'>=' if inclusive else '>'} {minimum:g}" + (f" and < {below:g}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value
    return parse
