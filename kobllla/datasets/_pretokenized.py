"""Training samples read straight from a pre-tokenized corpus (``python -m tools.pretokenize``).

The same windows and packs as :func:`kobllla.datasets.kowikitext_dataset` (rules in
``_windows.py``: no token lost, BOS/EOS at document boundaries), but over a memory-mapped
token file, so start-up does not depend on the corpus size: no text is read, no token is
touched until a sample is asked for, and the index is a few numpy arrays computed without a
per-token or per-pack Python loop.

Index memory, kept for the run: unpacked, 8 bytes a document; packed, 16 bytes per pack
boundary that falls exactly on a document end (roughly documents / max_seq_len of them).
While the packed index is built, ~24 bytes a document are used for well under a second
(Korean Wikipedia: 1.15 M documents, ~28 MB).

Each rank its own share: every rank builds the same index over the same file, and torchtune's
recipes wrap the dataset in ``StatefulDistributedSampler(ds, num_replicas=world_size,
rank=rank, shuffle=cfg.shuffle)``. With ``shuffle: True`` the sampler draws one permutation of
all sample indices from ``torch.Generator().manual_seed(0 + epoch)`` (seed 0: the recipe does
not pass ``cfg.seed``), pads it to a multiple of the world size by repeating its first
indices, and gives rank r the positions r, r + W, r + 2W, ...: disjoint shares, identical on
every run and every restart, a new order each epoch. Pages of the token file are shared by all
ranks of a node through the page cache, so N ranks cost one copy of what they read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from kobllla.datasets._collate import CollateGuard, check_pack_flags
from kobllla.datasets._ko_wiki import CorpusStats
from kobllla.datasets._windows import packed_sample, segments_in
from kobllla.token_file import PretokenizedCorpus, check_tokenizer, open_pretokenized

log = logging.getLogger(__name__)

_QUERY_CHUNK = 1 << 18  # sources per searchsorted call while building the packed index (~10 MB)


# ----------------------------------------------------------------------------- index


def window_index(doc_ends: np.ndarray, max_len: int) -> np.ndarray:
    """First window number of each document, plus the total: ``document_windows`` for all documents.

    Document d ``[start, end)`` has ``max(1, ceil((end - start - 1) / (max_len - 1)))`` windows,
    window j starting at ``start + j * (max_len - 1)`` and ending at ``min(that + max_len, end)``.
    """
    _check_len(max_len)
    ends = np.asarray(doc_ends, dtype=np.int64)
    lengths = np.diff(ends, prepend=0)
    counts = np.maximum(1, -(-(lengths - 1) // (max_len - 1)))
    return np.concatenate([[0], np.cumsum(counts)])


def window_bounds(doc_ends: np.ndarray, first_window: np.ndarray, max_len: int, index: int) -> tuple[int, int]:
    """Stream slice ``[s, e)`` of window ``index``."""
    d = int(np.searchsorted(first_window, index, side="right")) - 1
    start = int(doc_ends[d - 1]) if d > 0 else 0
    s = start + (index - int(first_window[d])) * (max_len - 1)
    return s, min(s + max_len, int(doc_ends[d]))


def pack_runs(doc_ends: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The packs of ``pack_windows(doc_ends, max_len)`` as runs of evenly spaced packs.

    Packs start ``max_len - 1`` apart (consecutive packs share a token) until a pack ends
    exactly on a document end d; the next pack starts at d and a new run begins. From a start
    s, that end is the first d >= s + max_len with d = s + 1 (mod max_len - 1). It is found for
    every possible start (0 and each document end) at once (:func:`_next_run`), then followed
    from 0: one Python step per run, not per pack or token.

    Returns:
        (run_starts, first_pack): run k starts at ``run_starts[k]`` and holds packs
        ``first_pack[k] .. first_pack[k + 1] - 1``; ``first_pack[-1]`` is the number of packs.
    """
    _check_len(max_len)
    ends = np.asarray(doc_ends, dtype=np.int64)
    total, step = int(ends[-1]), max_len - 1
    nxt = _next_run(ends[:-1], max_len)
    chain = [0]
    while (j := int(nxt[chain[-1]])) >= 0:
        chain.append(j)
    run_starts = np.concatenate([[0], ends[:-1][np.asarray(chain[1:], dtype=np.int64) - 1]])
    counts = np.empty(len(chain), dtype=np.int64)
    counts[:-1] = (run_starts[1:] - run_starts[:-1] - max_len) // step + 1
    counts[-1] = 1 + max(0, -(-(total - int(run_starts[-1]) - max_len) // step))
    return run_starts, np.concatenate([[0], np.cumsum(counts)])


def _next_run(inner: np.ndarray, max_len: int) -> np.ndarray:
    """For start 0 (entry 0) and each inner document end k (entry k + 1): the entry of the first
    inner end d >= start + max_len with d = start + 1 (mod max_len - 1), or -1.

    Ends are sorted by (residue, offset) with a stable radix sort on the residue; the queries
    are asked in that same order rotated by one residue, so each searchsorted call walks the
    sorted keys forward (ten times faster than random queries on millions of documents).
    """
    step = max_len - 1
    span = (int(inner[-1]) if len(inner) else 0) + max_len + 1  # key = residue * span + offset
    index_type = np.int32 if len(inner) < 2**31 - 1 else np.int64  # 12 of the ~24 bytes a document
    residue = (inner % step).astype(np.uint16 if step <= 1 << 16 else np.uint32)
    order = np.argsort(residue, kind="stable").astype(index_type)
    keys = inner[order]
    spread = residue[order].astype(np.int64)
    del residue
    spread *= span
    keys += spread
    del spread
    nxt = np.full(len(inner) + 1, -1, dtype=index_type)

    def ask(entries: np.ndarray, starts: np.ndarray) -> None:
        want = (starts + 1) % step
        pos = np.searchsorted(keys, want * span + starts + max_len)
        hit = pos < len(keys)
        hit[hit] = keys[pos[hit]] // span == want[hit]
        nxt[entries[hit]] = order[pos[hit]] + 1

    ask(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    last_group = int(np.searchsorted(keys, (step - 1) * span))  # its queries want residue 0: ask them first
    for part in (order[last_group:], order[:last_group]):
        for lo in range(0, len(part), _QUERY_CHUNK):
            k = part[lo : lo + _QUERY_CHUNK]
            ask(k + 1, inner[k])
    return nxt


def pack_bounds(
    run_starts: np.ndarray, first_pack: np.ndarray, total: int, max_len: int, index: int
) -> tuple[int, int]:
    """Stream slice ``[s, e)`` of pack ``index``."""
    k = int(np.searchsorted(first_pack, index, side="right")) - 1
    s = int(run_starts[k]) + (index - int(first_pack[k])) * (max_len - 1)
    return s, min(s + max_len, total)


def _check_len(max_len: int) -> None:
    if max_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 to hold a token and its target, got {max_len}")


# ----------------------------------------------------------------------------- datasets


class _MappedCorpus:
    """Reopens the memory maps after pickling (DataLoader workers) instead of copying them."""

    _corpus: PretokenizedCorpus

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_corpus"] = str(self._corpus.path)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_corpus"] = open_pretokenized(state["_corpus"])
        self.__dict__.update(state)


class PretokenizedWindowDataset(_MappedCorpus, Dataset):
    """Unpacked samples: each document in windows of at most ``max_seq_len`` sharing one token.

    Same samples, in the same order, as ``TextWindowDataset`` built from the same rows.
    """

    def __init__(self, corpus: PretokenizedCorpus, *, max_seq_len: int, stats: CorpusStats) -> None:
        self._corpus = corpus
        self.max_seq_len = max_seq_len
        self._first_window = window_index(corpus.doc_ends, max_seq_len)
        self.stats = stats
        self.stats.samples = len(self)

    def __len__(self) -> int:
        return int(self._first_window[-1])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        index = _check_index(index, len(self))
        s, e = window_bounds(self._corpus.doc_ends, self._first_window, self.max_seq_len, index)
        ids = self._corpus.tokens[s:e].astype(np.int64).tolist()
        return {"tokens": ids, "labels": list(ids)}


class PretokenizedPackedDataset(_MappedCorpus, PackedDataset):
    """Packs of exactly ``max_seq_len`` tokens over the memory-mapped stream, no token lost.

    Same packs, in the same order, as ``PackedTextDataset`` built from the same rows: a
    ``torchtune.datasets.PackedDataset`` (``ConcatDataset`` and the recipes treat it as
    packed; document masking from ``seq_lens``) whose packs are built on access.
    """

    def __init__(  # no super().__init__(): it would pack eagerly
        self, corpus: PretokenizedCorpus, *, max_seq_len: int, pad_id: int, stats: CorpusStats,
        guard: CollateGuard | None = None,
    ) -> None:
        self._guard = guard
        self._corpus = corpus
        self.max_seq_len = max_seq_len
        self.padding_idx = pad_id
        self.split_across_pack = True
        self._run_starts, self._first_pack = pack_runs(corpus.doc_ends, max_seq_len)
        self.stats = stats
        self.stats.samples = len(self)

    def __len__(self) -> int:
        return int(self._first_pack[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._guard is not None:
            self._guard.check(self)
        index = _check_index(index, len(self))
        ends = self._corpus.doc_ends
        s, e = pack_bounds(self._run_starts, self._first_pack, int(ends[-1]), self.max_seq_len, index)
        lo, hi = np.searchsorted(ends, [s, e], side="right")  # the document ends inside (s, e]
        sample = packed_sample(
            self._corpus.tokens[s:e], segments_in(ends[lo : hi + 1].tolist(), s, e),
            max_len=self.max_seq_len, pad_id=self.padding_idx, ignore_index=CROSS_ENTROPY_IGNORE_IDX,
        )
        return {k: torch.tensor(v, dtype=torch.long) for k, v in sample.items()}


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"sample {index} out of range for {length} samples")
    return index


def pretokenized_dataset(
    tokenizer: ModelTokenizer,
    *,
    path: str,
    max_seq_len: int | None = None,
    packed: bool = False,
    pack: bool = False,
) -> PretokenizedWindowDataset | PretokenizedPackedDataset:
    """Stage-1 text completion from a corpus made by ``python -m tools.pretokenize``.

    A drop-in for :func:`kowikitext_dataset` at any corpus size: the same samples from the
    same rows, with start-up in well under a second and memory that holds an index, not the
    corpus. Shuffling and each rank's share come from the recipe's sampler (module docstring).

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer; it must be the one that wrote the
            corpus (its BOS/EOS ids and a probe text from the manifest are checked).
        path (str): the directory ``tools.pretokenize --out`` wrote.
        max_seq_len (int | None): window length; defaults to ``tokenizer.max_seq_len``.
        packed (bool): packs of exactly ``max_seq_len`` (padding only in the last one). Keep it
            equal to the config's ``dataset.packed``: the recipe reads that key, not this
            default, to pick the collate function; False matches the recipe's default.
        pack (bool): the same packs, for ``collate_fn: kobllla.datasets.packed_collate`` (document
            mask built without host syncs; see :func:`kowikitext_dataset`).

    Returns:
        PretokenizedWindowDataset | PretokenizedPackedDataset: samples ``{"tokens", "labels"}``
        with ``labels == tokens`` (the recipe shifts), or packs with ``input_pos``/``seq_lens``.

    Raises:
        FileNotFoundError: no corpus at ``path``.
        ValueError: an unfinished or corrupt corpus, another tokenizer, no window length, or
            both ``packed`` and ``pack``.

    Example (configs/tiny/stage1_pretokenized_lora.yaml)::

        dataset:
          _component_: kobllla.datasets.pretokenized_dataset
          path: runs/tiny/data/ko_train.tokens
          packed: True
    """
    length = max_seq_len or getattr(tokenizer, "max_seq_len", None)
    if not length:
        raise ValueError("pretokenized_dataset needs a window length: set tokenizer.max_seq_len or dataset.max_seq_len")
    _check_len(length)
    check_pack_flags("pretokenized_dataset", packed=packed, pack=pack)
    corpus = open_pretokenized(path)
    check_tokenizer(corpus.manifest, tokenizer, where=corpus.path)
    counts = corpus.manifest["counts"]
    stats = CorpusStats(rows=counts["rows"], documents=counts["documents"], skipped_empty=counts["skipped_empty"],
                        tokens=counts["tokens"])
    if packed or pack:
        pad_id = tokenizer.pad_id
        ds: PretokenizedWindowDataset | PretokenizedPackedDataset = PretokenizedPackedDataset(
            corpus, max_seq_len=length, pad_id=pad_id, stats=stats,
            guard=CollateGuard("pretokenized_dataset") if pack else None)
    else:
        ds = PretokenizedWindowDataset(corpus, max_seq_len=length, stats=stats)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("pretokenized %s: %d documents, %d tokens -> %d %s of <= %d", Path(path).name, stats.documents,
                 stats.tokens, stats.samples, "packs" if packed or pack else "windows", length)
    return ds
