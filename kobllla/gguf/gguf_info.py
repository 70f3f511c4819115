"""What a GGUF file holds: metadata scalars and each tensor's type and shape, from its header.

Every export is verified with this (tokenizer pre-tag, eos, chat template, tensor types). It reads
only the header, skipping arrays (the 128,256 tokens and 280,147 merges of Llama 3) without building
them: gguf-py's ``GGUFReader`` builds every array element and takes 5-25 s per file on a loaded
2-core machine, this takes well under a second. The tests check it against ``GGUFReader``.
Layout (GGUF v2/v3, little-endian): ``GGUF``, version u32, n_tensors u64, n_kv u64, the key/value
pairs, then per tensor: name, n_dims u32, dims u64 x n_dims, ggml type u32, offset u64.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# GGUF value types -> struct format (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFArray:
    """An array value, not read: its element type and length."""

    elem_type: int
    count: int


@dataclass(frozen=True)
class GGUFInfo:
    """The fields of a GGUF file an export is checked against."""

    path: Path
    metadata: dict[str, object]
    # 2-D (matrix) tensor name -> ggml type name (Q4_K, F16, ...); 1-D norms stay F32 in every quant
    matrix_types: dict[str, str] = field(default_factory=dict)
    matrix_rows: dict[str, int] = field(default_factory=dict)  # name -> row length (ne[0])

    def get(self, key: str) -> object:
        return self.metadata.get(key)

    @property
    def tokenizer_pre(self) -> str | None:
        return self.metadata.get("tokenizer.ggml.pre")

    @property
    def eos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.eos_token_id")

    @property
    def bos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.bos_token_id")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.matrix_types.values()).most_common())


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.off, self.path = buf, 0, path

    def unpack(self, fmt: str):
        if self.off + struct.calcsize(fmt) > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.off}; the file is incomplete")
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.off:self.off + n]
        self.off += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.off}")
        elem, count = self.unpack("<I"), self.unpack("<Q")
        if elem in _SCALARS:
            self.off += count * struct.calcsize(_SCALARS[elem])
        else:
            for _ in range(count):
                self.value(elem)
        return GGUFArray(elem, count)


def read_gguf_info(path: Path) -> GGUFInfo:
    """Reads a GGUF file's metadata scalars and tensor types (arrays are skipped, no tensor data read).

    Raises:
        ValueError: not a GGUF file, or a truncated one.
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        cur = _Cursor(buf, path)
        cur.off = 4
        version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}; this reader knows versions 2 and 3")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        types, rows = {}, {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            ggml_type, _offset = cur.unpack("<I"), cur.unpack("<Q")
            if len(dims) >= 2:
                types[name] = GGMLQuantizationType(ggml_type).name
                rows[name] = int(dims[0])
    return GGUFInfo(path=path, metadata=metadata, matrix_types=types, matrix_rows=rows)
