"""JSON Lines reading with one-line errors (file and line named); no heavy imports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSON Lines file.

    Line numbers are 1-based physical lines (blank lines counted), as an editor shows them; a
    UTF-8 byte-order mark and CRLF line ends are accepted.

    Raises:
        ValueError: a line is not valid JSON or not a JSON object (file and line named).
    """
    with open(path, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path} line {line_no}: not valid JSON ({exc.msg}); write one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when the file does not exist.

    Raises:
        ValueError: the file is not valid JSON (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); fix or re-download it") from None
