"""The pre-tokenized corpus format: what ``kobllla.pretokenized`` writes and training memory-maps.

A corpus is a directory::

    OUT/tokens.uint32.bin   every document's tokens laid end to end, little-endian uint32
    OUT/doc_ends.int64.bin  the stream offset where each document ends (document i+1 starts there)
    OUT/manifest.json       written last: counts, source, tokenizer (sha256, special ids, a probe)

Each document is :func:`document_tokens` of one non-empty row, the one rule that makes a
pre-tokenized corpus and ``kobllla.datasets.kowikitext_dataset`` hold the same tokens. This
module has the layout, the manifest fields that describe it, and the checks a reader runs
(:func:`open_pretokenized`, :func:`check_tokenizer`); it imports neither torch nor the writer.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

KIND = "kobllla.pretokenized"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.uint32.bin"
ENDS_FILE = "doc_ends.int64.bin"
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
END_DTYPE = np.dtype("<i8")
# Encoded at build time and again by the training tokenizer: a different tokenizer is refused.
PROBE_TEXT = "대한민국은 민주공화국이다. The capital is Seoul, 1948."
LAYOUT = "each document is [bos_id] + tokenizer.encode(NFC(text), add_bos=False, add_eos=False) + [eos_id]"


class Tokenizer(Protocol):
    """What the format needs of a tokenizer (torchtune's ``Llama3Tokenizer`` has it)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...


def document_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """One document's tokens: ``[bos] + encode(NFC(text)) + [eos]`` (:data:`LAYOUT`)."""
    ids = tokenizer.encode(unicodedata.normalize("NFC", text), add_bos=False, add_eos=False)
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def partial_dir(out_dir: Path) -> Path:
    """Where an unfinished corpus for ``out_dir`` is built: the hidden sibling ``.OUT.partial``."""
    return out_dir.parent / f".{out_dir.name}.partial"


# ----------------------------------------------------------------------------- manifest fields


def format_fields(*, tokens: int, documents: int) -> dict:
    """The manifest's description of the files: kind, version, dtypes and counts, layout."""
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "files": {
            "tokens": {"name": TOKENS_FILE, "dtype": "uint32", "byteorder": "little", "count": tokens},
            "doc_ends": {"name": ENDS_FILE, "dtype": "int64", "byteorder": "little", "count": documents},
        },
        "layout": LAYOUT,
    }


def tokenizer_fields(tokenizer: Tokenizer) -> dict:
    """What :func:`check_tokenizer` compares later: special ids and the probe text's ids."""
    return {
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "probe": {"text": PROBE_TEXT, "ids": tokenizer.encode(PROBE_TEXT, add_bos=False, add_eos=False)},
    }


# ----------------------------------------------------------------------------- reading


@dataclass
class PretokenizedCorpus:
    """An opened corpus: memory-mapped tokens and document ends, and its manifest."""

    path: Path
    tokens: np.ndarray
    doc_ends: np.ndarray
    manifest: dict


def open_pretokenized(path: str | Path) -> PretokenizedCorpus:
    """Memory-maps a corpus written by ``kobllla.pretokenized.pretokenize`` after checking that it is whole.

    Cost is independent of corpus size except one pass over the document ends (8 bytes a
    document) to check they increase; no token is read.

    Raises:
        FileNotFoundError: no such directory, or a file the manifest lists is missing.
        ValueError: no manifest (an unfinished run), another format, or files whose sizes or
            offsets disagree with the manifest.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        partial = partial_dir(path)
        hint = f"; an unfinished run is in {partial}: rerun the same pretokenize command to finish it"
        raise FileNotFoundError(
            f"{path}: no pretokenized corpus here; make one with python -m tools.pretokenize --out {path}"
            f"{hint if partial.is_dir() else ''}"
        )
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(
            f"{path}: no {MANIFEST}, so not a complete pretokenized corpus; rebuild it with python -m tools.pretokenize"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("kind") != KIND or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: kind {manifest.get('kind')!r} version {manifest.get('format_version')!r}, "
            f"expected {KIND!r} version {FORMAT_VERSION}; rebuild it with python -m tools.pretokenize"
        )
    counts = manifest["counts"]
    tokens = _map(path / TOKENS_FILE, TOKEN_DTYPE, counts["tokens"])
    doc_ends = _map(path / ENDS_FILE, END_DTYPE, counts["documents"])
    _check_ends(path / ENDS_FILE, doc_ends, counts["tokens"])
    return PretokenizedCorpus(path, tokens, doc_ends, manifest)


def _map(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing, so the corpus is incomplete; rebuild it with tools.pretokenize")
    size = file.stat().st_size
    if size != count * dtype.itemsize or count == 0:
        raise ValueError(
            f"{file}: {size} bytes, the manifest says {count} x {dtype.itemsize}-byte values "
            f"({count * dtype.itemsize} bytes); the file is truncated or from another run: rebuild the corpus"
        )
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def _check_ends(file: Path, ends: np.ndarray, total: int) -> None:
    if int(ends[-1]) != total or int(ends[0]) < 2 or (len(ends) > 1 and int(np.diff(ends).min()) < 2):
        raise ValueError(
            f"{file}: document ends must increase by >= 2 (bos + eos) and end at the token count {total}; "
            "the file is corrupt: rebuild the corpus"
        )


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, *, where: Path) -> None:
    """Refuses a training tokenizer that would read these ids differently from the one that wrote them."""
    info = manifest["tokenizer"]
    for key in ("bos_id", "eos_id"):
        if getattr(tokenizer, key) != info[key]:
            raise ValueError(
                f"{where}: tokens were written with {key} {info[key]}, the config's tokenizer has "
                f"{getattr(tokenizer, key)}; point tokenizer.path at the tokenizer.model with sha256 "
                f"{info['sha256'][:12]}... or rerun pretokenize"
            )
    probe = info["probe"]
    if tokenizer.encode(probe["text"], add_bos=False, add_eos=False) != probe["ids"]:
        raise ValueError(
            f"{where}: the config's tokenizer encodes the manifest's probe text differently from the tokenizer "
            f"that wrote this corpus ({info['path']}, sha256 {info['sha256'][:12]}...); use that tokenizer or "
            "rerun pretokenize"
        )
