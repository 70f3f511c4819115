"""Run records on disk: one JSON per run, and a history file with one line per run.

Layout of a results dir::

    RESULTS_DIR/runs/20261123T140501Z-stage1.json   # full record (written via temp + rename)
    RESULTS_DIR/history.jsonl                       # appended last: the run is complete

A run record (``schema: kobllla.eval.run/1``)::

    {"run_id", "label", "timestamp", "model": {"spec", "local", "fingerprint", "device", "dtype",
     "batch_size", "max_length"}, "versions": {"lm_eval", "transformers", "torch", "kobllla"},
     "limit", "tasks": {TASK: {"version", "n_shot", "n_samples": {"original", "effective"},
     "data": {...}, "metrics": {METRIC: {"value", "stderr", "higher_is_better"}}}}}

Perplexity on held-out text is stored as tasks named ``heldout_<lang>`` in the same shape.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from kobllla.atomic import write_json
from kobllla.jsonl import iter_jsonl

RUN_SCHEMA = "kobllla.eval.run/1"
HISTORY_NAME = "history.jsonl"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_label(label: str) -> str:
    """Labels name runs in files and report rows: letters, digits, ``._+-``."""
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r} must start with a letter or digit and use only letters, digits and ._+-")
    return label


def new_run_id(label: str, results_dir: Path, now: datetime | None = None) -> str:
    """``<UTC timestamp>-<label>``, with ``-2``, ``-3``... if that file already exists."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{check_label(label)}"
    run_id, n = base, 1
    while (Path(results_dir) / "runs" / f"{run_id}.json").exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def save_run(record: dict, results_dir: Path) -> Path:
    """Writes the run JSON atomically, then appends its summary line to ``history.jsonl``."""
    results_dir = Path(results_dir)
    (results_dir / "runs").mkdir(parents=True, exist_ok=True)
    path = results_dir / "runs" / f"{record['run_id']}.json"
    write_json(path, record)
    summary = {
        "run_id": record["run_id"],
        "label": record["label"],
        "timestamp": record["timestamp"],
        "model": record["model"]["spec"],
        "fingerprint": record["model"]["fingerprint"],
        "file": str(path.relative_to(results_dir)),
        "scores": {
            f"{task}/{metric}": entry["value"]
            for task, t in record["tasks"].items()
            for metric, entry in t["metrics"].items()
        },
    }
    line = json.dumps(summary, ensure_ascii=False) + "\n"
    with open(results_dir / HISTORY_NAME, "a", encoding="utf-8") as handle:
        handle.write(line)  # one write of one line: readers never see half a record
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_run(path: Path) -> dict:
    """Reads one run record.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a run record of this schema.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run record {path} does not exist; pass a runs/*.json written by `python -m eval.run`")
    try:
        record = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path} is not a run record (schema {found!r}, expected {RUN_SCHEMA!r})")
    for key in ("run_id", "label", "tasks", "model"):
        if key not in record:
            raise ValueError(f"{path} has no field {key!r}; it was not written by `python -m eval.run`")
    return record


def load_history(results_dir: Path) -> list[dict]:
    """Summary lines of ``history.jsonl`` in the order the runs finished (none if the file is empty).

    Raises:
        FileNotFoundError: no ``history.jsonl`` in ``results_dir``.
        ValueError: a line is not a JSON object (file and line named).
    """
    path = Path(results_dir) / HISTORY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m eval.run --results-dir {results_dir}` first")
    rows = []
    for line_no, row in iter_jsonl(path):
        if not isinstance(row.get("label"), str) or not isinstance(row.get("file"), str):
            raise ValueError(f"{path} line {line_no}: no 'label' and 'file' fields, so not a line written by "
                             "`python -m eval.run`; delete that line")
        rows.append(row)
    return rows


def latest_runs(results_dir: Path) -> dict[str, dict]:
    """The latest full record of each label in a results dir, in first-seen label order.

    Raises:
        ValueError: the history lists no run.
    """
    latest: dict[str, str] = {}
    for row in load_history(results_dir):
        latest[row["label"]] = row["file"]
    if not latest:
        raise ValueError(
            f"{Path(results_dir) / HISTORY_NAME} lists no run (the file is empty or blank): no evaluation has "
            f"finished there yet; run `python -m eval.run --results-dir {results_dir}` first"
        )
    return {label: load_run(Path(results_dir) / rel) for label, rel in latest.items()}


def load_runs(paths: list[Path]) -> dict[str, dict]:
    """Run records from files or results dirs (latest run per label), keyed by label.

    Raises:
        ValueError: two different runs carry the same label.
    """
    runs: dict[str, dict] = {}
    for path in map(Path, paths):
        found = latest_runs(path) if path.is_dir() else {(r := load_run(path))["label"]: r}
        for label, record in found.items():
            if label in runs and runs[label]["run_id"] != record["run_id"]:
                raise ValueError(
                    f"two runs are labelled {label!r} ({runs[label]['run_id']}, {record['run_id']}); "
                    "pass only one of them"
                )
            runs[label] = record
    return runs
