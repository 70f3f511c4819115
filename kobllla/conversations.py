"""Chat rows in the two shapes found in the wild, validated where they enter; no torch import.

* LIMA-style: ``conversations`` is a list of alternating user/assistant strings
  (``{"conversations": ["질문", "답변", ...]}``), optional ``system``.
* The seed project's CSV: a ``system`` column and ``conversations`` as one string whose
  turns are joined by ``[sep]``.

The dataset builders (``kolima_dataset``, ``bilima_dataset``) and ``tools.translate_dataset``
validate rows with these same functions, so a row the translator accepts is one the builders
accept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kobllla.rows import Row, RowRef, iter_rows, require_field

SEED_TURN_SEPARATOR = "[sep]"


@dataclass(frozen=True)
class Conversation:
    """One validated row: where it came from, optional system prompt, user/assistant turns (user first).

    ``raw`` is the row as read (its other fields), for tools that write rows back out.
    """

    ref: RowRef
    system: str | None
    turns: tuple[str, ...]
    raw: Row = field(default_factory=dict, compare=False, repr=False)


def parse_turns(ref: RowRef, value: object, *, field: str) -> tuple[str, ...]:
    """Turns from a list of strings or a ``[sep]``-joined string; an even, non-zero count."""
    if isinstance(value, str):
        turns = [t.strip() for t in value.split(SEED_TURN_SEPARATOR)]
    elif isinstance(value, (list, tuple)):
        for i, turn in enumerate(value):
            if not isinstance(turn, str):
                raise ValueError(f"{ref}: {field}[{i}] is {type(turn).__name__}, expected text")
        turns = [t.strip() for t in value]
    else:
        raise ValueError(
            f"{ref}: field {field!r} is {type(value).__name__}; expected a list of turns or a '[sep]'-joined string"
        )
    for i, turn in enumerate(turns):
        if not turn:
            raise ValueError(f"{ref}: {field}[{i}] is empty; every user and assistant turn needs text")
    if not turns or len(turns) % 2:
        raise ValueError(
            f"{ref}: field {field!r} has {len(turns)} turns; expected user/assistant pairs "
            "(an even, non-zero number), user first"
        )
    return tuple(turns)


def row_system(ref: RowRef, row: Row, system_column: str | None) -> str | None:
    """The row's system prompt (None when the column is absent, null or blank)."""
    if not system_column or row.get(system_column) is None:
        return None
    system = row[system_column]
    if not isinstance(system, str):
        raise ValueError(f"{ref}: field {system_column!r} is {type(system).__name__}, expected text")
    return system.strip() or None


def conversation_of(
    ref: RowRef, row: Row, *, conversation_column: str, system_column: str | None, config_key: str
) -> Conversation:
    """One row as a validated :class:`Conversation`.

    Raises:
        ValueError: missing column, non-text turn, empty turn, odd or zero turn count, non-text
            system prompt (file, line and field named).
    """
    value = require_field(ref, row, conversation_column, config_key=config_key)
    turns = parse_turns(ref, value, field=conversation_column)
    return Conversation(ref, row_system(ref, row, system_column), turns, row)


def read_conversations(
    source: str,
    *,
    data_files: str | list[str] | None,
    split: str,
    conversation_column: str,
    system_column: str | None,
    config_key: str = "conversation_column",
) -> Iterator[Conversation]:
    """Validated conversations of a chat file, in file order; the first bad row raises."""
    for ref, row in iter_rows(source, data_files=data_files, split=split):
        yield conversation_of(ref, row, conversation_column=conversation_column, system_column=system_column,
                              config_key=config_key)
