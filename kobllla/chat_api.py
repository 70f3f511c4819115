"""A client for one OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint, with retries.

What can change on a retry is retried with exponential backoff (``Retry-After`` honoured): 429,
5xx, timeouts, dropped connections, malformed replies, and replies a caller's check rejects.
What cannot change stops the run at once (:class:`FatalEndpointError`): a URL without an
``http(s)://`` scheme, a refused connection or unknown host before the endpoint ever answered,
HTTP 401/403/404. An endpoint that stops answering mid-run stops the run once no request has
succeeded for ``give_up_after_s`` seconds, so a dead server ends a run in bounded time. The API
key goes only into the Authorization header, never into messages or logs.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import kobllla

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (bad URL, key or model, nothing listening, dead): stop the run."""


class RowError(RuntimeError):
    """One request could not be served (after retries, or a status that retrying cannot change)."""


class Retryable(RuntimeError):
    """A failure that may pass on the next attempt (raised by the client or a caller's reply check)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would be re-sent as a GET without its body: surface the 3xx instead."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def check_base_url(base_url: str) -> str:
    """``base_url`` if it is an ``http(s)://host...`` URL; a ValueError naming the fix otherwise."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"--base-url {base_url!r} is not an http:// or https:// URL; pass e.g. http://localhost:8000/v1"
        )
    return base_url


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint.

    ``sleep`` waits between attempts (default: an event that :meth:`stop` interrupts).
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
    give_up_after_s: float = 600.0
    sleep: Callable[[float], None] | None = None
    _answered: bool = field(default=False, init=False, repr=False)  # the server has sent any HTTP response
    _last_ok: float | None = field(default=None, init=False, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if self.max_attempts < 1 or self.timeout_s <= 0 or self.give_up_after_s <= 0:
            raise ValueError(
                f"max_attempts must be >= 1 and timeout/give_up_after > 0 s, got {self.max_attempts}, "
                f"{self.timeout_s:g} s, {self.give_up_after_s:g} s"
            )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def stop(self) -> None:
        """Makes every waiting or later attempt give up (the run is over)."""
        self._stopped.set()

    def _wait(self, seconds: float) -> None:
        if self.sleep is not None:
            self.sleep(seconds)
        else:
            self._stopped.wait(seconds)

    def _post(self, messages: list[dict]) -> dict:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json", "User-Agent": f"kobllla/{kobllla.__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as resp:
                self._answered = True
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            self._answered = True
            self._raise_for_status(exc)
        except TimeoutError:
            raise Retryable(f"no reply within {self.timeout_s:g} s") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            self._raise_if_unreachable(reason)
            raise Retryable(f"connection failed ({reason})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Retryable(f"malformed JSON in the reply: {raw[:80]!r}") from None

    def _raise_if_unreachable(self, reason: object) -> None:
        """Before the endpoint ever answered, nothing listening or no such host will not change."""
        if self._answered:
            return
        if isinstance(reason, ConnectionRefusedError):
            raise FatalEndpointError(
                f"cannot connect to {self.url}: connection refused; start the server or fix --base-url"
            )
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(self.base_url).hostname
            raise FatalEndpointError(f"cannot resolve the host {host!r} of --base-url {self.base_url}; fix --base-url")
        if isinstance(reason, ssl.SSLError):
            raise FatalEndpointError(f"TLS with {self.url} failed ({reason}); check --base-url (http:// vs https://)")

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
        if exc.code in (301, 302, 303, 307, 308):  # urllib does not follow a redirected POST
            where = (exc.headers.get("Location") if exc.headers else None) or "another URL"
            raise FatalEndpointError(
                f"{self.url} redirects (HTTP {exc.code}) to {where}; pass --base-url "
                f"{where.removesuffix('/chat/completions')} (e.g. https:// instead of http://)"
            ) from None
        if exc.code in RETRY_STATUS:
            after = exc.headers.get("Retry-After") if exc.headers else None
            raise Retryable(f"HTTP {exc.code}", float(after) if after and after.isdigit() else None) from None
        raise RowError(f"HTTP {exc.code}: {detail}") from None

    def complete(self, messages: list[dict], accept: Callable[[str], object]) -> tuple[object, dict]:
        """``(accept(reply text), token usage)``, retrying until ``accept`` returns without raising ``Retryable``.

        Raises:
            RowError: every attempt failed, or a failure retrying cannot change.
            FatalEndpointError: the endpoint refuses every request, or no request has succeeded
                for ``give_up_after_s`` seconds.
        """
        if self._last_ok is None:
            self._last_ok = time.monotonic()
        reason = ""
        for attempt in range(self.max_attempts):
            if self._stopped.is_set():
                raise RowError("the run stopped before this row was done")
            try:
                reply = self._post(messages)
                result = accept(_content(reply))
                self._last_ok = time.monotonic()
                return result, reply.get("usage") or {}
            except Retryable as exc:
                reason = str(exc)
                if attempt + 1 < self.max_attempts:
                    self._wait(self._delay(attempt, exc.retry_after, reason))
        raise RowError(f"{reason} (gave up after {self.max_attempts} attempts)")

    def _delay(self, attempt: int, retry_after: float | None, reason: str) -> float:
        """The wait before the next attempt; raises once the endpoint has been failing too long."""
        quiet = time.monotonic() - (self._last_ok or time.monotonic())
        left = self.give_up_after_s - quiet
        if left <= 0:
            raise FatalEndpointError(
                f"no request to {self.url} has succeeded for {quiet:.0f} s (last error: {reason}); the endpoint "
                f"looks down: finished rows are cached, rerun the same command to resume (or raise --give-up-after)"
            )
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after, left)
        delay = min(self.backoff_max_s, self.backoff_s * 2**attempt) * (0.5 + random.random())
        return min(delay, left)


def _content(reply: object) -> str:
    try:
        choice = reply["choices"][0]  # type: ignore[index]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Retryable(f"reply has no choices[0].message.content: {str(reply)[:80]}") from None
    if choice.get("finish_reason") == "length":
        raise RowError("reply cut off at the output token limit (finish_reason=length); raise --max-tokens")
    if not isinstance(content, str):
        raise Retryable(f"reply content is {type(content).__name__}, expected text")
    return content
