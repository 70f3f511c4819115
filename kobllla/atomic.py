"""Atomic outputs, without importing torch (text tools and their workers use these too).

An output directory is built in a hidden sibling ``.NAME.tmp-PID`` and renamed into place only
when complete, so a killed job never leaves a directory that looks finished; siblings left by
killed runs (their PID no longer runs) are removed by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def write_text(path: Path, text: str) -> None:
    """Writes UTF-8 text through a temporary sibling and a rename: readers see the old file or the new one."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    """Writes JSON through a temporary file and a rename."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def refuse_output_over_inputs(out: Path, inputs: Iterable[Path | None]) -> None:
    """Refuses an output that is an input, lies inside an input directory, or would replace one.

    Inputs are never modified: writing ``--out X --input X`` (or an output directory that holds an
    input) would destroy the input when the finished output is renamed into place.

    Raises:
        ValueError: naming both paths and the fix.
    """
    out_r = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_r = Path(inp).resolve()
        same = out_r == inp_r or (out_r.exists() and inp_r.exists() and os.path.samefile(out_r, inp_r))
        if same or inp_r in out_r.parents or out_r in inp_r.parents:
            raise ValueError(f"output {out} would overwrite or replace input {inp}; inputs are never "
                             "modified: pick an output path outside every input")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Removes a directory tree or a single file (or link), ignoring errors."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def remove_stale_temporaries(out_dir: Path) -> None:
    """Removes ``.NAME.tmp-PID`` and ``.NAME.old-PID`` siblings left by killed runs (their PID no longer runs)."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)$")
    if not out_dir.parent.is_dir():
        return
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and (entry.is_dir() or match.group(1) == "old") and not pid_alive(int(match.group(2))):
            log.info("removing %s, left by a killed run", entry)
            _remove(entry)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Renames the finished ``tmp`` to ``out_dir``, replacing an existing one only at the end."""
    if out_dir.exists() or out_dir.is_symlink():
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        _remove(trash)
    else:
        os.replace(tmp, out_dir)


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``out_dir``; renames it to ``out_dir`` on success.

    On any exception the temporary directory is removed. Temporary siblings left by runs
    that were killed (their process no longer exists) are removed first.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        NotADirectoryError: ``out_dir`` is a file (a directory output never replaces a file).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a directory; this output is a directory: "
                                 "pick another path (a file is never replaced by a directory)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pick another output or pass --overwrite to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
