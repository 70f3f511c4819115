"""tools.chat as a person uses it: through a pipe and in a real terminal (tmux), answers checked against transformers.

The reference for every answer is transformers' ``generate(do_sample=False)`` on the model's own chat
template applied to the whole conversation so far, so the history, ``/reset`` and ``--system`` are
tested by what the model is actually shown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kobllla.chat_format import END_OF_TEXT_ID, EOT_ID
from kobllla.generation import ChatSession, GenerationOptions, load_model
from kobllla.tiny_model import make_model
from tests.conftest import REPO

NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("chat") / "mini", preset="mini", flavor="instruct", seed=6,
                      dtype="float32")


@pytest.fixture(scope="module")
def reference(model):
    """answer(messages) -> text, by transformers' tokenizer template and generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()

    def answer(messages: list[dict]) -> str:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = hf.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW, eos_token_id=[EOT_ID, END_OF_TEXT_ID],
                              pad_token_id=END_OF_TEXT_ID)[0, ids.shape[1]:].tolist()
        if out and out[-1] in (EOT_ID, END_OF_TEXT_ID):
            out = out[:-1]
        return tok.decode(out, skip_special_tokens=True)

    return answer


def chat_cmd(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools.chat", "--model", str(model), "--max-new-tokens", str(NEW), *extra]


def test_piped_turns_keep_history_and_reset_forgets_it(model, reference):
    lines = "hello\n/reset\nhello\n안녕? 뭐 해?\n/exit\nnever read\n"
    done = subprocess.run(chat_cmd(model), input=lines, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    a1 = reference([{"role": "user", "content": "hello"}])
    a3 = reference([{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": "안녕? 뭐 해?"}])
    assert a3 != reference([{"role": "user", "content": "안녕? 뭐 해?"}])  # the history changes the answer
    assert done.stdout == f"{a1}\n{a1}\n{a3}\n"
    assert "(conversation reset)" in done.stderr and "Traceback" not in done.stderr


def test_replies_stream_in_pieces_that_add_up_to_the_answer(model):
    loaded = load_model(model)
    session = ChatSession(loaded, GenerationOptions(max_new_tokens=12))
    pieces: list[str] = []
    turn = session.reply("김치찌개 만드는 법 알려 줘", write=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == turn.text
    assert all("\ufffd" not in p for p in pieces[:-1])
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    session.reset()
    assert session.history == []
    loaded.close()


def test_bad_model_dir_and_empty_system_are_one_line_errors(model, tmp_path):
    bad = tmp_path / "no-tokenizer"
    shutil.copytree(model, bad, ignore=shutil.ignore_patterns("tokenizer.json", "original"))
    done = subprocess.run(chat_cmd(bad), input="hi\n", cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: model {bad}: no tokenizer files")
    done = subprocess.run(chat_cmd(model, "--system", " "), input="hi\n", cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --system must not be empty"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_person_in_a_terminal_chats_with_a_system_message_resets_and_exits(model, reference, tmp_path):
    sock = f"kobllla-chat-test-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, check=True).stdout

    def pane() -> str:
        return tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat")

    def wait_for(predicate, what: str, timeout: float = 90) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = pane()
            if predicate(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"tmux pane never showed {what}:\n{pane()}")

    def flat(text: str) -> str:
        return " ".join(text.split())

    answer = reference([{"role": "system", "content": "Answer in Korean."}, {"role": "user", "content": "hello"}])
    script = tmp_path / "run.sh"
    cmd = " ".join(chat_cmd(model, "--system", "'Answer in Korean.'"))
    script.write_text(f"cd {REPO} && {cmd} 2>&1; echo CHAT-EXIT-$?; sleep 30\n")
    tmux("new-session", "-d", "-s", "chat", "-x", "220", "-y", "50", f"bash {script}")
    try:
        wait_for(lambda t: t.rstrip().endswith(">"), "the first prompt")
        tmux("send-keys", "-t", "chat", "hello", "Enter")
        wait_for(lambda t: flat(f"> hello\n{answer}\n") in flat(t) and t.rstrip().endswith(">"),
                 "the streamed answer and a new prompt")
        tmux("send-keys", "-t", "chat", "/reset", "Enter")
        wait_for(lambda t: "(conversation reset)" in t, "the reset note")
        tmux("send-keys", "-t", "chat", "/exit", "Enter")
        text = wait_for(lambda t: "CHAT-EXIT-0" in t, "a clean exit")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
    assert "chat with" in text and "/reset, /exit" in text
    assert "Traceback" not in text


def test_ctrl_c_while_the_model_writes_drops_that_answer_and_the_chat_goes_on(model):
    from kobllla.generation import chat_loop

    loaded = load_model(model)
    session = ChatSession(loaded, GenerationOptions(max_new_tokens=NEW))
    lines = iter(["first question\n", "second question\n", "/exit\n", "never read\n"])
    written: list[str] = []
    notes: list[str] = []
    pieces = {"n": 0}

    def write(text: str) -> None:
        pieces["n"] += 1
        if pieces["n"] == 2:  # Ctrl-C arrives while the first answer streams
            raise KeyboardInterrupt
        written.append(text)

    def read(_prompt: str) -> str:
        return next(lines)

    answers = chat_loop(session, read=read, write=write, note=notes.append, interactive=False)
    assert answers == 1 and "(interrupted; this answer is not kept)" in notes
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["second question"]
    loaded.close()


def test_piped_bad_utf8_line_is_named_commands_ignore_case_and_a_refused_turn_exits_1(model, reference):
    lines = b"\xff\xfehi\n/RESET\nhello\n" + ("x " * 2100).encode() + b"\n/Exit\nnever read\n"
    done = subprocess.run(chat_cmd(model), input=lines, cwd=REPO, capture_output=True, timeout=180)
    err = done.stderr.decode("utf-8")
    assert done.returncode == 1, err
    assert "error: stdin line 1 is not UTF-8 (byte 1); skipped it: send UTF-8 text" in err
    assert "(conversation reset)" in err and "exceeds the model's 2048 positions" in err
    assert "Traceback" not in err
    assert done.stdout.decode("utf-8") == reference([{"role": "user", "content": "hello"}]) + "\n"
    ok = subprocess.run(chat_cmd(model), input=b"hello\n", cwd=REPO, capture_output=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
