"""An export served by llama-cpp-python's OpenAI-compatible server, used by the official openai client and
by our own ``tools.translate_dataset``.

The tiny model's text is gibberish (random weights): these tests check the client path end to end
(the GGUF loads in the server, its chat template builds the prompt, replies arrive through the
OpenAI API), not the quality of the replies.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest_plugins = ["tests._gguf_fixtures"]

REPO = Path(__file__).resolve().parent.parent
MODEL_ALIAS = "kobllla-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_q4_export, tmp_path_factory):
    """``python -m llama_cpp.server`` on 127.0.0.1 (a free port), ready, always killed at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    gguf = tiny_q4_export / "tiny-instruct-q4_k_m.gguf"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "1024", "--model_alias", MODEL_ALIAS,
                                 "--n_threads", "2"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"llama_cpp.server not ready after 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield base_url, log
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_openai_client_chat_completion_uses_the_ggufs_llama3_template(server, tiny_instruct):
    from openai import OpenAI
    from transformers import AutoTokenizer

    base_url, _ = server
    messages = [{"role": "system", "content": "한국어로 답하세요."},
                {"role": "user", "content": "서울은 어디에 있나요?"}]
    reply = OpenAI(base_url=base_url, api_key="unused").chat.completions.create(
        model=MODEL_ALIAS, messages=messages, max_tokens=8, temperature=0.0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 8
    # the server built the prompt from the GGUF's chat template: the same tokens as the HF template
    tok = AutoTokenizer.from_pretrained(tiny_instruct)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert reply.usage.prompt_tokens == len(ids)


def test_translate_dataset_runs_against_the_served_gguf(server, tmp_path):
    base_url, log = server
    out = tmp_path / "kolima.jsonl"
    posts_before = log.read_text().count("POST /v1/chat/completions")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.translate_dataset", "--input", str(REPO / "tests/assets/lima_en_tiny.jsonl"),
         "--output", str(out), "--base-url", base_url, "--model", MODEL_ALIAS, "--limit", "2", "--max-attempts", "1",
         "--max-tokens", "16", "--concurrency", "1", "--no-progress", "--api-key-env", "KOBLLLA_NO_KEY"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    # Gibberish runs to the token limit without the marker lines the translator asks for: both rows fail
    # as bad replies, the tool says why (exit 1, errors file) and writes no output; the requests went
    # through the server.
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    errors = [json.loads(line) for line in Path(f"{out}.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [1, 2], errors
    assert all(re.search(r"finish_reason=length|marker", e["reason"]) for e in errors), errors
    assert log.read_text().count("POST /v1/chat/completions") - posts_before == 2
