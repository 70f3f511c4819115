"""Checkpoint input and output, one tensor (or one slice of a tensor) at a time.

Reading (:func:`open_checkpoint`) takes any of the layouts a Llama 3 checkpoint comes in and
presents it under Hugging Face tensor names:

- a Hugging Face directory: ``model.safetensors``, or shards listed by
  ``model.safetensors.index.json`` (torchtune's ``epoch_N/`` output is this layout);
- torch pickles: ``pytorch_model.bin`` (+ ``pytorch_model.bin.index.json``), Meta's
  ``consolidated.00.pth`` (Meta names, q/k rows permuted into HF order with ``params.json``),
  and torchtune's Meta-format ``epoch_N/model-00001-of-00001.bin``. They are loaded with
  ``weights_only=True`` (no arbitrary objects are unpickled) and ``mmap=True``.

Safetensors files are read with ``os.preadv`` into a caller's buffer rather than through
mmap, so resident memory stays at the size of that buffer however large the model is.

Writing: :class:`StreamingSafetensorsWriter` lays out all shards up front from the tensor
names, dtypes and shapes, writes each shard's header first and then streams tensor bytes
straight to disk in slices; :class:`ShardedSafetensorsWriter` buffers whole tensors up to a
shard's size (for small models made in memory). Outputs are built in a hidden temporary
sibling (``.NAME.tmp-PID``) by :func:`atomic_output_dir` and renamed into place only when
complete, so a killed job never leaves a directory that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

# Re-exported: tools and tests import these from here; they live in the torch-free kobllla.atomic.
from kobllla.atomic import atomic_output_dir, write_json  # noqa: F401

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

CheckpointFormat = Literal["safetensors", "torch-hf", "torch-meta"]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[PlannedShard]:
    """Assigns tensors to shards in order and builds every safetensors header up front.

    Within a shard, tensors with wider elements come first (stable otherwise) so every
    tensor's data starts at an offset aligned to its element size, as safetensors does.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for item in tensors:
        nbytes = _nbytes(item[1], item[2])
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


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def _safetensors_header(
    group: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, int]:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in group:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors here")
        nbytes = _nbytes(dtype, shape)
        entries[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
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

    def write(self, name: str, data: torch.Tensor) -> None:
        """Appends ``data`` (a contiguous slice of tensor ``name``, in its output dtype)."""
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"write order: got tensor {name!r}, expected {expected!r}")
        shard = self._shard_of[name]
        if shard != self._file_index:
            self._open(shard)
        raw = data.detach().contiguous().view(-1).view(torch.uint8)
        self._written += raw.numel()
        if self._written > self._sizes[name]:
            raise ValueError(f"tensor {name!r}: more bytes written than its {self._sizes[name]}")
        self._emit(raw.numpy().data)
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


def _fsync_close(handle) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()


def _entry_size(header: bytes, name: str) -> int:
    begin, end = json.loads(header[8:])[name]["data_offsets"]
    return end - begin


class SequentialHasher:
    """sha256 of a whole file, computed from bytes a reader already holds where it can.

    Bytes fed exactly at the running position are hashed at once (no second read); bytes
    fed anywhere else are ignored, and :meth:`finish` reads whatever was not hashed from the
    file itself, so the digest is always that of the complete file, whatever the read order.

    Several threads can hash one file together without a second read: the thread that hands
    out reads calls :meth:`claim` for each slice in read order, and each reader then calls
    :meth:`feed_in_turn`, which waits until the bytes before its slice are hashed. Files are
    hashed in parallel with each other and with the reads (sha256 itself is serial per file);
    hashlib releases the GIL while it hashes.

    Args:
        path (Path): the file.
        prime (int): hash this many leading bytes now (a safetensors header, which the
            tensor reads never cover).
    """

    def __init__(self, path: Path, *, prime: int = 0) -> None:
        self.path = Path(path)
        self.digest = hashlib.sha256()
        self.pos = 0
        if prime:
            with open(self.path, "rb") as handle:
                self.feed(0, memoryview(handle.read(prime)))
        self._claimed = self.pos  # end of the bytes promised by claim()
        self._turn = threading.Condition()
        self._abandoned = False

    def feed(self, offset: int, data: memoryview) -> None:
        if offset == self.pos:
            self.digest.update(data)
            self.pos += len(data)

    def claim(self, offset: int, nbytes: int) -> bool:
        """Promises that ``feed_in_turn(offset, ...)`` will come (called in read order, by one
        thread); False if the slice does not continue the claimed bytes (it is then read by
        :meth:`finish`) and must not be fed in turn."""
        if nbytes <= 0 or offset != self._claimed:
            return False
        self._claimed += nbytes
        return True

    def feed_in_turn(self, offset: int, data: memoryview) -> None:
        """Hashes a claimed slice once every claimed byte before it is hashed."""
        with self._turn:
            self._turn.wait_for(lambda: self.pos == offset or self._abandoned)
            if self._abandoned:
                return
        self.digest.update(data)  # only this thread can be at ``offset``: no lock needed
        with self._turn:
            self.pos += len(data)
            self._turn.notify_all()

    def abandon(self) -> None:
        """A claimed slice will never be fed (its read failed): stop waiting; :meth:`finish`
        then hashes the whole file from its start."""
        with self._turn:
            self._abandoned = True
            self._turn.notify_all()

    def finish(self) -> str:
        if self._abandoned:
            self.digest, self.pos = hashlib.sha256(), 0
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.pos)
            while chunk := handle.read(8 * 2**20):
                self.feed(self.pos, memoryview(chunk))
        return self.digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset of its data in a
    safetensors file; ``None`` for tensors held by a torch pickle."""

    name: str
    dtype: torch.dtype
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


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and checks a safetensors header without reading any tensor data.

    Raises:
        ValueError: the file is truncated, padded, or its header is malformed (the message
            names the file and the tensor).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes is too short for a safetensors file "
                             "(truncated?); re-download or re-save it")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER_BYTES or 8 + hlen > size:
            raise ValueError(f"{path}: header claims {hlen} bytes but the file has {size} "
                             "(truncated or not safetensors); re-download or re-save it")
        try:
            header = json.loads(handle.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({exc}); "
                             "re-download or re-save it") from exc
    header.pop("__metadata__", None)
    tensors = {name: _tensor_info(path, name, entry, 8 + hlen) for name, entry in header.items()}
    _check_coverage(path, tensors, 8 + hlen, size)
    return tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: tensor {name}: unreadable header entry {entry!r} "
                         f"(dtypes known: {sorted(SAFETENSORS_DTYPES)}); re-save the file") from exc
    info = TensorInfo(name, dtype, shape, path, data_start + begin)
    if end - begin != info.nbytes:
        raise ValueError(f"{path}: tensor {name}: data_offsets span {end - begin} bytes but "
                         f"{entry['dtype']}{list(shape)} needs {info.nbytes}; re-save the file")
    return info


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    end = data_start + max((t.offset - data_start + t.nbytes for t in tensors.values()), default=0)
    if end > size:
        last = max(tensors.values(), key=lambda t: t.offset + t.nbytes)
        raise ValueError(f"{path}: truncated: tensor {last.name} ends at byte {end} but the file "
                         f"has {size} bytes; re-download or re-save it")
    if end < size:
        raise ValueError(f"{path}: {size - end} bytes after the last tensor's data "
                         "(not a valid safetensors file); re-download or re-save it")


# Meta (consolidated.*.pth / torchtune's Meta output) names -> Hugging Face names.
_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
}


def meta_to_hf_name(name: str, *, source: Path) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    key = f"layers.{{}}.{match.group(2)}" if match else name
    if key not in _META_TO_HF:
        raise ValueError(f"{source}: tensor {name} is not a Llama tensor in Meta's naming "
                         f"(known: {sorted(_META_TO_HF)})")
    return _META_TO_HF[key].format(match.group(1)) if match else _META_TO_HF[key]


def permute_meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (rotary pairs interleaved) -> HF's (halves), as torchtune's tune_to_hf."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


class Checkpoint:
    """An opened checkpoint directory: tensor names (HF naming), dtypes, shapes, and slices.

    Use :func:`open_checkpoint` to make one and ``close()`` (or ``with``) when done.

    Attributes:
        path (Path): the directory.
        format (CheckpointFormat): ``safetensors``, ``torch-hf`` or ``torch-meta``.
        files (list[Path]): weight files, in order.
        tensors (dict[str, TensorInfo]): every tensor, HF names, in file then offset order.
        config (dict | None): ``config.json`` when present.
        params (dict | None): Meta's ``params.json`` when present.
    """

    def __init__(self, path: Path, fmt: CheckpointFormat, files: list[Path],
                 tensors: dict[str, TensorInfo], *, config: dict | None, params: dict | None,
                 loaded: dict[str, torch.Tensor] | None = None) -> None:
        self.path, self.format, self.files, self.tensors = path, fmt, files, tensors
        self.config, self.params = config, params
        self._loaded = loaded or {}
        self._fds: dict[Path, int] = {}
        self._current: tuple[str, torch.Tensor] | None = None
        self._lock = threading.Lock()  # read_slice is called from several threads

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._loaded.clear()
        self._current = None

    def read_slice(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor, in its stored dtype.

        For safetensors the bytes are read into ``buffer`` (a uint8 tensor of at least
        ``count * itemsize`` bytes) and a view of it is returned; for pickles a view of the
        memory-mapped tensor is returned. Either way the result is valid until the next call.
        """
        info = self.tensors[name]
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"{self.path}: tensor {name}: slice [{start}, {start + count}) "
                             f"is outside its {info.numel} elements")
        if info.offset is None:
            return self._pickled(name).view(-1)[start:start + count]
        nbytes = count * info.dtype.itemsize
        if buffer.dtype != torch.uint8 or buffer.numel() < nbytes:
            raise ValueError(f"read buffer must be uint8 with at least {nbytes} bytes")
        view = buffer.numpy()[:nbytes].data
        fd = self._fd(info.file)
        done, pos = 0, info.offset + start * info.dtype.itemsize
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise ValueError(f"{info.file}: tensor {name}: file ended early "
                                 "(truncated while reading?); re-download or re-save it")
            done += n
        return buffer[:nbytes].view(info.dtype)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, shaped, as a new tensor (for small tensors and tests)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_slice(name, 0, info.numel, buf).clone().view(info.shape)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _pickled(self, name: str) -> torch.Tensor:
        """The tensor in HF layout; only the current one is kept (q/k rows re-ordered once)."""
        with self._lock:
            if self._current is None or self._current[0] != name:
                tensor = self._loaded[name]
                if self.format == "torch-meta" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    p = self.params
                    heads = p["n_heads"] if "q_proj" in name else p.get("n_kv_heads", p["n_heads"])
                    tensor = permute_meta_to_hf(tensor, heads)
                self._current = (name, tensor.contiguous())
            return self._current[1]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or re-download it") from exc


def open_checkpoint(path: Path) -> Checkpoint:
    """Opens a checkpoint directory in any layout listed in the module docstring.

    Only headers are read (safetensors) or the pickles memory-mapped (torch); tensor data is
    read later, a slice at a time, by :meth:`Checkpoint.read_slice`.

    Raises:
        FileNotFoundError: ``path`` is missing or holds no weights in a known layout (the
            message lists the layouts and, for a torchtune output dir, its ``epoch_N`` dirs).
        ValueError: an index names a missing or inconsistent file, a safetensors file is
            truncated, a pickle holds something other than tensors.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file; pass the directory that holds it" if path.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}")
    config = _read_json(path / "config.json")
    params = _read_json(path / "params.json")
    if (path / INDEX_NAME).is_file():
        files, tensors = _open_safetensors_index(path / INDEX_NAME)
    elif (path / SINGLE_NAME).is_file():
        files, tensors = [path / SINGLE_NAME], read_safetensors_header(path / SINGLE_NAME)
    else:
        pickles = _find_pickles(path)
        if pickles is None:
            safetensors = [p for p in sorted(path.glob("*.safetensors")) if not p.name.startswith("adapter_")]
            if len(safetensors) == 1:
                files, tensors = safetensors, read_safetensors_header(safetensors[0])
            else:
                raise FileNotFoundError(_no_weights_message(path, safetensors))
        else:
            return _open_pickles(path, pickles, config=config, params=params)
    return Checkpoint(path, "safetensors", files, tensors, config=config, params=params)


def _open_safetensors_index(index_path: Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' of tensor -> file; re-download or re-save it")
    files = sorted({index_path.parent / f for f in weight_map.values()})
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index_path} lists {file.name}, which is missing; "
                                    "re-download the checkpoint")
        header = read_safetensors_header(file)
        for name in sorted(header, key=lambda n: header[n].offset):
            if weight_map.get(name) != file.name:
                raise ValueError(f"{file}: holds tensor {name} but {index_path.name} maps it to "
                                 f"{weight_map.get(name)!r}; the index is stale: re-save the checkpoint")
            tensors[name] = header[name]
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index_path}: tensor {missing[0]} is mapped to {weight_map[missing[0]]} "
                         f"but that file does not hold it ({len(missing)} such); re-save the checkpoint")
    return files, tensors


def _find_pickles(path: Path) -> list[Path] | None:
    if (path / BIN_INDEX_NAME).is_file():
        index = _read_json(path / BIN_INDEX_NAME)
        return sorted({path / f for f in index.get("weight_map", {}).values()})
    for pattern in (BIN_SINGLE_NAME, "consolidated.*.pth", "model-*-of-*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    return None


def _no_weights_message(path: Path, safetensors: list[Path]) -> str:
    if len(safetensors) > 1:
        return (f"{path} holds {len(safetensors)} .safetensors files but no {INDEX_NAME} "
                "saying which tensor is where; restore the index file")
    epochs = sorted((p.name for p in path.glob("epoch_*") if p.is_dir()),
                    key=lambda n: int(n.split("_")[1]) if n.split("_")[1].isdigit() else -1)
    if epochs:
        return (f"{path} is a torchtune output dir; pass one of its epochs, e.g. "
                f"{path / epochs[-1]} (found: {', '.join(epochs)})")
    if (path / "original").is_dir():
        return f"{path} holds no weights at top level; pass {path / 'original'} for Meta's .pth"
    return (f"no weights in {path}: expected {SINGLE_NAME}, {INDEX_NAME} + shards, "
            f"{BIN_SINGLE_NAME}, consolidated.00.pth or torchtune's model-00001-of-0000N.bin")


def _open_pickles(path: Path, files: list[Path], *, config: dict | None, params: dict | None) -> Checkpoint:
    if len(files) > 1 and files[0].name.startswith("consolidated."):
        raise ValueError(f"{path} holds {len(files)} model-parallel consolidated.*.pth shards; "
                         "only single-file consolidated.00.pth (8B) is supported: use the HF "
                         "safetensors release of this model instead")
    loaded: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in _load_pickle(file).items():
            loaded[name] = tensor
            tensors[name] = TensorInfo(name, tensor.dtype, tuple(tensor.shape), file)
    meta = any(not n.startswith(("model.", "lm_head.")) for n in loaded)
    if not meta:
        return Checkpoint(path, "torch-hf", files, tensors, config=config, params=params, loaded=loaded)
    if params is None:
        raise FileNotFoundError(f"{path}: Meta-format weights need params.json beside them "
                                "(n_heads/n_kv_heads to reorder q/k rows); copy it from the release")
    renamed = {meta_to_hf_name(n, source=files[0]): n for n in loaded if n != "rope.freqs"}
    loaded = {hf: loaded[m] for hf, m in renamed.items()}
    tensors = {hf: TensorInfo(hf, tensors[m].dtype, tensors[m].shape, tensors[m].file) for hf, m in renamed.items()}
    return Checkpoint(path, "torch-meta", files, tensors, config=config, params=params, loaded=loaded)


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for bad or unsafe pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{file}: cannot load as a weights-only torch checkpoint ({first}); "
                         "re-save it with torch.save(state_dict) or convert it to safetensors") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: expected a flat dict of tensor name -> tensor, got "
                         f"{type(obj).__name__}; save the model's state_dict() itself")
    return obj
