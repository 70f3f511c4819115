"""Reading rows from local files (csv, json, jsonl, parquet) or the Hugging Face hub; no torch import.

Local files are read here rather than through ``datasets.load_dataset`` so that every error
names the file, the place and the field, and nothing is cached or copied. Hub ids go through
``datasets.load_dataset``.

Places are numbered once, the same way everywhere: in a text file (CSV, JSON Lines) by the
1-based physical line where the row starts (``kolima.jsonl line 12``: what an editor shows,
blank lines and a CSV header included); in a JSON array, a parquet file or a hub split by the
1-based row (``lima.parquet row 12``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kobllla.jsonl import iter_jsonl

Row = dict[str, Any]
LOCAL_FORMATS = ("csv", "json", "jsonl", "parquet")
_SUFFIX_FORMAT = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages: ``kolima.jsonl line 12`` or ``lima.parquet row 3``."""

    origin: str
    number: int
    unit: Literal["line", "row"] = "line"

    def __str__(self) -> str:
        return f"{self.origin} {self.unit} {self.number}"


def _format_of(path: Path, declared: str | None) -> str:
    if declared in ("csv", "parquet", "jsonl"):
        return declared
    suffix_format = _SUFFIX_FORMAT.get(path.suffix.lower())
    if declared == "json":
        return "jsonl" if suffix_format == "jsonl" else "json"
    if suffix_format is None:
        raise ValueError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
            f"use one of {sorted(_SUFFIX_FORMAT)} or set source: csv|json|parquet"
        )
    return suffix_format


def _iter_csv(path: Path) -> Iterator[tuple[int, str, Row]]:
    """``(line where the record starts, "line", row)``; a quoted field may span lines."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        before = 0
        for record in reader:
            start, before = before + 1, reader.line_num
            if not record:  # a blank line: csv.DictReader skips it too
                continue
            if header is None:
                header = record
                continue
            row: Row = dict(zip(header, record, strict=False))
            if len(record) > len(header):
                row[None] = record[len(header):]  # as csv.DictReader's restkey
            for name in header[len(record):]:
                row[name] = None
            yield start, "line", row


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, Row]]:
    for line_no, obj in iter_jsonl(path):
        yield line_no, "line", obj


def _iter_json(path: Path) -> Iterator[tuple[int, str, Row]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines in a .json file
            yield from _iter_jsonl(path)
            return
        raise ValueError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    if isinstance(obj, dict):
        yield 1, "row", obj
        return
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a list of objects or JSON Lines, found {type(obj).__name__}")
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{path} row {i}: expected an object, found {type(item).__name__}")
        yield i, "row", item


def _iter_parquet(path: Path) -> Iterator[tuple[int, str, Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, "row", row


_READERS = {"csv": _iter_csv, "json": _iter_json, "jsonl": _iter_jsonl, "parquet": _iter_parquet}


def _local_files(source: str, data_files: str | list[str] | None) -> tuple[list[Path], str | None] | None:
    """Returns (files, declared format) for local input, or None for a hub id."""
    if source in LOCAL_FORMATS:
        if not data_files:
            raise ValueError(f"source: {source} needs data_files: <path> (one path or a list)")
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        return [Path(f).expanduser() for f in files], source
    path = Path(source).expanduser()
    if path.suffix.lower() in _SUFFIX_FORMAT or path.exists() or source.startswith((".", "/", "~")):
        return [path], None
    return None


def iter_rows(
    source: str,
    *,
    data_files: str | list[str] | None = None,
    name: str | None = None,
    split: str = "train",
) -> Iterator[tuple[RowRef, Row]]:
    """Yields ``(RowRef, row)`` for every row, in file order.

    Args:
        source (str): ``csv``/``json``/``jsonl``/``parquet`` (with ``data_files``), a path to a
            local file, or a Hugging Face hub dataset id.
        data_files (str | list[str] | None): local file(s) when ``source`` names a format.
        name (str | None): hub dataset configuration (e.g. ``20231101.ko``).
        split (str): hub split; local files are read whole.

    Raises:
        FileNotFoundError: a local file does not exist.
        ValueError: unknown format, unreadable file, or a file with no rows.
    """
    local = _local_files(source, data_files)
    if local is None:
        yield from _iter_hub(source, name=name, split=split)
        return
    files, declared = local
    for path in files:
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory; point data_files/source at a file in it")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; check data_files/source in the dataset config")
        reader = _READERS[_format_of(path, declared)]
        count = 0
        try:
            for number, unit, row in reader(path):
                count += 1
                yield RowRef(path.name, number, unit), row
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8"
            ) from None
        if count == 0:
            raise ValueError(
                f"{path}: the file has no rows (empty, blank lines or a header only); pass a file with rows"
            )


def _iter_hub(source: str, *, name: str | None, split: str) -> Iterator[tuple[RowRef, Row]]:
    from datasets import load_dataset

    dataset = load_dataset(source, name=name, split=split)
    origin = f"{source}{'/' + name if name else ''}[{split}]"
    for i, row in enumerate(dataset, start=1):
        yield RowRef(origin, i, "row"), row


def require_field(ref: RowRef, row: Row, field: str, *, config_key: str) -> Any:
    """Returns ``row[field]`` or raises naming the file, line, field and the columns present.

    ``config_key`` is what sets the field: a config key (``conversation_column``) or a CLI flag
    (``--column``), named in the fix.
    """
    if field not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        fix = f"pass {config_key} NAME" if config_key.startswith("--") else \
            f"set {config_key}: <name> in the dataset config"
        raise ValueError(f"{ref}: no field {field!r} (fields: {present}); {fix}")
    return row[field]
