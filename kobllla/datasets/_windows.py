"""Cutting token streams into training windows without losing a token.

torchtune 0.6.1 keeps ``labels == tokens`` and the recipe shifts them (``labels[1:]``), so the
first token of every sample is never a prediction target. Cutting a long document into
disjoint windows would therefore drop one target per cut. Here consecutive windows of the
same document overlap by exactly one token: the last token of window k is the first of
window k+1, so every token of a document except its BOS is a target exactly once.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def document_windows(start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """Windows ``[s, e)`` over one document ``[start, end)``, each at most ``max_len`` long.

    Consecutive windows share one token; the last window has at least two tokens (a one-token
    tail would be the shared token alone, with nothing to predict).

    >>> document_windows(0, 10, 4)
    [(0, 4), (3, 7), (6, 10)]
    """
    if max_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 to hold a token and its target, got {max_len}")
    windows = []
    s = start
    while True:
        e = min(s + max_len, end)
        windows.append((s, e))
        if e >= end:
            return windows
        s = e - 1


def pack_windows(doc_ends: Sequence[int], max_len: int) -> list[tuple[int, int]]:
    """Packs ``[s, e)`` of ``max_len`` over a stream of documents laid end to end.

    ``doc_ends[i]`` is the stream offset where document i ends (document i+1 starts there).
    A pack that ends inside a document makes the next pack start one token earlier, so that
    token is both the last input of one pack and the first input of the next; a pack that ends
    exactly at a document boundary makes the next pack start at that boundary.
    """
    if max_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 to hold a token and its target, got {max_len}")
    total = int(doc_ends[-1]) if len(doc_ends) else 0
    packs = []
    s = 0
    while s < total:
        e = min(s + max_len, total)
        packs.append((s, e))
        if e >= total:
            break
        at_boundary = _contains(doc_ends, e)
        s = e if at_boundary else e - 1
    return packs


def _contains(sorted_values: Sequence[int], value: int) -> bool:
    i = bisect.bisect_left(sorted_values, value)
    return i < len(sorted_values) and sorted_values[i] == value


def segments_in(doc_ends: Sequence[int], s: int, e: int) -> list[int]:
    """Lengths of the document pieces that make up the stream slice ``[s, e)``."""
    lengths = []
    i = bisect.bisect_right(doc_ends, s)
    cursor = s
    while cursor < e:
        piece_end = min(int(doc_ends[i]), e) if i < len(doc_ends) else e
        lengths.append(piece_end - cursor)
        cursor = piece_end
        i += 1
    return lengths


def packed_sample(
    tokens: np.ndarray,
    seq_lens: list[int],
    *,
    max_len: int,
    pad_id: int,
    ignore_index: int,
) -> dict[str, list[int]]:
    """One pack in torchtune's ``PackedDataset`` layout (before tensor conversion).

    Labels equal tokens, except at the first token of every piece, which is set to
    ``ignore_index``: after the recipe's shift that stops a piece's last token from being
    trained to predict the next piece's first token (another document, or a token the
    previous pack already trained). Padding follows ``PackedDataset._pad_pack``.
    """
    tok = tokens.astype(np.int64).tolist()
    labels = list(tok)
    input_pos: list[int] = []
    offset = 0
    for length in seq_lens:
        labels[offset] = ignore_index
        input_pos.extend(range(length))
        offset += length
    pad = max_len - len(tok)
    if pad > 0:
        last = input_pos[-1]
        input_pos.extend(min(p, max_len - 1) for p in range(last + 1, last + 1 + pad))
        tok.extend([pad_id] * pad)
        labels.extend([ignore_index] * pad)
        seq_lens = [*seq_lens, pad]
    return {"tokens": tok, "labels": labels, "input_pos": input_pos, "seq_lens": list(seq_lens)}
