"""The translation prompt and the checks every reply must pass, for ``kobllla.translate``.

Turns go out after marker lines (``<<<USER 1>>>``, ``<<<ASSISTANT 2>>>``, ``<<<SYSTEM 0>>>``) and
must come back under the same markers, with every code fence and URL intact; optionally each
Korean turn must be in the wanted speech level (``kobllla.korean``, Kiwi). A reply that fails a
check raises :class:`kobllla.chat_api.Retryable`, so the client asks again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kobllla.chat_api import Retryable
from kobllla.conversations import Conversation

PROMPT_VERSION = "kolima-v1"
SYSTEM_PROMPT = (
    'You translate conversations between a user and an AI assistant from English into modern, natural '
    'Korean.\n'
    '\n'
    'Rules:\n'
    '1. The input is a conversation whose turns each start with a marker line such as <<<USER 1>>>, '
    '<<<ASSISTANT 2>>> or <<<SYSTEM 0>>>. Reply with exactly the same marker lines, in the same order, '
    'each followed by the Korean translation of that turn, and nothing else.\n'
    "2. USER turns: casual Korean (반말), keeping the user's tone and style.\n"
    '3. ASSISTANT turns: polite formal Korean (존댓말), keeping every piece of content.\n'
    "4. SYSTEM turns: natural Korean that keeps the instructions' meaning.\n"
    '5. Keep verbatim: code blocks (```...```), inline code (`...`), URLs, LaTeX, markdown structure '
    '(headings, lists, tables, bold, links), file paths and names of software and APIs. English technical'
    ' terms may stay in English.\n'
    '6. Do not answer the conversation, summarise it, or add notes.\n'
)
CUSTOM_PROMPT = (
    '{instructions}\n'
    '\n'
    'Reply format: the input is a conversation whose turns each start with a marker line such as <<<USER '
    '1>>>, <<<ASSISTANT 2>>> or <<<SYSTEM 0>>>. Reply with exactly the same marker lines, in the same '
    'order, each followed by that turn rewritten as the instructions above say, and nothing else. Keep '
    'code blocks (```...```) and URLs verbatim.\n'
)
ROLES = ("USER", "ASSISTANT")
SPEECH_LEVELS = ("banmal", "jondaetmal")
_MARKER = re.compile(r"^<<<(SYSTEM|USER|ASSISTANT) (\d+)>>>[ \t]*$", re.MULTILINE)
_URL = re.compile(r"https?://[^\s)>\]\"'`]+")
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)  # fenced and inline code: not prose


@dataclass(frozen=True)
class Prompt:
    """The system prompt sent with every row, what names it in the cache key and manifest, and the reply checks."""

    text: str = SYSTEM_PROMPT
    version: str = PROMPT_VERSION
    speech_levels: tuple[tuple[str, str], ...] = ()  # (role, level): ("user", "banmal")

    @classmethod
    def from_file(cls, path: Path | str | None, speech_levels: dict[str, str] | None = None) -> Prompt:
        """The built-in KoLIMA prompt, or your instructions (a text file) inside the marker protocol."""
        levels = tuple(sorted((speech_levels or {}).items()))
        if path is None:
            return cls(speech_levels=levels)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--instructions {path}: no such file; write the rewriting rules in a text file")
        instructions = path.read_text(encoding="utf-8-sig").strip()
        if not instructions:
            raise ValueError(f"--instructions {path}: the file is empty; write the rewriting rules in it")
        digest = hashlib.sha256(instructions.encode()).hexdigest()[:12]
        return cls(CUSTOM_PROMPT.format(instructions=instructions), f"custom-{digest}", levels)


KOLIMA_PROMPT = Prompt()  # the built-in English -> KoLIMA translation prompt


def parse_speech_levels(text: str) -> dict[str, str]:
    """``"user=banmal,assistant=jondaetmal"`` -> ``{"user": "banmal", "assistant": "jondaetmal"}``."""
    levels = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        role, sep, level = (s.strip() for s in item.partition("="))
        if not sep or role not in ("user", "assistant") or level not in SPEECH_LEVELS:
            raise ValueError(
                f"--check-speech-level {text!r}: {item!r} must be ROLE=LEVEL with ROLE user or assistant and "
                f"LEVEL one of {', '.join(SPEECH_LEVELS)} (e.g. user=banmal,assistant=jondaetmal)"
            )
        levels[role] = level
    if not levels:
        raise ValueError("--check-speech-level needs ROLE=LEVEL pairs, e.g. user=banmal,assistant=jondaetmal")
    return levels


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
        raise Retryable(f"{where}: {n_src} code fences in the source, {n_out} in the reply")
    lost = [u.rstrip(".,;:!?") for u in _URL.findall(source) if u.rstrip(".,;:!?") not in translated]
    if lost:
        raise Retryable(f"{where}: URL {lost[0]} missing from the reply")


def parse_reply(conv: Conversation, reply: str) -> tuple[str | None, tuple[str, ...]]:
    """Splits a reply into (system, turns); raises a retryable error naming what is wrong."""
    found = [(m.group(1), int(m.group(2))) for m in _MARKER.finditer(reply)]
    if found != _markers(conv):
        raise Retryable(f"reply markers {found[:6]} do not match the {len(_markers(conv))} sent")
    bodies = [b.strip() for b in _MARKER.split(reply)[3::3]]
    sources = ([conv.system] if conv.system else []) + list(conv.turns)
    for (role, n), src, out in zip(found, sources, bodies, strict=True):
        if not out:
            raise Retryable(f"reply turn {role} {n} is empty")
        _check_verbatim(src, out, f"turn {role} {n}")
    return (bodies[0], tuple(bodies[1:])) if conv.system else (None, tuple(bodies))


def check_speech_levels(turns: tuple[str, ...], levels: tuple[tuple[str, str], ...]) -> None:
    """Raises a retryable error for the first turn whose speech level (Kiwi, code left out) is not the wanted one.

    A turn with no Korean sentence ending (code, English, a list of nouns) passes; a turn whose
    sentences are split evenly between the levels (``mixed``) does not.
    """
    if not levels:
        return
    from kobllla.korean import text_speech_level

    wanted = dict(levels)
    for i, turn in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        if role not in wanted:
            continue
        found = text_speech_level(_CODE.sub(" ", turn))
        if found.level is not None and found.level != wanted[role]:
            raise Retryable(f"turn {ROLES[i % 2]} {i + 1} is in {found.level} ({found.jondaetmal} jondaetmal, "
                            f"{found.banmal} banmal sentences), expected {wanted[role]}")


def cache_key(conv: Conversation, *, model: str, temperature: float, prompt: Prompt = KOLIMA_PROMPT) -> str:
    """Hash of everything that decides a translation: input turns, model, prompt, temperature, checks."""
    parts = [prompt.version, prompt.text, model, temperature, conv.system, list(conv.turns)]
    if prompt.speech_levels:
        parts.append([list(p) for p in prompt.speech_levels])
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()
