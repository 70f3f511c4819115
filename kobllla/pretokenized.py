"""Pre-tokenized corpora, the writer: a text dataset as one flat uint32 token file plus document ends.

torchtune tokenizes and packs the whole corpus in RAM every time a run starts (hours and
out-of-memory on large corpora: torchtune issues #1051, #1149, #2180). Here the corpus is
tokenized once, on every core, into a directory that training memory-maps: ``tokens.uint32.bin``,
``doc_ends.int64.bin`` and ``manifest.json`` (written last), the format of :mod:`kobllla.token_file`,
which also holds its reader and checks.

Each document is ``[bos] + encode(NFC(text)) + [eos]`` with empty rows skipped and counted,
token for token what ``kobllla.datasets.kowikitext_dataset`` builds in memory (both call
``kobllla.token_file.document_tokens``). The output is built in a hidden sibling ``.OUT.partial``
that is committed (fsync'd, with a progress record) after every chunk of rows: a killed run
resumes where it stopped when rerun with the same arguments, and ``OUT`` appears, by rename, only
when complete.

Size: 4 bytes a token and 8 a document (500 M tokens in 1.15 M articles: 2 GB + 9 MB). Measured
throughput and start-up figures: docs/benchmarks.md, "Pre-tokenized corpora".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from kobllla.atomic import pid_alive, refuse_output_over_inputs, replace_dir, write_json
from kobllla.cli import cap
from kobllla.pool import ordered_map, start_pool
from kobllla.rows import LOCAL_FORMATS, iter_rows, require_field
from kobllla.token_file import (  # the format; open_pretokenized re-exported for callers of this module
    END_DTYPE,
    ENDS_FILE,
    MANIFEST,
    TOKEN_DTYPE,
    TOKENS_FILE,
    document_tokens,
    format_fields,
    open_pretokenized,
    partial_dir,
    tokenizer_fields,
)
from kobllla.versions import package_versions

__all__ = ["ENDS_FILE", "MANIFEST", "OWNER", "PROGRESS", "TOKENS_FILE", "open_pretokenized", "pretokenize"]

PROGRESS = "progress.json"
OWNER = "owner.pid"

_TOKENIZER = None  # the worker's tokenizer, set by _init_worker


def pretokenize(
    *,
    source: str,
    out_dir: str | Path,
    tokenizer_path: str | Path,
    data_files: str | list[str] | None = None,
    name: str | None = None,
    split: str = "train",
    column: str = "text",
    workers: int | None = None,
    chunk_rows: int = 512,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenizes every row of a text dataset into ``out_dir`` (see the module docstring).

    Args:
        source: ``csv``/``json``/``jsonl``/``parquet`` with ``data_files``, a local file, or a hub id.
        out_dir: output directory; must not exist unless ``overwrite``.
        tokenizer_path: Llama 3 ``tokenizer.model`` (read with torchtune's ``llama3_tokenizer``).
        data_files: local file(s) when ``source`` names a format.
        name: hub configuration (e.g. ``20231101.ko``).
        split: hub split.
        column: the text column.
        workers: tokenizer processes (default: every core); 1 tokenizes in this process.
        chunk_rows: rows per worker task and per commit of the resumable output.
        overwrite: replace an existing ``out_dir``.
        progress: a progress bar (tokens/s) on stderr.

    Returns:
        dict: the manifest.

    Raises:
        FileNotFoundError: no tokenizer file or input file.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: bad settings, an output over an input, a missing column, a non-text field, or
            no text at all.
        RuntimeError: a worker died, or another process is writing the same output.
    """
    out_dir = Path(out_dir).expanduser()
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or [])
    inputs = [Path(tokenizer_path), *map(Path, files), *([Path(source)] if Path(source).exists() else [])]
    refuse_output_over_inputs(out_dir, inputs)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pick another --out or pass --overwrite to replace it")
    workers = _default_workers() if workers is None else workers
    if workers < 1 or chunk_rows < 1:
        raise ValueError(f"workers and chunk_rows must be >= 1, got workers={workers}, chunk_rows={chunk_rows}")
    tokenizer_path = Path(tokenizer_path).expanduser()
    tokenizer = _load_tokenizer(tokenizer_path)
    fingerprint = _fingerprint(source, data_files, name, split, column, tokenizer_path)
    work = partial_dir(out_dir)
    state = _resume_or_start(work, fingerprint)
    start = time.monotonic()
    try:
        _tokenize_into(work, state, tokenizer_path, source=source, data_files=data_files, name=name, split=split,
                       column=column, workers=workers, chunk_rows=chunk_rows, progress=progress)
    except (ValueError, FileNotFoundError):
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    if state["documents"] == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(
            f"no text to tokenize: {state['rows']} rows read, {state['skipped_empty']} empty; "
            "check --column/--data-files"
        )
    manifest = _manifest(state, fingerprint, tokenizer, workers, time.monotonic() - start)
    _commit(work, out_dir, manifest)
    return manifest


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load_tokenizer(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file; pass --tokenizer <model dir>/original/tokenizer.model")
    from torchtune.models.llama3 import llama3_tokenizer

    try:
        return llama3_tokenizer(str(path))
    except Exception as exc:  # tiktoken raises several types for a file that is not BPE ranks
        raise ValueError(  # the error can quote the whole file (a tokenizer.json is 9 MB): capped
            f"{path}: not a Llama 3 tiktoken tokenizer.model ({type(exc).__name__}: {cap(exc, 120)}); pass "
            "<model dir>/original/tokenizer.model, not tokenizer.json"
        ) from None


def _fingerprint(source: str, data_files, name, split: str, column: str, tokenizer_path: Path) -> dict:
    """What decides the output: a partial run is resumed only when this is unchanged."""
    if data_files is None:
        files = []
    else:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files and (source not in LOCAL_FORMATS and Path(source).expanduser().is_file()):
        files = [source]
    inputs = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file; check --data-files/--source")
        st = p.stat()
        inputs.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {
        "source": source, "name": name, "split": split, "column": column, "inputs": inputs,
        "tokenizer": {"path": str(tokenizer_path.resolve()),
                      "sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()},
    }


def _resume_or_start(work: Path, fingerprint: dict) -> dict:
    """Opens ``work`` for appending: resumes a matching partial run or starts a fresh one."""
    fresh = {"fingerprint": fingerprint, "rows": 0, "documents": 0, "tokens": 0, "skipped_empty": 0,
             "resumed_at_row": 0}
    owner = work / OWNER
    if owner.is_file():
        pid = int(owner.read_text() or 0)
        if pid != os.getpid() and pid_alive(pid):
            raise RuntimeError(f"{work}: another pretokenize (pid {pid}) is writing this output; wait or stop it")
    progress = work / PROGRESS
    state = json.loads(progress.read_text(encoding="utf-8")) if progress.is_file() else None
    if state is None or state.get("fingerprint") != fingerprint or not _truncate_to(work, state):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for f in (TOKENS_FILE, ENDS_FILE):
            (work / f).touch()
        write_json(work / PROGRESS, fresh)
        state = fresh
    else:
        state["resumed_at_row"] = state["rows"]
    owner.write_text(str(os.getpid()))
    return state


def _truncate_to(work: Path, state: dict) -> bool:
    """Cuts bytes written after the last commit (a kill mid-chunk); False if files are short."""
    sizes = {TOKENS_FILE: state["tokens"] * TOKEN_DTYPE.itemsize, ENDS_FILE: state["documents"] * END_DTYPE.itemsize}
    for f, size in sizes.items():
        path = work / f
        if not path.is_file() or path.stat().st_size < size:
            return False
        os.truncate(path, size)
    return True


class Chunk(NamedTuple):
    """``rows`` rows read, ``empty`` of them skipped, the others' ``texts``."""

    rows: int
    empty: int
    texts: list[str]


def _chunks(
    source: str, data_files, name, split: str, column: str, skip_rows: int, chunk_rows: int
) -> Iterator[Chunk]:
    """A :class:`Chunk` per ``chunk_rows`` rows, after skipping committed rows."""
    rows, empty, texts = 0, 0, []
    for i, (ref, row) in enumerate(iter_rows(source, data_files=data_files, name=name, split=split)):
        if i < skip_rows:
            continue
        text = require_field(ref, row, column, config_key="--column")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError(
                f"{ref}: field {column!r} is {type(text).__name__}, expected text; fix the row or pick another --column"
            )
        rows += 1
        if text.strip():
            texts.append(text)
        else:
            empty += 1
        if rows == chunk_rows:
            yield Chunk(rows, empty, texts)
            rows, empty, texts = 0, 0, []
    if rows:
        yield Chunk(rows, empty, texts)


def _init_worker(tokenizer_path: str, parent_pid: int | None = None) -> None:
    """Loads the tokenizer; in a pool worker (``parent_pid`` given), dies with the parent."""
    global _TOKENIZER
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    from torchtune.models.llama3 import llama3_tokenizer

    _TOKENIZER = llama3_tokenizer(tokenizer_path)


def _die_with_parent(parent_pid: int) -> None:
    """A worker whose parent was SIGKILLed would otherwise wait on its task queue forever (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Worker task: the chunk's tokens (uint32) and each document's length."""
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        before = len(ids)
        ids.extend(document_tokens(_TOKENIZER, text))
        lengths[i] = len(ids) - before
    return np.array(ids, dtype=TOKEN_DTYPE), lengths


def _encode(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    return _encode_chunk(chunk.texts)  # looked up when called, so a test can replace _encode_chunk


def _tokenize_into(work: Path, state: dict, tokenizer_path: Path, *, source, data_files, name, split, column,
                   workers: int, chunk_rows: int, progress: bool) -> None:
    pool = None
    if workers > 1:
        pool = start_pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), os.getpid()))
    else:
        _init_worker(str(tokenizer_path))
    bar = tqdm(desc="pretokenize", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr, mininterval=1.0)
    chunks = _chunks(source, data_files, name, split, column, state["rows"], chunk_rows)
    try:
        with open(work / TOKENS_FILE, "ab") as tf, open(work / ENDS_FILE, "ab") as ef:
            for (rows, empty, _), (flat, lengths) in ordered_map(pool, _encode, chunks, window=2 * workers):
                tf.write(flat.tobytes())
                ef.write((state["tokens"] + np.cumsum(lengths)).astype(END_DTYPE).tobytes())
                _commit_chunk(work, state, tf, ef, rows=rows, empty=empty, docs=len(lengths), tokens=len(flat))
                bar.update(len(flat))
                bar.set_postfix(docs=state["documents"], refresh=False)
    except BrokenProcessPool:
        raise RuntimeError(
            f"a tokenizer worker died after {state['rows']} rows (killed for memory?); "
            f"the {state['rows']} committed rows are kept: rerun the same command with fewer --workers to resume"
        ) from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _commit_chunk(work: Path, state: dict, tf, ef, *, rows: int, empty: int, docs: int, tokens: int) -> None:
    """Makes the chunk durable, then records it: a kill leaves at most an uncommitted tail."""
    for f in (tf, ef):
        f.flush()
        os.fsync(f.fileno())
    state["rows"] += rows
    state["skipped_empty"] += empty
    state["documents"] += docs
    state["tokens"] += tokens
    write_json(work / PROGRESS, state)


def _manifest(state: dict, fingerprint: dict, tokenizer, workers: int, elapsed: float) -> dict:
    tokens = state["tokens"]
    return {
        **format_fields(tokens=tokens, documents=state["documents"]),
        "counts": {
            "rows": state["rows"], "documents": state["documents"], "skipped_empty": state["skipped_empty"],
            "tokens": tokens,
        },
        "source": {k: fingerprint[k] for k in ("source", "name", "split", "column", "inputs")},
        "tokenizer": {**fingerprint["tokenizer"], **tokenizer_fields(tokenizer)},
        "settings": {"workers": workers, "resumed_at_row": state["resumed_at_row"]},
        "versions": package_versions("kobllla", "torchtune", "tiktoken", "python"),
        "elapsed_s": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed) if elapsed > 0 and not state["resumed_at_row"] else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _commit(work: Path, out_dir: Path, manifest: dict) -> None:
    """Manifest last, then the rename that makes ``out_dir`` appear whole."""
    (work / PROGRESS).unlink()
    (work / OWNER).unlink()
    write_json(work / MANIFEST, manifest)
    _fsync_dir(work)
    replace_dir(work, out_dir)
    _fsync_dir(out_dir.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
