"""Translate (or restyle) LIMA-style chat rows through any OpenAI-compatible chat-completions endpoint.

One request per conversation: the turns go out between marker lines (``<<<USER 1>>>``,
``<<<ASSISTANT 2>>>``) and must come back with the same markers, so turn counts always match
the English rows (what ``bilima_dataset`` pairs row by row). By default user turns come back in
banmal and assistant turns in jondaetmal (KoLIMA); ``instructions`` replaces the translation
rules with your own (a style, another language), keeping the marker protocol. Code fences and
URLs are checked to survive verbatim; ``speech_levels`` also checks each Korean turn's speech
level (Kiwi) and retries a reply in the wrong one.

Every row is validated before the first request with the code ``kolima_dataset`` uses
(:mod:`kobllla.conversations`): rows the dataset builders would refuse are listed (file, line,
field) and nothing is sent, unless ``skip_invalid``. Rows are named by their 1-based physical
line in a JSON Lines file (``lima.jsonl line 12``), as every other kobllla message names them.

Robustness (the HTTP side is :mod:`kobllla.chat_api`): ``concurrency`` requests in flight;
transient failures retried with backoff; failures that cannot change on retry (no scheme in the
URL, nothing listening, 401/403/404) stop the run at once; a dead endpoint stops it after
``give_up_after_s``. Every finished row is appended to a cache (JSON lines, fsync'd) keyed by the
hash of its input, model and prompt, so a rerun or a resume after a kill sends only the rows not
done yet. A row that still fails is appended to ``OUT.errors.jsonl`` when it fails; the output
is written once, in input order, through a temporary file, and not at all while rows fail
unless ``allow_partial``. The key is read from an environment variable and never logged.

LIMA (GAIR/lima train.jsonl, 1,030 rows, ~2.9 M characters) is ~1,030 requests: at 8 in flight
and ~20 s a reply from a hosted model, about 45 minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

import kobllla
from kobllla.atomic import refuse_output_over_inputs, write_json, write_text
from kobllla.chat_api import ChatEndpoint, FatalEndpointError, RowError, check_base_url
from kobllla.conversations import SEED_TURN_SEPARATOR, Conversation, conversation_of
from kobllla.rows import iter_rows
from kobllla.translation_prompt import (
    CUSTOM_PROMPT,
    KOLIMA_PROMPT,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    Prompt,
    cache_key,
    check_speech_levels,
    parse_reply,
    parse_speech_levels,
    render_turns,
)

__all__ = [
    "CUSTOM_PROMPT", "KOLIMA_PROMPT", "PROMPT_VERSION", "SYSTEM_PROMPT", "ChatEndpoint", "Conversation",
    "FatalEndpointError", "InvalidRowsError", "Prompt", "RowError", "RowsFailedError", "cache_key", "check_base_url",
    "check_speech_levels", "parse_reply", "parse_speech_levels", "render_turns", "translate_dataset",
]


class RowsFailedError(ValueError):
    """Some rows still failed after retries; they are listed in ``OUTPUT.errors.jsonl``."""


class InvalidRowsError(ValueError):
    """Rows the dataset builders would refuse; nothing was sent."""


def translate_row(endpoint: ChatEndpoint, conv: Conversation,
                  prompt: Prompt = KOLIMA_PROMPT) -> tuple[tuple[str | None, tuple[str, ...]], dict]:
    """``((system, turns), usage)`` of one row; retries replies that fail the marker or speech-level checks."""
    messages = [{"role": "system", "content": prompt.text}, {"role": "user", "content": render_turns(conv)}]

    def accept(reply: str) -> tuple[str | None, tuple[str, ...]]:
        system, turns = parse_reply(conv, reply)
        check_speech_levels(turns, prompt.speech_levels)
        return system, turns

    return endpoint.complete(messages, accept)


# ---------------------------------------------------------------- input, cache, output


def read_rows(path: Path, *, field: str, system_field: str, limit: int | None,
              skip_invalid: bool) -> tuple[list[Conversation], list[str]]:
    """Validated conversations of the first ``limit`` rows, and the problems of the rows skipped.

    Raises:
        InvalidRowsError: some rows are not valid chat rows and ``skip_invalid`` is False (all listed).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--input {path} is a directory; pass LIMA's train.jsonl (GAIR/lima)")
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}; pass LIMA's train.jsonl (GAIR/lima)")
    convs, problems = [], []
    for n, (ref, row) in enumerate(iter_rows(str(path)), start=1):
        if limit is not None and n > limit:
            break
        try:
            convs.append(conversation_of(ref, row, conversation_column=field, system_column=system_field,
                                         config_key="--field"))
        except ValueError as exc:
            problems.append(str(exc))
    if problems and not skip_invalid:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InvalidRowsError(
            f"{len(problems)} of {len(convs) + len(problems)} rows are not chat rows the dataset builders accept, "
            f"nothing was sent: {shown}; fix them, or pass --skip-invalid to translate the others"
        )
    if not convs:
        raise InvalidRowsError(f"{path}: no valid chat row to translate ({len(problems)} skipped)")
    return convs, problems


class TranslationCache:
    """Append-only JSON lines ``{"key", "where", "system", "turns", "usage"}``, fsync'd per row.

    A line cut short by a kill is ignored and trimmed on the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_dir():
            raise IsADirectoryError(f"cache {self.path} is a directory; pass --cache FILE")
        if self.path.exists():
            self._load()
        self.created = not self.path.exists()
        try:  # fail now, not after the first paid reply, when the directory is not writable
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            raise OSError(f"cannot write the cache {self.path} ({exc.strerror or exc}); pick an --output "
                          "(or --cache) in a directory you can write") from None

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        for n, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=1):
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path} line {n}: not a cache entry; delete that line (or the file to start over)"
                ) from None
        if len(complete) != len(data):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))

    def add(self, entry: dict) -> None:
        _append_line(self.path, entry)
        self.entries[entry["key"]] = entry

    def discard_if_unused(self) -> None:
        """Removes the cache file this run created when no row was added (a run stopped at once)."""
        if self.created and not self.entries and self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()


def _append_line(path: Path, obj: dict) -> None:
    """One JSON line appended, flushed and fsync'd: a kill never loses a finished line."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _error_entry(conv: Conversation, reason: str) -> dict:
    return {conv.ref.unit: conv.ref.number, "reason": reason}


def _output_row(conv: Conversation, entry: dict, field: str, system_field: str) -> str:
    row = dict(conv.raw)
    joined = isinstance(row[field], str)  # the seed's "[sep]"-joined turns stay one string
    row[field] = f" {SEED_TURN_SEPARATOR} ".join(entry["turns"]) if joined else entry["turns"]
    if conv.system:
        row[system_field] = entry["system"]
    return json.dumps(row, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- driver


def _run_requests(endpoint: ChatEndpoint, prompt: Prompt, todo: list[int], convs: list[Conversation],
                  cache: TranslationCache, keys: list[str], errors_path: Path, concurrency: int,
                  progress: bool) -> dict[int, str]:
    """Sends ``todo`` (indices into ``convs``) on daemon threads; returns {index: reason} of failed rows."""
    jobs: queue.Queue = queue.Queue()
    for i in todo:
        jobs.put(i)
    results: queue.Queue = queue.Queue()

    def worker() -> None:
        while True:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, translate_row(endpoint, convs[i], prompt), None))
            except BaseException as exc:  # noqa: B036 - handed to the main thread, which decides
                results.put((i, None, exc))

    errors: dict[int, str] = {}
    bar = tqdm(total=len(todo), unit=" rows", desc="translate", disable=not progress, file=sys.stderr)
    for _ in range(min(concurrency, len(todo))):
        threading.Thread(target=worker, daemon=True).start()
    try:
        for _ in todo:
            i, result, exc = _next_result(results)
            if isinstance(exc, RowError):
                errors[i] = str(exc)
                _append_line(errors_path, _error_entry(convs[i], errors[i]))
            elif exc is not None:
                raise exc
            else:
                (system, turns), usage = result
                where = {convs[i].ref.unit: convs[i].ref.number}
                cache.add({"key": keys[i], **where, "system": system, "turns": list(turns), "usage": usage})
            bar.update(1)
            bar.set_postfix(failed=len(errors), refresh=False)
    finally:  # on a fatal error or Ctrl-C the daemon threads are abandoned mid-request
        endpoint.stop()
        bar.close()
    return errors


def _next_result(results: queue.Queue) -> tuple:
    while True:  # a timeout keeps Ctrl-C responsive
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            continue


def _side_paths(output_path: Path, cache_path: Path | str | None) -> dict[str, Path]:
    sibling = lambda suffix: output_path.with_name(output_path.name + suffix)  # noqa: E731
    return {"output": output_path, "cache": Path(cache_path) if cache_path else sibling(".cache.jsonl"),
            "errors": sibling(".errors.jsonl"), "manifest": sibling(".manifest.json")}


def _check_outputs(paths: dict[str, Path], input_path: Path) -> None:
    if paths["output"].is_dir():
        raise IsADirectoryError(f"--output {paths['output']} is a directory; pass a file such as "
                                f"{paths['output'] / 'kolima.jsonl'}")
    for path in paths.values():
        refuse_output_over_inputs(path, [input_path])
    if paths["cache"].resolve() in {paths[k].resolve() for k in ("output", "errors", "manifest")}:
        raise ValueError(f"--cache {paths['cache']} is one of the other output files; pick another path")


def translate_dataset(
    *,
    input_path: Path | str,
    output_path: Path | str,
    endpoint: ChatEndpoint,
    cache_path: Path | str | None = None,
    field: str = "conversations",
    system_field: str = "system",
    concurrency: int = 8,
    limit: int | None = None,
    allow_partial: bool = False,
    skip_invalid: bool = False,
    prompt: Prompt = KOLIMA_PROMPT,
    progress: bool = True,
) -> dict:
    """Translates ``input_path`` (LIMA rows) into ``output_path`` (KoLIMA rows, same order and fields).

    Args:
        input_path: LIMA rows (``.jsonl``, ``.json``, ``.csv`` or ``.parquet``); never modified.
        output_path: the translated rows (JSON Lines); must not be, or replace, the input.
        endpoint: the chat-completions endpoint (:class:`kobllla.chat_api.ChatEndpoint`).
        cache_path: finished rows (default ``OUTPUT.cache.jsonl``).
        field, system_field: the turns column and the optional system prompt column.
        concurrency: requests in flight.
        limit: only the first ``limit`` rows of the input.
        allow_partial: write the output without the rows that failed.
        skip_invalid: translate the valid rows when some rows are not chat rows (else refuse).
        prompt: the instructions and reply checks (:meth:`Prompt.from_file`).
        progress: a progress bar on stderr.

    Returns:
        dict: the manifest also written to ``OUTPUT.manifest.json`` (counts, model, prompt version).

    Raises:
        FileNotFoundError: no input file.
        InvalidRowsError: rows the dataset builders would refuse (each named by file and line).
        ValueError: a bad setting, an output over the input, a corrupt cache line, or rows that
            failed (:class:`RowsFailedError`, listed in ``OUTPUT.errors.jsonl``; no output
            written unless ``allow_partial``).
        FatalEndpointError: the endpoint refused the key, the URL/model does not exist, nothing
            listens there, or no request succeeded for ``endpoint.give_up_after_s``.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every row), got {limit}")
    paths = _side_paths(Path(output_path), cache_path)
    _check_outputs(paths, Path(input_path))
    convs, invalid = read_rows(Path(input_path), field=field, system_field=system_field, limit=limit,
                               skip_invalid=skip_invalid)
    cache = TranslationCache(paths["cache"])
    keys = [cache_key(c, model=endpoint.model, temperature=endpoint.temperature, prompt=prompt) for c in convs]
    first = {}  # identical inputs are requested once
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    todo = [i for i, key in enumerate(keys) if first[key] == i and key not in cache.entries]
    paths["errors"].unlink(missing_ok=True)  # this run's failures only
    start = time.monotonic()
    try:
        errors = _run_requests(endpoint, prompt, todo, convs, cache, keys, paths["errors"], concurrency, progress)
    except BaseException:
        cache.discard_if_unused()
        raise
    for i, key in enumerate(keys):
        if key not in cache.entries and i not in errors:
            errors[i] = f"same input as {convs[first[key]].ref}, which failed"
    return _finish(convs, keys, cache, errors, paths, endpoint, prompt, field, system_field, allow_partial,
                   invalid=invalid, requested=len(todo), elapsed=time.monotonic() - start)


def _finish(convs: list[Conversation], keys: list[str], cache: TranslationCache, errors: dict[int, str],
            paths: dict[str, Path], endpoint: ChatEndpoint, prompt: Prompt, field: str, system_field: str,
            allow_partial: bool, *, invalid: list[str], requested: int, elapsed: float) -> dict:
    if errors:  # the file was appended as rows failed; now in input order
        write_text(paths["errors"], "".join(json.dumps(_error_entry(convs[i], errors[i]), ensure_ascii=False) + "\n"
                                            for i in sorted(errors)))
    if errors and not allow_partial:
        paths["manifest"].unlink(missing_ok=True)
        paths["output"].unlink(missing_ok=True)
        first = min(errors)
        raise RowsFailedError(
            f"{len(errors)} of {len(convs)} rows failed (first: {convs[first].ref}: {errors[first]}); "
            f"reasons in {paths['errors']}; rerun the same command to retry them ({len(convs) - len(errors)} "
            "are cached), or pass --allow-partial"
        )
    done = [i for i in range(len(convs)) if keys[i] in cache.entries]
    write_text(paths["output"], "".join(_output_row(convs[i], cache.entries[keys[i]], field, system_field)
                                        for i in done))
    manifest = {
        "kind": "kobllla.translation", "output": paths["output"].name, "rows_in": len(convs) + len(invalid),
        "rows_out": len(done), "failed_rows": [str(convs[i].ref) for i in sorted(errors)],
        "skipped_invalid": invalid, "requested_this_run": requested, "from_cache": len(convs) - requested,
        "model": endpoint.model, "base_url": endpoint.base_url, "api_key_env": endpoint.key_env,
        "temperature": endpoint.temperature, "prompt_version": prompt.version,
        "prompt_sha256": hashlib.sha256(prompt.text.encode()).hexdigest(),
        "speech_levels": dict(prompt.speech_levels),
        "usage": _usage_total(cache.entries[keys[i]].get("usage") or {} for i in done),
        "elapsed_s": round(elapsed, 2), "kobllla": kobllla.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(paths["manifest"], manifest)
    return manifest


def _usage_total(usages: Iterable[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for u in usages:
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(u.get(k), int):
                total[k] = total.get(k, 0) + u[k]
    return total
