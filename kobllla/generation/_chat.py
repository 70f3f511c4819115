"""A multi-turn chat with streamed tokens, for ``tools.chat`` (terminal or piped stdin)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kobllla.generation._generate import Decoded, GenerationOptions, LoadedModel, decode, encode_row, row_seed
from kobllla.generation._prompts import check_messages

COMMANDS = {"/reset": "forget the conversation (the --system message stays)", "/exit": "leave (or Ctrl-D)",
            "/help": "this list"}


class _Streamer:
    """Turns token ids into text pieces; holds back a piece that ends inside a UTF-8 character."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, _row: int, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # a Korean syllable split over byte tokens: wait for the rest
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


@dataclass
class Turn:
    """One answer: its text, the decode result and how many old turns were dropped to fit the context."""

    text: str
    result: Decoded
    dropped_turns: int


class ChatSession:
    """A conversation with one loaded model: history, optional system message, streamed replies."""

    def __init__(self, loaded: LoadedModel, options: GenerationOptions, *, system: str | None = None) -> None:
        if system is not None and not system.strip():
            raise ValueError("--system must not be empty")
        self.loaded, self.options, self.system = loaded, options, system
        self.history: list[dict] = []
        self.turns = 0
        self.failed = 0  # turns refused (too long, not UTF-8): tools.chat exits 1 in pipe mode when > 0

    def reset(self) -> None:
        self.history = []

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def _prompt_ids(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for the next turn, dropping the oldest exchanges until it fits the context."""
        dropped = 0
        while True:
            msgs = check_messages(self.messages(user), where="chat: ")
            ids = encode_row(self.loaded, {"messages": msgs})
            if len(ids) + self.options.max_new_tokens <= self.loaded.max_positions:
                return ids, dropped
            if not self.history:
                raise ValueError(f"this message is {len(ids)} tokens; with --max-new-tokens "
                                 f"{self.options.max_new_tokens} it exceeds the model's {self.loaded.max_positions} "
                                 "positions: write a shorter one or lower --max-new-tokens")
            self.history = self.history[2:]
            dropped += 1

    def reply(self, user: str, *, write: Callable[[str], None] | None = None) -> Turn:
        """Answers ``user`` (streamed through ``write``) and appends both turns to the history."""
        ids, dropped = self._prompt_ids(user)
        stream = _Streamer(self.loaded.tokenizer, write or (lambda _s: None))
        (res,) = decode(self.loaded, [ids], self.options, seeds=[row_seed(self.options.seed, self.turns)],
                        on_token=stream)
        body = res.token_ids[:-1] if res.stop_reason == "eos" else res.token_ids
        text = self.loaded.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len(text) > stream.shown and write is not None:
            write(text[stream.shown:])
        self.turns += 1
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text or " "}]
        return Turn(text=text, result=res, dropped_turns=dropped)


def chat_loop(session: ChatSession, *, read: Callable[[str], str], write: Callable[[str], None],
              note: Callable[[str], None], interactive: bool) -> int:
    """Reads user turns until ``/exit`` or end of input; returns the number of answers given.

    ``read(prompt)`` returns one line (raises ``EOFError`` at the end, ``ValueError`` for a line it cannot
    read, e.g. not UTF-8: that line is reported, counted in ``session.failed`` and skipped); answers stream
    through ``write``; ``note`` gets status lines (dropped turns, interruptions, command help). Commands are
    case-insensitive (``/RESET`` = ``/reset``). Ctrl-C while the model writes stops that answer (it is not
    kept); Ctrl-C at the prompt leaves.
    """
    answers = 0
    while True:
        try:
            line = read("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                write("\n")
            return answers
        except ValueError as exc:
            note(f"error: {exc}")
            session.failed += 1
            continue
        text = line.strip()
        if not text:
            continue
        command = text.lower()
        if command in ("/exit", "/quit"):
            return answers
        if command == "/reset":
            session.reset()
            note("(conversation reset)")
            continue
        if re.fullmatch(r"/[a-z]+", command):  # /help or an unknown command
            note("commands: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
            continue
        try:
            turn = session.reply(line.rstrip("\n"), write=write)
        except KeyboardInterrupt:
            write("\n")
            note("(interrupted; this answer is not kept)")
            continue
        except ValueError as exc:
            note(f"error: {exc}")
            session.failed += 1
            continue
        write("\n")
        answers += 1
        if turn.dropped_turns:
            note(f"(dropped the {turn.dropped_turns} oldest exchange(s) to fit the model's context)")
        if turn.result.stop_reason == "max_new_tokens":
            note(f"(stopped at --max-new-tokens {session.options.max_new_tokens})")
