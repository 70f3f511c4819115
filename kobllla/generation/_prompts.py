"""Prompt files: one JSON object per line, checked where they enter (torch-free).

A row is ``{"id": ..., "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
(the model's chat template is applied, ending with the assistant header) or ``{"id": ..., "prompt": "raw
text"}`` (tokenized as is, BOS as the tokenizer adds it). ``id`` is a string or an integer, unique in the
file; other fields are kept (``eval.samples`` reads e.g. ``lang``) but not used here.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")


def _fail(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}: line {line}: {message}")


def check_messages(messages: object, *, where: str) -> list[dict]:
    """Checks a chat history (the ``messages`` field); returns it as ``[{"role", "content"}]``.

    Rules: a non-empty list of objects with ``role`` in system/user/assistant and a non-blank string
    ``content``; a system message only first; the last message is the user's (the model answers it).

    Raises:
        ValueError: ``where`` + the field at fault and the fix.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}field '{field}' must be an object with 'role' and 'content', "
                             f"got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            shown = json.dumps(role, ensure_ascii=False)[:40]
            raise ValueError(f"{where}field '{field}.role' is {shown}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}field '{field}.content' must be a non-empty string")
        if role == "system" and i > 0:
            raise ValueError(f"{where}field '{field}.role': a system message may only come first")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}field 'messages[{len(out) - 1}].role' is {out[-1]['role']!r}; the last message "
                         "must be the user's (the model writes the next assistant turn)")
    return out


def check_row(row: dict, *, where: str) -> dict:
    """One validated prompt row (a new dict; unknown fields kept). ``where`` prefixes messages."""
    if "id" not in row:
        raise ValueError(f"{where}field 'id' is missing; give every row a unique string or integer id")
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise ValueError(f"{where}field 'id' must be a non-empty string or an integer, "
                         f"got {json.dumps(rid, ensure_ascii=False)[:40]}")
    has_m, has_p = "messages" in row, "prompt" in row
    if has_m == has_p:
        what = "both" if has_m else "neither"
        raise ValueError(f"{where}row {rid!r} has {what} of 'messages' and 'prompt'; give exactly one "
                         "('messages': chat turns, 'prompt': raw text)")
    out = dict(row)
    if has_m:
        out["messages"] = check_messages(row["messages"], where=where)
    elif not isinstance(row["prompt"], str) or not row["prompt"]:
        raise ValueError(f"{where}field 'prompt' must be a non-empty string")
    return out


def row_key(rid: str | int) -> str:
    """The id as the key resumption matches on (``1`` and ``"1"`` differ)."""
    return json.dumps(rid, ensure_ascii=False)


def read_prompts(path: Path) -> list[dict]:
    """Validated prompt rows of a JSON Lines file, in file order, each with its 1-based ``line``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``FILE: line N: field ...`` for malformed JSON, a missing/duplicate id, a row with
            neither ``messages`` nor ``prompt``, an unknown role, empty content; an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} {'is a directory' if path.exists() else 'does not exist'}")
    rows, seen = [], {}
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM is accepted, as kobllla.jsonl does
        except UnicodeDecodeError as exc:
            raise _fail(path, line_no, f"not UTF-8 text (byte {exc.start + 1}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, line_no, f"not valid JSON ({exc.msg}, column {exc.colno}); "
                                       "write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise _fail(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        row = check_row(obj, where=f"{path}: line {line_no}: ")
        key = row_key(row["id"])
        if key in seen:
            raise _fail(path, line_no, f"field 'id' {key} repeats line {seen[key]}; ids must be unique "
                                       "(a rerun skips rows by id)")
        seen[key] = line_no
        row["line"] = line_no
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompt rows; write one JSON object per line")
    return rows
