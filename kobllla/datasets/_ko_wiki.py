"""Korean Wikipedia text completion for stage 1 (continued pretraining).

Unlike torchtune's ``text_completion_dataset`` (and the seed's class), which cut every
article at ``max_seq_len`` and drop the rest, a long article is split into consecutive
windows that share one token, so every token of the article except BOS is a prediction
target exactly once. Each article is ``<|begin_of_text|> text <|end_of_text|>``, NFC-normalised.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from kobllla.datasets._collate import CollateGuard, check_pack_flags
from kobllla.datasets._sources import Row, iter_rows, require_field
from kobllla.datasets._windows import document_windows, pack_windows, packed_sample, segments_in
from kobllla.token_file import document_tokens

log = logging.getLogger(__name__)

KOWIKI_HUB_ID = "wikimedia/wikipedia"
KOWIKI_HUB_CONFIG = "20231101.ko"


@dataclass
class CorpusStats:
    """What building a text dataset kept and skipped."""

    rows: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_by_filter: int = 0
    tokens: int = 0
    samples: int = 0


class TokenCorpus:
    """All documents' tokens laid end to end (int32) with the offset where each one ends."""

    def __init__(self) -> None:
        self._tokens = array("i")
        self._ends = array("q")

    def add(self, ids: list[int]) -> None:
        self._tokens.extend(ids)
        self._ends.append(len(self._tokens))

    def freeze(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._tokens, dtype=np.int32), np.frombuffer(self._ends, dtype=np.int64)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tokenize_documents(
    rows: Callable[[], object],
    tokenizer: ModelTokenizer,
    *,
    column: str,
    filter_fn: Callable[[Row], bool] | None,
) -> tuple[np.ndarray, np.ndarray, CorpusStats]:
    """Tokenizes every non-empty document as ``[BOS] + text + [EOS]`` (text NFC-normalised).

    The rule is ``kobllla.token_file.document_tokens``, the one ``tools.pretokenize`` writes.
    """
    corpus, stats = TokenCorpus(), CorpusStats()
    for ref, row in tqdm(rows(), desc="tokenizing", unit=" docs", disable=not _is_rank_zero()):
        stats.rows += 1
        text = require_field(ref, row, column, config_key="column")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError(f"{ref}: field {column!r} is {type(text).__name__}, expected text")
        if not text.strip():
            stats.skipped_empty += 1
            continue
        if filter_fn is not None and not filter_fn(row):
            stats.skipped_by_filter += 1
            continue
        corpus.add(document_tokens(tokenizer, text))
        stats.documents += 1
    tokens, ends = corpus.freeze()
    stats.tokens = int(len(tokens))
    if stats.documents == 0:
        raise ValueError(
            f"no text to train on: {stats.rows} rows read, {stats.skipped_empty} empty, "
            f"{stats.skipped_by_filter} filtered out; check column/data_files"
        )
    return tokens, ends, stats


class TextWindowDataset(Dataset):
    """Unpacked samples: each document cut into overlapping windows of at most ``max_seq_len``."""

    def __init__(self, tokens: np.ndarray, ends: np.ndarray, *, max_seq_len: int, stats: CorpusStats) -> None:
        self._tokens = tokens
        starts = np.concatenate([[0], ends[:-1]])
        bounds = zip(starts.tolist(), ends.tolist(), strict=True)
        self._windows = [w for s, e in bounds for w in document_windows(s, e, max_seq_len)]
        self.stats = stats
        self.stats.samples = len(self._windows)

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        s, e = self._windows[index]
        ids = self._tokens[s:e].astype(np.int64).tolist()
        return {"tokens": ids, "labels": list(ids)}


class PackedTextDataset(PackedDataset):
    """Packs of exactly ``max_seq_len`` tokens over the document stream, no token lost.

    A ``torchtune.datasets.PackedDataset`` (so ``ConcatDataset`` and the recipes treat it as
    packed, with document masking from ``seq_lens``) that keeps the stream as one int32 array
    and builds each pack on access instead of holding every pack as int64 tensors. Padding
    appears only in the last pack.
    """

    def __init__(  # no super().__init__(): it would pack eagerly; this class packs lazily
        self, tokens: np.ndarray, ends: np.ndarray, *, max_seq_len: int, pad_id: int, stats: CorpusStats,
        guard: CollateGuard | None = None,
    ) -> None:
        self._guard = guard
        self._tokens = tokens
        self._ends = ends.tolist()
        self.max_seq_len = max_seq_len
        self.padding_idx = pad_id
        self.split_across_pack = True
        self._packs = pack_windows(self._ends, max_seq_len)
        self.stats = stats
        self.stats.samples = len(self._packs)

    def __len__(self) -> int:
        return len(self._packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._guard is not None:
            self._guard.check(self)
        s, e = self._packs[index]
        sample = packed_sample(
            self._tokens[s:e], segments_in(self._ends, s, e),
            max_len=self.max_seq_len, pad_id=self.padding_idx, ignore_index=CROSS_ENTROPY_IGNORE_IDX,
        )
        return {k: torch.tensor(v, dtype=torch.long) for k, v in sample.items()}


def kowikitext_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str = KOWIKI_HUB_ID,
    name: str | None = KOWIKI_HUB_CONFIG,
    data_files: str | list[str] | None = None,
    column: str = "text",
    split: str = "train",
    max_seq_len: int | None = None,
    packed: bool = False,
    pack: bool = False,
    filter_fn: Callable[[Row], bool] | None = None,
) -> TextWindowDataset | PackedTextDataset:
    """Korean Wikipedia (or any text column) for continued pretraining, no token dropped.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (``bos_id``, ``eos_id``, ``encode``).
        source (str): hub id (default ``wikimedia/wikipedia`` with ``name`` 20231101.ko), a
            format (``csv``/``json``/``jsonl``/``parquet``) with ``data_files``, or a local file path.
        name (str | None): hub configuration; ignored for local files.
        data_files (str | list[str] | None): local file(s), e.g. the seed's ``kowikitext_20240501.csv``.
        column (str): the text column.
        split (str): hub split.
        max_seq_len (int | None): window length; defaults to ``tokenizer.max_seq_len``.
        packed (bool): pack documents into full ``max_seq_len`` sequences (the recipe collates
            them with torchtune's ``padded_collate_packed``).
        pack (bool): the same packs, for ``collate_fn: kobllla.datasets.packed_collate``, which
            builds the document mask without host syncs (faster on GPU); the recipes only use a
            config's ``collate_fn`` when ``packed`` is unset, hence the second key.
        filter_fn (Callable | None): keep a row only when it returns True.

    Returns:
        TextWindowDataset | PackedTextDataset: samples ``{"tokens", "labels"}`` with
        ``labels == tokens`` (torchtune 0.6.1 shifts in the recipe), or packs.

    Raises:
        ValueError: no window length, both ``packed`` and ``pack``, a missing column, or no
            usable text. Reading more than a batch of ``pack=True`` samples without
            ``packed_collate`` raises RuntimeError.

    Example (configs/llama3_8b/stage1_kowiki_lora.yaml)::

        dataset:
          _component_: kobllla.datasets.kowikitext_dataset
          source: csv
          data_files: ./data/kowikitext_20240501.csv
          packed: True
    """
    length = max_seq_len or getattr(tokenizer, "max_seq_len", None)
    if not length:
        raise ValueError("kowikitext_dataset needs a window length: set tokenizer.max_seq_len or dataset.max_seq_len")
    check_pack_flags("kowikitext_dataset", packed=packed, pack=pack)
    rows = lambda: iter_rows(source, data_files=data_files, name=name, split=split)  # noqa: E731
    tokens, ends, stats = tokenize_documents(rows, tokenizer, column=column, filter_fn=filter_fn)
    if packed or pack:
        ds: TextWindowDataset | PackedTextDataset = PackedTextDataset(
            tokens, ends, max_seq_len=length, pad_id=tokenizer.pad_id, stats=stats,
            guard=CollateGuard("kowikitext_dataset") if pack else None,
        )
    else:
        ds = TextWindowDataset(tokens, ends, max_seq_len=length, stats=stats)
    if _is_rank_zero():
        log.info(
            "kowikitext: %d rows, %d documents, %d empty skipped, %d tokens -> %d %s of <= %d",
            stats.rows, stats.documents, stats.skipped_empty, stats.tokens, stats.samples,
            "packs" if packed or pack else "windows", length,
        )
    return ds
