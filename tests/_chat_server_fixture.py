"""A real HTTP server on 127.0.0.1 speaking OpenAI chat completions, scripted per conversation.

It "translates" each turn between the marker lines by prefixing it (``번역(반말): `` for user
turns, ``번역(존댓말): `` for assistant turns), which keeps code fences and URLs intact. A
conversation whose first turn contains ``[[script: 429, 500, ok]]`` gets, on its k-th request,
the k-th behaviour (the last one repeats):

- ``ok``: a normal reply; ``sleep=S``: a normal reply after S seconds;
- ``429`` (with ``Retry-After: 0``), ``500``, ``503``, ``400``: that HTTP status;
- ``length``: a normal reply marked ``finish_reason: length`` (cut at the token limit);
- ``badjson``: status 200 with a body that is not JSON; ``nochoices``: JSON without choices;
- ``hang``: sends nothing for ``hang_s`` seconds (the client must time out);
- ``dropturn``: a reply missing its last turn; ``nofence``: a reply that loses code fences.

Every request is logged as (first turn, behaviour) in ``server.log``, its system message in
``server.system_prompts``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"^<<<(SYSTEM|USER|ASSISTANT) (\d+)>>>$", re.MULTILINE)
SCRIPT = re.compile(r"\[\[script:([^\]]*)\]\]")
PREFIX = {"USER": "번역(반말): ", "ASSISTANT": "번역(존댓말): ", "SYSTEM": "번역(시스템): "}


def fake_translation(role: str, text: str) -> str:
    """What the server returns for one turn."""
    return PREFIX[role] + text.strip()


def _turns(content: str) -> list[tuple[str, str, str]]:
    parts = MARKER.split(content)
    return [(parts[i], parts[i + 1], parts[i + 2].strip()) for i in range(1, len(parts), 3)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 resets connections when 8 arrive at once


class FakeChatServer:
    """``with FakeChatServer() as server: server.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, *, api_key: str | None = None, delay_s: float = 0.0, hang_s: float = 2.0) -> None:
        self.api_key, self.delay_s, self.hang_s = api_key, delay_s, hang_s
        self.log: list[tuple[str, str]] = []
        self.system_prompts: list[str] = []  # the system message of every request
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeChatServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def behaviour(self, first_turn: str) -> str:
        match = SCRIPT.search(first_turn)
        script = [s.strip() for s in match.group(1).split(",")] if match else ["ok"]
        with self.lock:
            k = self.attempts[first_turn]
            self.attempts[first_turn] += 1
            chosen = script[min(k, len(script) - 1)]
            self.log.append((first_turn, chosen))
        return chosen

    def reply_text(self, content: str, behaviour: str) -> str:
        turns = _turns(content)
        if behaviour == "dropturn":
            turns = turns[:-1]
        out = [f"<<<{role} {n}>>>\n{fake_translation(role, text)}" for role, n, text in turns]
        text = "\n\n".join(out)
        return text.replace("```", "") if behaviour == "nofence" else text

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps({"error": {"message": message, "code": status}}).encode(), headers)

            def do_POST(self) -> None:  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}")
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._error(401, "Incorrect API key provided")
                content = request["messages"][-1]["content"]
                with server.lock:
                    server.system_prompts += [m["content"] for m in request["messages"] if m["role"] == "system"]
                behaviour = server.behaviour(_turns(content)[0][2] if _turns(content) else content)
                time.sleep(server.delay_s)
                self._act(request, content, behaviour)

            def _act(self, request: dict, content: str, behaviour: str) -> None:
                if behaviour in ("429", "500", "503", "400"):
                    return self._error(int(behaviour), "scripted", {"Retry-After": "0"} if behaviour == "429" else None)
                if behaviour == "badjson":
                    return self._send(200, b'{"choices": [{"message": {"content": "')
                if behaviour == "nochoices":
                    return self._send(200, b'{"object": "chat.completion", "choices": []}')
                if behaviour == "hang":
                    time.sleep(server.hang_s)
                if behaviour.startswith("sleep="):
                    time.sleep(float(behaviour.split("=")[1]))
                reply = {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "length" if behaviour == "length" else "stop",
                                 "message": {"role": "assistant", "content": server.reply_text(content, behaviour)}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                }
                self._send(200, json.dumps(reply, ensure_ascii=False).encode("utf-8"))

        return Handler
