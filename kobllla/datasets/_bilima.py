"""BiLIMA: bilingual LIMA, the question in one language and the answer in the other.

``en_ko``: user turns in English, assistant turns in Korean; ``ko_en``: the reverse. Built
from an English LIMA file and a Korean KoLIMA file aligned row by row, or from one file that
already holds both (``en`` and ``ko`` columns, each a list of turns).
"""

from __future__ import annotations

import logging
from typing import Literal

from torchtune.datasets import PackedDataset
from torchtune.modules.transforms import Transform

from kobllla.conversations import Conversation, parse_turns, read_conversations
from kobllla.datasets._chat import ChatDataset, finish, to_messages
from kobllla.rows import iter_rows, require_field

log = logging.getLogger(__name__)

MODES = ("en_ko", "ko_en")


def _paired_rows(
    source: str, *, data_files: str | list[str] | None, split: str, en_column: str, ko_column: str
) -> list[tuple[Conversation, Conversation]]:
    pairs = []
    for ref, row in iter_rows(source, data_files=data_files, split=split):
        en = parse_turns(ref, require_field(ref, row, en_column, config_key="en_column"), field=en_column)
        ko = parse_turns(ref, require_field(ref, row, ko_column, config_key="ko_column"), field=ko_column)
        pairs.append((Conversation(ref, None, en), Conversation(ref, None, ko)))
    return pairs


def _aligned_rows(
    *, en_source: str, en_data_files, ko_source: str, ko_data_files, split: str, conversation_column: str
) -> list[tuple[Conversation, Conversation]]:
    kwargs = {"split": split, "conversation_column": conversation_column, "system_column": None}
    en_rows = list(read_conversations(en_source, data_files=en_data_files, **kwargs))
    ko_rows = list(read_conversations(ko_source, data_files=ko_data_files, **kwargs))
    if len(en_rows) != len(ko_rows):
        raise ValueError(
            f"English source has {len(en_rows)} rows ({en_rows[0].ref.origin}) and Korean source has "
            f"{len(ko_rows)} ({ko_rows[0].ref.origin}); they must align row by row"
        )
    return list(zip(en_rows, ko_rows, strict=True))


def interleave(mode: str, en: tuple[str, ...], ko: tuple[str, ...]) -> tuple[str, ...]:
    """User turns from the query language, assistant turns from the answer language."""
    user, assistant = (en, ko) if mode == "en_ko" else (ko, en)
    return tuple(user[i] if i % 2 == 0 else assistant[i] for i in range(len(en)))


def bilima_dataset(
    tokenizer: Transform,
    *,
    mode: Literal["en_ko", "ko_en"],
    en_source: str | None = None,
    en_data_files: str | list[str] | None = None,
    ko_source: str | None = None,
    ko_data_files: str | list[str] | None = None,
    source: str | None = None,
    data_files: str | list[str] | None = None,
    split: str = "train",
    conversation_column: str = "conversations",
    en_column: str = "en",
    ko_column: str = "ko",
    on_mismatch: Literal["error", "skip"] = "error",
    system_prompt: str | None = None,
    train_on_input: bool = False,
    packed: bool = False,
) -> ChatDataset | PackedDataset:
    """Bilingual LIMA: English query / Korean answer (``en_ko``) or the reverse (``ko_en``).

    Give either ``en_source`` + ``ko_source`` (two LIMA-shaped files aligned row by row) or
    ``source`` (one paired file with ``en`` and ``ko`` columns).

    Args:
        tokenizer (Transform): the model tokenizer (Llama 3 chat format).
        mode (str): ``en_ko`` or ``ko_en``.
        en_source, en_data_files: the English LIMA rows (as in ``kolima_dataset``).
        ko_source, ko_data_files: the Korean KoLIMA rows, same order and turn counts.
        source, data_files: one already-paired file instead of the two above.
        split (str): hub split.
        conversation_column (str): turns column of the two-file form.
        en_column, ko_column (str): turns columns of the paired form.
        on_mismatch (str): a row whose English and Korean turn counts differ is an error
            (``error``) or skipped and counted (``skip``).
        system_prompt (str | None): system prompt for every row.
        train_on_input (bool): also train on system and user tokens.
        packed (bool): pack whole samples into ``tokenizer.max_seq_len`` sequences.

    Returns:
        ChatDataset | PackedDataset: samples ``{"tokens", "labels"}``.

    Raises:
        ValueError: unknown mode or policy, both or neither input form, row counts or turn
            counts that differ, and every error of ``kolima_dataset``.

    Example::

        - _component_: kobllla.datasets.bilima_dataset
          mode: en_ko
          en_source: json
          en_data_files: ./data/lima_train.jsonl
          ko_source: json
          ko_data_files: ./data/kolima_train.jsonl
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    if on_mismatch not in ("error", "skip"):
        raise ValueError(f"unknown on_mismatch {on_mismatch!r}; choose 'error' or 'skip'")
    two_files = en_source is not None or ko_source is not None
    if two_files == (source is not None) or (two_files and (en_source is None or ko_source is None)):
        raise ValueError("bilima_dataset needs either en_source + ko_source, or source (a paired en/ko file)")
    if source is not None:
        pairs = _paired_rows(source, data_files=data_files, split=split, en_column=en_column, ko_column=ko_column)
    else:
        pairs = _aligned_rows(
            en_source=en_source, en_data_files=en_data_files, ko_source=ko_source,
            ko_data_files=ko_data_files, split=split, conversation_column=conversation_column,
        )
    conversations, skipped = [], 0
    for en, ko in pairs:
        if len(en.turns) != len(ko.turns):
            if on_mismatch == "skip":
                skipped += 1
                continue
            raise ValueError(
                f"{en.ref} has {len(en.turns)} English turns but {ko.ref} has {len(ko.turns)} Korean turns; "
                "fix the row or set on_mismatch: skip"
            )
        turns = interleave(mode, en.turns, ko.turns)
        conversations.append(to_messages(system_prompt, turns, train_on_input=train_on_input))
    if skipped:
        log.warning("bilima_dataset(%s): skipped %d of %d rows whose turn counts differ", mode, skipped, len(pairs))
    if not conversations:
        raise ValueError(f"bilima_dataset({mode}): every row was skipped; nothing to train on")
    ds = finish(ChatDataset(conversations, tokenizer), tokenizer, packed=packed)
    ds.skipped_rows = skipped
    return ds
