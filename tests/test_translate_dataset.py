"""LIMA -> KoLIMA translation against a real chat-completions server on 127.0.0.1 (tests/_chat_server_fixture.py)."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kobllla.rows import RowRef
from kobllla.translate import (
    ChatEndpoint,
    Conversation,
    FatalEndpointError,
    InvalidRowsError,
    Prompt,
    RowsFailedError,
    cache_key,
    parse_reply,
    parse_speech_levels,
    render_turns,
    translate_dataset,
)
from tests._chat_server_fixture import FakeChatServer, fake_translation
from tools.translate_dataset import main

REPO = Path(__file__).resolve().parent.parent
CODE_ANSWER = "Use this:\n```python\nprint('hi')\n```\nDocs: https://docs.python.org/3/library/json.html."


def lima_rows(n: int, scripts: dict[int, str] | None = None) -> list[dict]:
    rows = [{"conversations": [f"Question {i}?", f"Answer {i}."], "source": "stackexchange"} for i in range(n)]
    for i, script in (scripts or {}).items():
        rows[i]["conversations"][0] += f" [[script: {script}]]"
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected(row: dict) -> dict:
    turns = [fake_translation("USER" if i % 2 == 0 else "ASSISTANT", t) for i, t in enumerate(row["conversations"])]
    out = {**row, "conversations": turns}
    if row.get("system"):
        out["system"] = fake_translation("SYSTEM", row["system"])
    return out


def endpoint(server: FakeChatServer, **kw) -> ChatEndpoint:
    settings = {"timeout_s": 2.0, "max_attempts": 4, "backoff_s": 0.001, "sleep": lambda s: None}
    return ChatEndpoint(base_url=server.base_url, model="test-model", **{**settings, **kw})


def run(tmp_path: Path, rows: list[dict], server: FakeChatServer, **kw) -> dict:
    src = write_jsonl(tmp_path / "lima.jsonl", rows)
    ep = kw.pop("ep", None) or endpoint(server)
    return translate_dataset(input_path=src, output_path=tmp_path / "kolima.jsonl", endpoint=ep, progress=False, **kw)


# ---------------------------------------------------------------- prompt format


def test_prompt_marks_each_turn_and_the_reply_must_return_the_same_markers():
    conv = Conversation(RowRef("t.jsonl", 1), "Be brief.", ("Hi?", "Hello.", "Bye?", "Bye."))
    assert render_turns(conv) == (
        "<<<SYSTEM 0>>>\nBe brief.\n\n<<<USER 1>>>\nHi?\n\n<<<ASSISTANT 2>>>\nHello.\n\n"
        "<<<USER 3>>>\nBye?\n\n<<<ASSISTANT 4>>>\nBye."
    )
    reply = ("<<<SYSTEM 0>>>\n짧게.\n<<<USER 1>>>\n안녕?\n<<<ASSISTANT 2>>>\n안녕하세요.\n<<<USER 3>>>\n잘 가.\n"
             "<<<ASSISTANT 4>>>\n안녕히 가세요.\n")
    assert parse_reply(conv, reply) == ("짧게.", ("안녕?", "안녕하세요.", "잘 가.", "안녕히 가세요."))
    with pytest.raises(RuntimeError, match=r"reply markers \[\('SYSTEM', 0\), \('USER', 1\)\] do not match the 5 sent"):
        parse_reply(conv, "<<<SYSTEM 0>>>\n짧게.\n<<<USER 1>>>\n안녕?")


def test_reply_that_drops_a_code_fence_or_a_url_is_rejected():
    conv = Conversation(RowRef("t.jsonl", 1), None, ("How?", CODE_ANSWER))
    ok = f"<<<USER 1>>>\n어떻게?\n<<<ASSISTANT 2>>>\n{CODE_ANSWER.replace('Use this', '이것을 쓰세요')}"
    assert parse_reply(conv, ok)[1][1].startswith("이것을 쓰세요:\n```python")
    with pytest.raises(RuntimeError, match=r"turn ASSISTANT 2: 2 code fences in the source, 0 in the reply"):
        parse_reply(conv, ok.replace("```", ""))
    with pytest.raises(RuntimeError, match=r"turn ASSISTANT 2: URL https://docs.python.org/3/library/json.html "
                                           r"missing"):
        parse_reply(conv, ok.replace("https://docs.python.org", "파이썬 문서"))


# ---------------------------------------------------------------- end to end


def test_every_row_comes_back_translated_in_input_order_with_its_other_fields(tmp_path):
    rows = lima_rows(10, {0: "sleep=0.3", 1: "sleep=0.2"})  # the first rows finish last
    rows[5]["conversations"] = ["How do I print?", CODE_ANSWER, "And in Rust?", "Use `println!`."]
    rows[6]["system"] = "You are terse."
    with FakeChatServer() as server:
        m = run(tmp_path, rows, server, concurrency=4)
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(r) for r in rows]
    assert (m["rows_in"], m["rows_out"], m["requested_this_run"], m["failed_rows"]) == (10, 10, 10, [])
    assert m["usage"] == {"prompt_tokens": 100, "completion_tokens": 200, "total_tokens": 300}
    assert json.loads((tmp_path / "kolima.jsonl.manifest.json").read_text(encoding="utf-8")) == m


def test_429_5xx_malformed_replies_and_a_hang_are_retried_until_they_succeed(tmp_path):
    scripts = {0: "429, ok", 1: "500, 503, ok", 2: "badjson, ok", 3: "nochoices, ok", 4: "hang, ok",
               5: "dropturn, ok", 6: "nofence, ok", 7: "ok"}
    rows = lima_rows(8, scripts)
    rows[6]["conversations"][1] = CODE_ANSWER
    sleeps: list[float] = []
    with FakeChatServer(hang_s=2.5) as server:
        ep = endpoint(server, timeout_s=1.0, backoff_s=0.5, sleep=sleeps.append)
        m = run(tmp_path, rows, server, ep=ep, concurrency=8)
        attempts = [server.attempts[r["conversations"][0]] for r in rows]
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(r) for r in rows]
    assert attempts == [2, 3, 2, 2, 2, 2, 2, 1]
    assert m["failed_rows"] == []
    # 8 retries: the 429's Retry-After: 0 is obeyed; the others back off 0.5 s x 2**k x [0.5, 1.5)
    assert len(sleeps) == 8 and sorted(sleeps)[0] == 0.0 and all(0.25 <= s < 1.5 for s in sorted(sleeps)[1:])


def test_rows_that_keep_failing_are_listed_with_reasons_and_no_output_is_written(tmp_path):
    rows = lima_rows(6, {1: "500", 3: "400", 5: "length"})
    with FakeChatServer() as server:
        with pytest.raises(RowsFailedError, match=r"^3 of 6 rows failed \(first: lima.jsonl line 2: HTTP 500 "
                                                    r"\(gave up after 3 attempts\)\); "
                                                    r"reasons in .*kolima.jsonl.errors.jsonl; rerun"):
            run(tmp_path, rows, server, ep=endpoint(server, max_attempts=3))
        assert [server.attempts[r["conversations"][0]] for r in rows] == [1, 3, 1, 1, 1, 1]
        assert read_jsonl(tmp_path / "kolima.jsonl.errors.jsonl") == [
            {"line": 2, "reason": "HTTP 500 (gave up after 3 attempts)"},
            {"line": 4, "reason": 'HTTP 400: {"error": {"message": "scripted", "code": 400}}'},
            {"line": 6, "reason": "reply cut off at the output token limit (finish_reason=length); raise --max-tokens"},
        ]
        assert not (tmp_path / "kolima.jsonl").exists() and not (tmp_path / "kolima.jsonl.manifest.json").exists()
        m = run(tmp_path, rows, server, ep=endpoint(server, max_attempts=3), allow_partial=True)
        assert [server.attempts[r["conversations"][0]] for r in rows] == [1, 6, 1, 2, 1, 2]  # successes not re-sent
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(rows[i]) for i in (0, 2, 4)]
    assert (m["rows_out"], m["requested_this_run"], m["from_cache"]) == (3, 3, 3)
    assert m["failed_rows"] == ["lima.jsonl line 2", "lima.jsonl line 4", "lima.jsonl line 6"]


def test_a_rerun_sends_nothing_and_writes_the_same_bytes(tmp_path):
    rows = lima_rows(6)
    with FakeChatServer() as server:
        run(tmp_path, rows, server)
        first = (tmp_path / "kolima.jsonl").read_bytes()
        m = run(tmp_path, rows, server)
        assert len(server.log) == 6
    assert (m["requested_this_run"], m["from_cache"]) == (0, 6)
    assert (tmp_path / "kolima.jsonl").read_bytes() == first


def test_identical_rows_are_requested_once(tmp_path):
    rows = lima_rows(3) + lima_rows(2)
    with FakeChatServer() as server:
        m = run(tmp_path, rows, server)
        assert len(server.log) == 3
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(r) for r in rows]
    assert m["rows_out"] == 5


def test_kill_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    rows = lima_rows(30)
    src = write_jsonl(tmp_path / "lima.jsonl", rows)
    out, cache = tmp_path / "kolima.jsonl", tmp_path / "kolima.jsonl.cache.jsonl"
    with FakeChatServer(delay_s=0.1) as server:
        cmd = [sys.executable, "-m", "tools.translate_dataset", "--input", str(src), "--output", str(out),
               "--base-url", server.base_url, "--model", "test-model", "--concurrency", "2", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 8):
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        cached_at_kill = {e["turns"][0] for e in read_jsonl(cache)}
        assert 8 <= len(cached_at_kill) < 30 and not out.exists()
        sent_before = len(server.log)
        m = translate_dataset(input_path=src, output_path=out, endpoint=endpoint(server), progress=False)
        resent = {first for first, _ in server.log[sent_before:]}
    assert not {fake_translation("USER", t) for t in resent} & cached_at_kill
    assert read_jsonl(out) == [expected(r) for r in rows]
    keys = [e["key"] for e in read_jsonl(cache)]
    assert len(keys) == len(set(keys)) == 30
    assert m["from_cache"] == len(cached_at_kill) and m["requested_this_run"] == 30 - len(cached_at_kill)


def test_a_line_cut_short_by_a_kill_is_dropped_from_the_cache(tmp_path):
    rows = lima_rows(3)
    with FakeChatServer() as server:
        run(tmp_path, rows, server)
        cache = tmp_path / "kolima.jsonl.cache.jsonl"
        lines = cache.read_text(encoding="utf-8").splitlines(keepends=True)
        cache.write_text(lines[0] + lines[1] + lines[2][:25], encoding="utf-8")
        m = run(tmp_path, rows, server)
    assert (m["from_cache"], m["requested_this_run"]) == (2, 1)
    assert len(read_jsonl(cache)) == 3
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(r) for r in rows]


# ---------------------------------------------------------------- refusals and bad input


def test_a_refused_key_stops_the_run_with_one_line_and_the_key_appears_nowhere(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "lima.jsonl", lima_rows(4))
    out = tmp_path / "kolima.jsonl"
    monkeypatch.setenv("TEST_LLM_KEY", "sk-wrong-SECRET-123")
    with FakeChatServer(api_key="sk-right-456") as server:
        argv = ["--input", str(src), "--output", str(out), "--base-url", server.base_url, "--model", "m",
                "--api-key-env", "TEST_LLM_KEY", "--no-progress"]
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err == (f"error: {server.base_url}/chat/completions refused the API key (HTTP 401); "
                                "set $TEST_LLM_KEY to a valid key (or pass --api-key-env NAME)\n")
        assert not out.exists()
        files = "".join(p.read_text(encoding="utf-8") for p in tmp_path.iterdir() if p.is_file())
        assert "SECRET" not in captured.out + captured.err + files
        monkeypatch.setenv("TEST_LLM_KEY", "sk-right-456")
        assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out and len(read_jsonl(out)) == 4


def test_a_wrong_url_is_fatal_and_names_the_fix(tmp_path):
    with FakeChatServer() as server:
        bad = ChatEndpoint(base_url=server.base_url.removesuffix("/v1"), model="m")
        with pytest.raises(FatalEndpointError, match=r"HTTP 404 .*check --base-url \(OpenAI-style URLs end in /v1\)"):
            run(tmp_path, lima_rows(2), server, ep=bad)
    assert not (tmp_path / "kolima.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [('{"conversation": ["q", "a"], "source": "x"}\n',
      r"^1 of 1 rows are not chat rows the dataset builders accept, nothing was sent: lima.jsonl line 1: "
      r"no field 'conversations' \(fields: conversation, source\); pass --field NAME; "
      r"fix them, or pass --skip-invalid"),
     ('{"conversations": ["q", "a"]}\n\n{"conversations": ["q", "a", "q2"]}\n',
      r"^1 of 2 rows .*: lima.jsonl line 3: field 'conversations' has 3 turns; expected user/assistant pairs"),
     ('{"conversations": ["q", ""]}\n', r"lima.jsonl line 1: conversations\[1\] is empty"),
     ('{"conversations": ["q", "a"], "system": 3}\n', r"line 1: field 'system' is int, expected text"),
     ('{"conversations": ["q", "a"]}\n{"conversations": [\n', r"lima.jsonl line 2: not valid JSON"),
     ("\n", r"lima.jsonl: the file has no rows")],
)
def test_bad_input_rows_are_refused_naming_file_row_and_field(tmp_path, content, match):
    (tmp_path / "lima.jsonl").write_text(content, encoding="utf-8")
    ep = ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m")  # never contacted
    with pytest.raises(ValueError, match=match):
        translate_dataset(input_path=tmp_path / "lima.jsonl", output_path=tmp_path / "o.jsonl", endpoint=ep,
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lima.jsonl"]


@pytest.mark.parametrize(("kwargs", "match"), [({"concurrency": 0}, r"concurrency must be >= 1, got 0"),
                                               ({"limit": 0}, r"limit must be >= 1 \(or None for every row\), got 0")])
def test_bad_settings_are_refused(tmp_path, kwargs, match):
    ep = ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ValueError, match=match):
        translate_dataset(input_path=tmp_path / "x.jsonl", output_path=tmp_path / "o.jsonl", endpoint=ep, **kwargs)


def test_missing_input_file(tmp_path):
    ep = ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(FileNotFoundError, match=r"input not found: .*nope.jsonl; pass LIMA's train.jsonl"):
        translate_dataset(input_path=tmp_path / "nope.jsonl", output_path=tmp_path / "o.jsonl", endpoint=ep)


def test_cli_exits_1_when_rows_fail(tmp_path, capsys):
    src = write_jsonl(tmp_path / "lima.jsonl", lima_rows(3, {2: "500"}))
    with FakeChatServer() as server:
        rc = main(["--input", str(src), "--output", str(tmp_path / "k.jsonl"), "--base-url", server.base_url,
                   "--model", "m", "--max-attempts", "2", "--backoff", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 3 rows failed (first: lima.jsonl line 3: HTTP 500")
    assert rc == 1 and err.count("\n") == 1


# ---------------------------------------------------------------- feeds the dataset builders


def test_output_feeds_kolima_and_bilima_datasets(tmp_path, llama3_tok):
    from kobllla.datasets import bilima_dataset, kolima_dataset

    rows = lima_rows(3)
    with FakeChatServer() as server:
        run(tmp_path, rows, server)
    ko = kolima_dataset(llama3_tok, source="json", data_files=str(tmp_path / "kolima.jsonl"))
    bi = bilima_dataset(llama3_tok, mode="en_ko", en_source="json", en_data_files=str(tmp_path / "lima.jsonl"),
                        ko_source="json", ko_data_files=str(tmp_path / "kolima.jsonl"))
    assert len(ko) == len(bi) == 3
    ko_text = llama3_tok.decode([int(t) for t in ko[1]["tokens"]])
    bi_text = llama3_tok.decode([int(t) for t in bi[1]["tokens"]])
    assert "번역(반말): Question 1?" in ko_text and "번역(존댓말): Answer 1." in ko_text
    assert "Question 1?" in bi_text and "번역(반말)" not in bi_text and "번역(존댓말): Answer 1." in bi_text


# ---------------------------------------------------------------- rows the builders refuse, endpoints that cannot work


def test_rows_the_builders_refuse_are_all_listed_before_any_request_or_skipped_on_request(tmp_path):
    rows = lima_rows(4)
    rows[1]["conversations"] = ["Question 1?", "Answer 1.", "A third turn?"]
    rows[3]["conversations"] = ["Question 3?", "  "]
    with FakeChatServer() as server:
        with pytest.raises(InvalidRowsError, match=r"^2 of 4 rows are not chat rows the dataset builders accept, "
                           r"nothing was sent: lima.jsonl line 2: field 'conversations' has 3 turns; .*; "
                           r"lima.jsonl line 4: conversations\[1\] is empty; .*pass --skip-invalid"):
            run(tmp_path, rows, server)
        assert server.log == [] and sorted(p.name for p in tmp_path.iterdir()) == ["lima.jsonl"]
        m = run(tmp_path, rows, server, skip_invalid=True)
    assert read_jsonl(tmp_path / "kolima.jsonl") == [expected(rows[0]), expected(rows[2])]
    assert (m["rows_in"], m["rows_out"], len(m["skipped_invalid"])) == (4, 2, 2)
    assert m["skipped_invalid"][0].startswith("lima.jsonl line 2: field 'conversations' has 3 turns")


def test_nothing_listening_stops_the_run_at_once(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = ChatEndpoint(base_url=f"http://127.0.0.1:{port}/v1", model="m", backoff_s=5.0)
    start = time.monotonic()
    with pytest.raises(FatalEndpointError, match=rf"^cannot connect to http://127.0.0.1:{port}/v1/chat/completions: "
                       r"connection refused; start the server or fix --base-url$"):
        translate_dataset(input_path=write_jsonl(tmp_path / "lima.jsonl", lima_rows(20)),
                          output_path=tmp_path / "kolima.jsonl", endpoint=ep, progress=False)
    assert time.monotonic() - start < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lima.jsonl"]


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000/v1", "ftp://host/v1"])
def test_a_url_without_an_http_scheme_is_refused_before_any_request(url):
    with pytest.raises(ValueError, match=r"is not an http:// or https:// URL; pass e.g. http://localhost:8000/v1"):
        ChatEndpoint(base_url=url, model="m")


def test_an_endpoint_that_dies_mid_run_stops_the_run_after_give_up_after(tmp_path):
    rows = lima_rows(4, {1: "500", 2: "500", 3: "500"})
    with FakeChatServer() as server:
        ep = endpoint(server, give_up_after_s=0.6, max_attempts=10_000, backoff_s=0.05, sleep=None)
        start = time.monotonic()
        with pytest.raises(FatalEndpointError, match=r"^no request to .* has succeeded for [01] s "
                           r"\(last error: HTTP 500\); the endpoint looks down: finished rows are cached, "
                           r"rerun the same command to resume"):
            run(tmp_path, rows, server, ep=ep, concurrency=1)
        elapsed = time.monotonic() - start
    assert 0.6 <= elapsed < 5
    cached = read_jsonl(tmp_path / "kolima.jsonl.cache.jsonl")
    assert [e["turns"][0] for e in cached] == [expected(rows[0])["conversations"][0]]
    assert not (tmp_path / "kolima.jsonl").exists()


def test_instructions_replace_the_translation_rules_and_wrong_speech_levels_are_retried_then_listed(tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text("Rewrite every turn as a pirate would say it.\n", encoding="utf-8")
    prompt = Prompt.from_file(rules, parse_speech_levels("user=banmal, assistant=jondaetmal"))
    rows = [{"conversations": ["밥 먹었어?", "네, 먹었습니다."]},
            {"conversations": ["밥 드셨어요?", "Yes."]},  # the user speaks jondaetmal: wrong for KoLIMA
            {"conversations": ["뭐 해?", "공부한다."]}]   # the assistant speaks plain -다: banmal
    with FakeChatServer() as server:
        with pytest.raises(RowsFailedError, match=r"^2 of 3 rows failed \(first: lima.jsonl line 2: turn USER 1 is "
                           r"in jondaetmal \(1 jondaetmal, 0 banmal sentences\), expected banmal "
                           r"\(gave up after 3 attempts\)\)"):
            run(tmp_path, rows, server, ep=endpoint(server, max_attempts=3), prompt=prompt)
        assert [server.attempts[r["conversations"][0]] for r in rows] == [1, 3, 3]
        assert set(server.system_prompts) == {prompt.text}
        assert prompt.text.startswith("Rewrite every turn as a pirate would say it.\n\nReply format: ")
    assert read_jsonl(tmp_path / "kolima.jsonl.errors.jsonl")[1] == {
        "line": 3, "reason": "turn ASSISTANT 2 is in banmal (0 jondaetmal, 1 banmal sentences), expected jondaetmal "
                             "(gave up after 3 attempts)"}
    assert cache_key(Conversation(RowRef("x", 1), None, ("a", "b")), model="m", temperature=0.3, prompt=prompt) != \
        cache_key(Conversation(RowRef("x", 1), None, ("a", "b")), model="m", temperature=0.3)


@pytest.mark.parametrize(("text", "match"), [
    ("user=formal", r"'user=formal' must be ROLE=LEVEL with ROLE user or assistant and LEVEL one of banmal, "
                    r"jondaetmal"),
    ("system=banmal", r"'system=banmal' must be ROLE=LEVEL"),
    (",", r"needs ROLE=LEVEL pairs")])
def test_bad_speech_level_settings_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_speech_levels(text)


def test_missing_or_empty_instructions_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--instructions .*nope.txt: no such file"):
        Prompt.from_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--instructions .*empty.txt: the file is empty"):
        Prompt.from_file(tmp_path / "empty.txt")


def test_a_redirect_is_fatal_and_names_where_it_points(tmp_path):
    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.send_response(301)
            self.send_header("Location", "https://api.example.org/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ep = ChatEndpoint(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m")
        with pytest.raises(FatalEndpointError, match=r"/v1/chat/completions redirects \(HTTP 301\) to "
                           r"https://api.example.org/v1/chat/completions; pass --base-url https://api.example.org/v1 "):
            translate_dataset(input_path=write_jsonl(tmp_path / "lima.jsonl", lima_rows(2)),
                              output_path=tmp_path / "kolima.jsonl", endpoint=ep, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lima.jsonl"]
