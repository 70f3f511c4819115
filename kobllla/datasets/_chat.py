"""KoLIMA chat datasets; rows are read and validated by :mod:`kobllla.conversations`.

* LIMA-style: ``conversations`` is a list of alternating user/assistant strings
  (``{"conversations": ["질문", "답변", ...]}``), optional ``system``.
* The seed project's CSV: a ``system`` column and ``conversations`` as one string whose
  turns are joined by ``[sep]``.
"""

from __future__ import annotations

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms import Transform

from kobllla.conversations import SEED_TURN_SEPARATOR, Conversation, parse_turns, read_conversations

__all__ = ["SEED_TURN_SEPARATOR", "ChatDataset", "Conversation", "finish", "kolima_dataset", "parse_turns",
           "read_conversations", "to_messages"]


def to_messages(system: str | None, turns: tuple[str, ...], *, train_on_input: bool) -> list[Message]:
    """torchtune messages; system and user turns are masked unless ``train_on_input``."""
    messages = [Message(role="system", content=system, masked=not train_on_input)] if system else []
    for i, turn in enumerate(turns):
        is_user = i % 2 == 0
        messages.append(
            Message(role="user" if is_user else "assistant", content=turn, masked=is_user and not train_on_input)
        )
    return messages


class ChatDataset(Dataset):
    """Tokenizes conversations on access through the model transform (Llama 3 chat format).

    Labels are the tokens with masked positions set to the ignore index; torchtune 0.6.1
    shifts labels in the recipe, so they are not shifted here.
    """

    def __init__(self, conversations: list[list[Message]], model_transform: Transform) -> None:
        self._conversations = conversations
        self._model_transform = model_transform

    def __len__(self) -> int:
        return len(self._conversations)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        out = self._model_transform({"messages": self._conversations[index]})
        tokens, mask = out["tokens"], out["mask"]
        labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask, strict=True)]
        return {"tokens": tokens, "labels": labels}


def finish(ds: ChatDataset, tokenizer: Transform, *, packed: bool) -> ChatDataset | PackedDataset:
    """Wraps in torchtune's ``PackedDataset`` (whole samples per pack) when ``packed``."""
    if not packed:
        return ds
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if not max_seq_len:
        raise ValueError("packed: True needs tokenizer.max_seq_len set in the config")
    return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id, split_across_pack=False)


def kolima_dataset(
    tokenizer: Transform,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    conversation_column: str = "conversations",
    system_column: str | None = "system",
    system_prompt: str | None = None,
    train_on_input: bool = False,
    packed: bool = False,
) -> ChatDataset | PackedDataset:
    """KoLIMA: Korean LIMA chat (user turns in banmal, assistant turns in jondaetmal).

    Args:
        tokenizer (Transform): the model tokenizer (Llama 3 chat format).
        source (str): ``json``/``jsonl``/``csv``/``parquet`` with ``data_files``, a local file
            path, or a hub dataset id.
        data_files (str | list[str] | None): local file(s).
        split (str): hub split.
        conversation_column (str): list of turns, or the seed's ``[sep]``-joined string.
        system_column (str | None): per-row system prompt column (the seed's CSV has one).
        system_prompt (str | None): system prompt for rows that have none of their own.
        train_on_input (bool): also train on system and user tokens.
        packed (bool): pack whole samples into ``tokenizer.max_seq_len`` sequences.

    Returns:
        ChatDataset | PackedDataset: samples ``{"tokens", "labels"}``.

    Raises:
        ValueError: missing column, odd or zero turn count, empty turn, empty file.
        FileNotFoundError: a local file that does not exist.

    Example (configs/llama3_8b/stage3_kolima_bilima_lora.yaml)::

        dataset:
          - _component_: kobllla.datasets.kolima_dataset
            source: json
            data_files: ./data/kolima_train.jsonl
            packed: True
    """
    conversations = [
        to_messages(c.system or system_prompt, c.turns, train_on_input=train_on_input)
        for c in read_conversations(
            source, data_files=data_files, split=split,
            conversation_column=conversation_column, system_column=system_column,
        )
    ]
    return finish(ChatDataset(conversations, tokenizer), tokenizer, packed=packed)
