"""What a Hugging Face checkpoint directory is made of: file names, safetensors dtype codes
(:class:`DType`, torch-free), and :class:`TensorInfo` (where one tensor's bytes live)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class DType:
    """A tensor element type, named as torch names it, without importing torch.

    Attributes:
        name (str): torch's name (``bfloat16``); ``str(dtype)`` is this name.
        code (str): the safetensors header code (``BF16``).
        itemsize (int): bytes per element.
        storage (str): numpy dtype holding the elements' bits (``<u2`` for bfloat16, which
            numpy lacks; the element type itself otherwise).
    """

    name: str
    code: str
    itemsize: int
    storage: str

    def __str__(self) -> str:
        return self.name

    @property
    def is_floating(self) -> bool:
        return self.name in ("float64", "float32", "float16", "bfloat16")

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype of the stored bits (bfloat16: ``uint16``)."""
        return np.dtype(self.storage)

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype (imports torch: only for callers that want torch tensors)."""
        import torch

        return getattr(torch, self.name)


SAFETENSORS_DTYPES: dict[str, DType] = {code: DType(name, code, size, storage) for code, name, size, storage in (
    ("F64", "float64", 8, "<f8"), ("F32", "float32", 4, "<f4"), ("F16", "float16", 2, "<f2"),
    ("BF16", "bfloat16", 2, "<u2"), ("I64", "int64", 8, "<i8"), ("I32", "int32", 4, "<i4"),
    ("I16", "int16", 2, "<i2"), ("I8", "int8", 1, "i1"), ("U8", "uint8", 1, "u1"), ("BOOL", "bool", 1, "?"),
)}
_BY_NAME = {d.name: d for d in SAFETENSORS_DTYPES.values()}


def as_dtype(dtype: DType | str | object) -> DType:
    """A :class:`DType` from itself, a name (``"bfloat16"``) or a ``torch.dtype`` (read by name,
    so torch is not imported here).

    Raises:
        ValueError: the dtype cannot be stored in safetensors (names the choices).
    """
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _BY_NAME:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors here; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]


CheckpointFormat = Literal["safetensors", "torch-hf", "torch-meta"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset of its data in a
    safetensors file; ``None`` for tensors held by a torch pickle."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def nbytes_of(dtype: DType | object, shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * as_dtype(dtype).itemsize
