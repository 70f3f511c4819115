"""Writing safetensors shards: buffered (:class:`ShardedSafetensorsWriter`, small models made in
memory) or streamed to disk in slices behind headers planned up front
(:func:`plan_shards` + :class:`StreamingSafetensorsWriter`, memory flat in the model's size)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kobllla.atomic import write_json
from kobllla.checkpoint_io.layout import INDEX_NAME, SINGLE_NAME, DType, as_dtype, nbytes_of

if TYPE_CHECKING:
    import torch


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard file name, e.g. ``model-00001-of-00004.safetensors``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Memory stays bounded by one shard's buffer: tensors are held until the shard is full,
    then written and released. ``close()`` names the shards ``model-0000i-of-0000N`` (or
    ``model.safetensors`` when one shard suffices) and writes the index. For checkpoints too
    large to buffer a shard of, use :class:`StreamingSafetensorsWriter`.

    Args:
        out_dir (Path): directory to write into (normally the temporary dir of
            :func:`atomic_output_dir`).
        max_shard_bytes (int): shard size limit; a single larger tensor gets a shard of its own.
        metadata (dict[str, str] | None): extra safetensors metadata (``format: pt`` is always set).
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard first if it would overflow."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file  # this writer holds torch tensors: torch is loaded

        path = self.out_dir / f".shard-{len(self._shards):05d}.partial"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[Path]:
        """Writes the last shard and the index; returns the shard paths in order."""
        self._flush()
        if not self._shards:
            raise ValueError("no tensors were written")
        total = len(self._shards)
        if total == 1:
            final = self.out_dir / SINGLE_NAME
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for i, (partial, names) in enumerate(self._shards, start=1):
            final = self.out_dir / shard_name(i, total)
            os.replace(partial, final)
            finals.append(final)
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_json(self.out_dir / INDEX_NAME, index)
        return finals


@dataclass(frozen=True)
class PlannedShard:
    """One output shard: file name, the tensors in write order, header bytes, data size."""

    file_name: str
    names: tuple[str, ...]
    header: bytes
    data_bytes: int


def plan_shards(
    tensors: Sequence[tuple[str, DType | torch.dtype, tuple[int, ...]]],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[PlannedShard]:
    """Assigns tensors to shards in order and builds every safetensors header up front.

    Within a shard, tensors with wider elements come first (stable otherwise) so every
    tensor's data starts at an offset aligned to its element size, as safetensors does.
    Dtypes may be :class:`DType` or ``torch.dtype`` (read by name; torch is not imported).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[tuple[str, DType, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        try:
            item = (name, as_dtype(dtype), tuple(shape))
        except ValueError as exc:
            raise ValueError(f"tensor {name}: {exc}") from None
        nbytes = nbytes_of(item[1], item[2])
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    if not groups[0]:
        raise ValueError("no tensors to write")
    meta = {"format": "pt", **(metadata or {})}
    shards = []
    for i, group in enumerate(groups, start=1):
        group = sorted(group, key=lambda t: -t[1].itemsize)
        header, data_bytes = _safetensors_header(group, meta)
        name = SINGLE_NAME if len(groups) == 1 else shard_name(i, len(groups))
        shards.append(PlannedShard(name, tuple(t[0] for t in group), header, data_bytes))
    return shards


def _safetensors_header(
    group: Sequence[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, int]:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in group:
        nbytes = nbytes_of(dtype, shape)
        entries[name] = {"dtype": dtype.code, "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text, offset


class StreamingSafetensorsWriter:
    """Writes planned shards by streaming each tensor's bytes, in slices, straight to disk.

    Nothing is buffered beyond the slice the caller passes: memory does not grow with the
    model. Tensors must arrive in :attr:`order` (the shards' write order) and each must be
    written completely (its slices in sequence) before the next starts; anything else is a
    programming error reported as ``ValueError``.

    Each shard's sha256 is computed from the bytes as they are written (:attr:`sha256`), so
    nothing is read back. Write-back to disk is started every ``writeback_bytes`` and a
    finished shard is fsynced by a background thread while the next one is written;
    :meth:`close` waits for all of them, so a closed writer's files are on disk.

    Args:
        out_dir (Path): directory to write into (normally the temporary dir of
            :func:`atomic_output_dir`).
        shards (list[PlannedShard]): the layout from :func:`plan_shards`.
        writeback_bytes (int): how often to ask the kernel to start writing dirty pages.
    """

    def __init__(self, out_dir: Path, shards: list[PlannedShard], *, writeback_bytes: int = 256 * 2**20) -> None:
        self.out_dir = Path(out_dir)
        self.shards = shards
        self.order = [name for shard in shards for name in shard.names]
        self._shard_of = {name: i for i, shard in enumerate(shards) for name in shard.names}
        self._sizes = {name: _entry_size(shard.header, name) for shard in shards for name in shard.names}
        self._next = 0  # index into order
        self._written = 0  # bytes of the current tensor written so far
        self._file = None
        self._file_index = -1
        self._hash = None
        self._pos = self._synced = 0
        self._writeback = writeback_bytes
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self._flushes: list = []
        self.sha256: dict[str, str] = {}
        self.total_bytes = sum(s.data_bytes for s in shards)

    def write(self, name: str, data: np.ndarray | torch.Tensor) -> None:
        """Appends ``data`` (a contiguous slice of tensor ``name``, in its output dtype: a numpy
        array of the stored bits, or a torch tensor)."""
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"write order: got tensor {name!r}, expected {expected!r}")
        shard = self._shard_of[name]
        if shard != self._file_index:
            self._open(shard)
        raw = _as_bytes(data)
        self._written += raw.nbytes
        if self._written > self._sizes[name]:
            raise ValueError(f"tensor {name!r}: more bytes written than its {self._sizes[name]}")
        self._emit(raw)
        if self._written == self._sizes[name]:
            self._next += 1
            self._written = 0

    def _emit(self, view: memoryview) -> None:
        self._file.write(view)
        self._hash.update(view)
        self._pos += len(view)
        if self._pos - self._synced >= self._writeback:
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), self._synced, self._pos - self._synced, os.POSIX_FADV_DONTNEED)
            self._synced = self._pos

    def _open(self, index: int) -> None:
        self._finish_file()
        self._file = open(self.out_dir / self.shards[index].file_name, "wb")
        self._file_index = index
        self._hash = hashlib.sha256()
        self._pos = self._synced = 0
        self._emit(memoryview(self.shards[index].header))

    def _finish_file(self) -> None:
        if self._file is not None:
            self.sha256[self.shards[self._file_index].file_name] = self._hash.hexdigest()
            self._file.flush()
            self._flushes.append(self._flusher.submit(_fsync_close, self._file))
            self._file = None

    def close(self) -> list[Path]:
        """Finishes the last shard, waits until every shard is on disk, writes the index."""
        if self._next != len(self.order):
            raise ValueError(f"tensor {self.order[self._next]!r} and later were never written")
        self._finish_file()
        self._flusher.shutdown(wait=True)
        for job in self._flushes:
            job.result()
        paths = [self.out_dir / s.file_name for s in self.shards]
        if len(self.shards) > 1:
            weight_map = {n: s.file_name for s in self.shards for n in s.names}
            write_json(self.out_dir / INDEX_NAME,
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return paths

    def abort(self) -> None:
        """Closes files without checks (the temporary directory is removed anyway)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._flusher.shutdown(wait=True)


def _as_bytes(data: np.ndarray | torch.Tensor) -> memoryview:
    """The bytes of a numpy array or a torch tensor (copied only when not contiguous)."""
    if not isinstance(data, np.ndarray):  # a torch tensor: its caller has torch loaded already
        import torch

        data = data.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _fsync_close(handle) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()


def _entry_size(header: bytes, name: str) -> int:
    begin, end = json.loads(header[8:])[name]["data_offsets"]
    return end - begin
