"""Translate LIMA-style chat rows into KoLIMA through any OpenAI-compatible chat-completions endpoint.

One request per conversation: the turns go out between marker lines (``<<<USER 1>>>``,
``<<<ASSISTANT 2>>>``) and must come back with the same markers, so turn counts always match
the English rows (what ``bilima_dataset`` pairs row by row). User turns come back in banmal,
assistant turns in jondaetmal; code fences and URLs are checked to survive verbatim.

Robustness: ``concurrency`` requests in flight; 429, 5xx, timeouts, dropped connections and
malformed replies are retried with exponential backoff (``Retry-After`` honoured); every
finished row is appended to a cache (JSON lines, fsync'd) keyed by the hash of its input, model
and prompt, so a rerun or a resume after a kill sends only the rows not done yet. The output is
written once, in input order, through a temporary file; rows that still fail go to
``OUT.errors.jsonl`` (row, reason) and no output is written unless ``allow_partial``. A refused
API key stops the run at once. The key is read from an environment variable and never logged.

LIMA (GAIR/lima train.jsonl, 1,030 rows, ~2.9 M characters) is ~1,030 requests: at 8 in flight
and ~20 s a reply from a hosted model, about 45 minutes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

import kobllla
from kobllla.jsonl import iter_jsonl

PROMPT_VERSION = "kolima-v1"
SYSTEM_PROMPT = """You translate conversations between a user and an AI assistant from English into modern, natural Korean.

Rules:
1. The input is a conversation whose turns each start with a marker line such as <<<USER 1>>>, <<<ASSISTANT 2>>> or <<<SYSTEM 0>>>. Reply with exactly the same marker lines, in the same order, each followed by the Korean translation of that turn, and nothing else.
2. USER turns: casual Korean (반말), keeping the user's tone and style.
3. ASSISTANT turns: polite formal Korean (존댓말), keeping every piece of content.
4. SYSTEM turns: natural Korean that keeps the instructions' meaning.
5. Keep verbatim: code blocks (```...```), inline code (`...`), URLs, LaTeX, markdown structure (headings, lists, tables, bold, links), file paths and names of software and APIs. English technical terms may stay in English.
6. Do not answer the conversation, summarise it, or add notes.
"""
ROLES = ("USER", "ASSISTANT")
_MARKER = re.compile(r"^<<<(SYSTEM|USER|ASSISTANT) (\d+)>>>[ \t]*$", re.MULTILINE)
_URL = re.compile(r"https?://[^\s)>\]\"'`]+")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, wrong URL or model): stop the run."""


class RowError(RuntimeError):
    """One row could not be translated (after retries, or a non-retryable HTTP status)."""


class RowsFailedError(ValueError):
    """Some rows still failed after retries; they are listed in ``OUTPUT.errors.jsonl``."""


class _Retryable(RuntimeError):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Conversation:
    """One input row: its index, turns (user first, alternating) and optional system prompt."""

    row: int
    turns: tuple[str, ...]
    system: str | None
    raw: dict


# ---------------------------------------------------------------- prompt and reply


def render_turns(conv: Conversation) -> str:
    """The user message: each turn after its marker line."""
    blocks = [f"<<<SYSTEM 0>>>\n{conv.system}"] if conv.system else []
    blocks += [f"<<<{ROLES[i % 2]} {i + 1}>>>\n{t}" for i, t in enumerate(conv.turns)]
    return "\n\n".join(blocks)


def _markers(conv: Conversation) -> list[tuple[str, int]]:
    head = [("SYSTEM", 0)] if conv.system else []
    return head + [(ROLES[i % 2], i + 1) for i in range(len(conv.turns))]


def _check_verbatim(source: str, translated: str, where: str) -> None:
    if source.count("```") != translated.count("```"):
        n_src, n_out = source.count("```"), translated.count("```")
        raise _Retryable(f"{where}: {n_src} code fences in the source, {n_out} in the reply")
    lost = [u.rstrip(".,;:!?") for u in _URL.findall(source) if u.rstrip(".,;:!?") not in translated]
    if lost:
        raise _Retryable(f"{where}: URL {lost[0]} missing from the reply")


def parse_reply(conv: Conversation, reply: str) -> tuple[str | None, tuple[str, ...]]:
    """Splits a reply into (system, turns); raises a retryable error naming what is wrong."""
    found = [(m.group(1), int(m.group(2))) for m in _MARKER.finditer(reply)]
    if found != _markers(conv):
        raise _Retryable(f"reply markers {found[:6]} do not match the {len(_markers(conv))} sent")
    bodies = [b.strip() for b in _MARKER.split(reply)[3::3]]
    sources = ([conv.system] if conv.system else []) + list(conv.turns)
    for (role, n), src, out in zip(found, sources, bodies, strict=True):
        if not out:
            raise _Retryable(f"reply turn {role} {n} is empty")
        _check_verbatim(src, out, f"turn {role} {n}")
    return (bodies[0], tuple(bodies[1:])) if conv.system else (None, tuple(bodies))


def cache_key(conv: Conversation, *, model: str, temperature: float) -> str:
    """Hash of everything that decides a translation: input turns, model, prompt, temperature."""
    blob = json.dumps(
        [PROMPT_VERSION, SYSTEM_PROMPT, model, temperature, conv.system, list(conv.turns)], ensure_ascii=False
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- HTTP


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible ``POST {base_url}/chat/completions`` with retries.

    ``api_key`` goes only into the Authorization header, never into messages or logs.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 300.0
    max_attempts: int = 6
    backoff_s: float = 2.0
    backoff_max_s: float = 120.0
    temperature: float = 0.3
    max_tokens: int | None = None
    sleep: Callable[[float], None] = time.sleep

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, messages: list[dict]) -> dict:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"kobllla/{kobllla.__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            self._raise_for_status(exc)
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no reply within {self.timeout_s:g} s") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            raise _Retryable(f"connection failed ({getattr(exc, 'reason', exc)})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"malformed JSON in the reply: {raw[:80]!r}") from None

    def _raise_for_status(self, exc: urllib.error.HTTPError) -> None:
        detail = exc.read()[:200].decode("utf-8", "replace").replace("\n", " ")
        if exc.code in (401, 403):
            raise FatalEndpointError(
                f"{self.url} refused the API key (HTTP {exc.code}); set ${self.key_env} to a valid key "
                f"(or pass --api-key-env NAME)"
            ) from None
        if exc.code == 404:
            raise FatalEndpointError(
                f"{self.url}: HTTP 404 ({detail}); check --base-url (OpenAI-style URLs end in /v1) "
                f"and --model {self.model!r}"
            ) from None
        if exc.code in RETRY_STATUS:
            after = exc.headers.get("Retry-After") if exc.headers else None
            raise _Retryable(f"HTTP {exc.code}", float(after) if after and after.isdigit() else None) from None
        raise RowError(f"HTTP {exc.code}: {detail}") from None

    def translate(self, conv: Conversation) -> tuple[tuple[str | None, tuple[str, ...]], dict]:
        """Translated (system, turns) and the reply's token usage; retries, then raises RowError."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": render_turns(conv)}]
        reason = ""
        for attempt in range(self.max_attempts):
            try:
                reply = self._post(messages)
                return parse_reply(conv, _content(reply)), reply.get("usage") or {}
            except _Retryable as exc:
                reason = str(exc)
                if attempt + 1 < self.max_attempts:
                    delay = min(self.backoff_max_s, self.backoff_s * 2**attempt) * (0.5 + random.random())
                    self.sleep(min(self.backoff_max_s, exc.retry_after) if exc.retry_after is not None else delay)
        raise RowError(f"{reason} (gave up after {self.max_attempts} attempts)")


def _content(reply: object) -> str:
    try:
        choice = reply["choices"][0]  # type: ignore[index]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Retryable(f"reply has no choices[0].message.content: {str(reply)[:80]}") from None
    if choice.get("finish_reason") == "length":
        raise RowError("reply cut off at the output token limit (finish_reason=length); raise --max-tokens")
    if not isinstance(content, str):
        raise _Retryable(f"reply content is {type(content).__name__}, expected text")
    return content


# ---------------------------------------------------------------- input, cache, output


def read_conversations(path: Path, *, field: str = "conversations", system_field: str = "system") -> list[Conversation]:
    """LIMA rows from ``.jsonl``/``.json``/``.parquet``: ``field`` is a list of turns, user first."""
    rows = list(_read_rows(Path(path)))
    if not rows:
        raise ValueError(f"{path}: no rows; expected LIMA rows like {{\"conversations\": [\"question\", \"answer\"]}}")
    return [_conversation(path, i, row, field, system_field) for i, row in enumerate(rows)]


def _read_rows(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}; pass LIMA's train.jsonl (GAIR/lima)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for _, row in iter_jsonl(path):
        yield row


def _conversation(path: Path, i: int, row: object, field: str, system_field: str) -> Conversation:
    if not isinstance(row, dict):
        raise ValueError(f"{path} row {i}: expected a JSON object, found {type(row).__name__}")
    if field not in row:
        raise ValueError(f"{path} row {i}: no field {field!r}; fields are {sorted(row)}; pass --field NAME")
    turns = row[field]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"{path} row {i}: field {field!r} must be a non-empty list of non-empty strings (LIMA turns)")
    system = row.get(system_field)
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{path} row {i}: field {system_field!r} is {type(system).__name__}, expected text or null")
    return Conversation(i, tuple(turns), system or None, row)


class TranslationCache:
    """Append-only JSON lines ``{"key", "row", "system", "turns", "usage"}``, fsync'd per row.

    A line cut short by a kill is ignored and trimmed on the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        for n, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["key"]] = entry


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def _output_row(conv: Conversation, entry: dict, field: str, system_field: str) -> str:
    row = dict(conv.raw)
    row[field] = entry["turns"]
    if conv.system:
        row[system_field] = entry["system"]
    return json.dumps(row, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- driver


def _run_requests(endpoint: ChatEndpoint, todo: list[Conversation], cache: TranslationCache,
                  keys: dict[int, str], concurrency: int, progress: bool) -> dict[int, str]:
    errors: dict[int, str] = {}
    bar = tqdm(total=len(todo), unit=" rows", desc="translate", disable=not progress, file=sys.stderr)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    finished = False
    try:
        futures = {pool.submit(endpoint.translate, conv): conv for conv in todo}
        for fut in as_completed(futures):
            conv = futures[fut]
            try:
                (system, turns), usage = fut.result()
                entry = {"key": keys[conv.row], "row": conv.row, "system": system, "turns": list(turns)}
                cache.add({**entry, "usage": usage})
            except RowError as exc:
                errors[conv.row] = str(exc)
            bar.update(1)
            bar.set_postfix(failed=len(errors), refresh=False)
        finished = True
    finally:  # on a fatal error or Ctrl-C, do not wait for requests still in flight
        pool.shutdown(wait=finished, cancel_futures=True)
        bar.close()
    return errors


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
    progress: bool = True,
) -> dict:
    """Translates ``input_path`` (LIMA rows) into ``output_path`` (KoLIMA rows, same order and fields).

    Returns:
        dict: the manifest also written to ``OUTPUT.manifest.json`` (counts, model, prompt version).

    Raises:
        FileNotFoundError: no input file.
        ValueError: a malformed input row (file, row and field named), a bad setting, a corrupt
            cache line, or rows that failed (listed in ``OUTPUT.errors.jsonl``; no output
            written unless ``allow_partial``).
        FatalEndpointError: the endpoint refused the key, or the URL/model does not exist.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every row), got {limit}")
    output_path = Path(output_path)
    convs = read_conversations(Path(input_path), field=field, system_field=system_field)[:limit]
    cache = TranslationCache(Path(cache_path or output_path.with_name(output_path.name + ".cache.jsonl")))
    keys = {c.row: cache_key(c, model=endpoint.model, temperature=endpoint.temperature) for c in convs}
    first_row = {}  # identical inputs are requested once
    for c in convs:
        first_row.setdefault(keys[c.row], c.row)
    todo = [c for c in convs if first_row[keys[c.row]] == c.row and keys[c.row] not in cache.entries]
    start = time.monotonic()
    errors = _run_requests(endpoint, todo, cache, keys, concurrency, progress)
    for c in convs:
        if keys[c.row] not in cache.entries and c.row not in errors:
            errors[c.row] = f"same input as row {first_row[keys[c.row]]}, which failed"
    return _finish(convs, keys, cache, errors, output_path, endpoint, field, system_field,
                   allow_partial, requested=len(todo), elapsed=time.monotonic() - start)


def _finish(convs: list[Conversation], keys: dict[int, str], cache: TranslationCache, errors: dict[int, str],
            output_path: Path, endpoint: ChatEndpoint, field: str, system_field: str, allow_partial: bool,
            *, requested: int, elapsed: float) -> dict:
    errors_path = output_path.with_name(output_path.name + ".errors.jsonl")
    manifest_path = output_path.with_name(output_path.name + ".manifest.json")
    if errors:
        lines = [json.dumps({"row": r, "reason": errors[r]}, ensure_ascii=False) + "\n" for r in sorted(errors)]
        _write_atomic(errors_path, lines)
    else:
        errors_path.unlink(missing_ok=True)
    if errors and not allow_partial:
        manifest_path.unlink(missing_ok=True)
        output_path.unlink(missing_ok=True)
        raise RowsFailedError(
            f"{len(errors)} of {len(convs)} rows failed (first: row {min(errors)}: {errors[min(errors)]}); "
            f"reasons in {errors_path}; rerun the same command to retry them ({len(convs) - len(errors)} are cached), "
            "or pass --allow-partial"
        )
    done = [c for c in convs if keys[c.row] in cache.entries]
    _write_atomic(output_path, [_output_row(c, cache.entries[keys[c.row]], field, system_field) for c in done])
    manifest = {
        "kind": "kobllla.translation", "output": output_path.name, "rows_in": len(convs), "rows_out": len(done),
        "failed_rows": sorted(errors), "requested_this_run": requested, "from_cache": len(convs) - requested,
        "model": endpoint.model, "base_url": endpoint.base_url, "api_key_env": endpoint.key_env,
        "temperature": endpoint.temperature, "prompt_version": PROMPT_VERSION,
        "prompt_sha256": hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest(),
        "usage": _usage_total(cache.entries[keys[c.row]].get("usage") or {} for c in done),
        "elapsed_s": round(elapsed, 2), "kobllla": kobllla.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(manifest_path, [json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"])
    return manifest


def _usage_total(usages: Iterator[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for u in usages:
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(u.get(k), int):
                total[k] = total.get(k, 0) + u[k]
    return total
