"""Reading a checkpoint in any layout a Llama 3 checkpoint comes in (see the package
docstring), one tensor slice at a time, under Hugging Face tensor names.

Safetensors checkpoints are read with numpy and the stdlib only (:meth:`Checkpoint.read_array`);
torch is imported only to load a torch pickle or when a caller asks for torch tensors
(:meth:`Checkpoint.read_slice`, :meth:`Checkpoint.read_tensor`)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kobllla.checkpoint_io.layout import (
    BIN_INDEX_NAME,
    BIN_SINGLE_NAME,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    CheckpointFormat,
    DType,
    TensorInfo,
    as_dtype,
)
from kobllla.checkpoint_io.meta_names import meta_to_hf_name, permute_meta_to_hf
from kobllla.jsonl import read_json

if TYPE_CHECKING:
    import torch


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
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
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

    def read_array(self, name: str, start: int, count: int, buffer: np.ndarray) -> np.ndarray:
        """Elements ``[start, start + count)`` of the flattened tensor as a numpy array of its
        stored bits (:attr:`DType.numpy`: bfloat16 comes as ``uint16``); no torch for safetensors.

        For safetensors the bytes are read into ``buffer`` (a uint8 array of at least
        ``count * itemsize`` bytes) and a view of it is returned; for pickles a view of the
        memory-mapped tensor is returned. Either way the result is valid until the next call.
        """
        info = self._checked(name, start, count)
        if info.offset is None:
            part = self._pickled(name).view(-1)[start:start + count]
            return part.view(_torch().uint8).numpy().view(info.dtype.numpy)
        nbytes = count * info.dtype.itemsize
        if buffer.dtype != np.uint8 or buffer.size < nbytes:
            raise ValueError(f"read buffer must be uint8 with at least {nbytes} bytes")
        view = buffer[:nbytes].data
        fd = self._fd(info.file)
        done, pos = 0, info.offset + start * info.dtype.itemsize
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise ValueError(f"{info.file}: tensor {name}: file ended early "
                                 "(truncated while reading?); re-download or re-save it")
            done += n
        return buffer[:nbytes].view(info.dtype.numpy)

    def read_slice(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """:meth:`read_array` for torch callers: ``buffer`` is a uint8 tensor and the result a
        tensor of the stored dtype (a view of ``buffer``, or of the memory-mapped pickle)."""
        info = self._checked(name, start, count)
        if info.offset is None:
            return self._pickled(name).view(-1)[start:start + count]
        torch = _torch()
        if buffer.dtype != torch.uint8:
            raise ValueError(f"read buffer must be uint8 with at least {count * info.dtype.itemsize} bytes")
        self.read_array(name, start, count, buffer.numpy())
        return buffer[:count * info.dtype.itemsize].view(info.dtype.torch)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, shaped, as a new torch tensor (for small tensors and tests)."""
        info = self.tensors[name]
        buf = _torch().empty(info.nbytes, dtype=_torch().uint8)
        return self.read_slice(name, 0, info.numel, buf).clone().view(info.shape)

    def _checked(self, name: str, start: int, count: int) -> TensorInfo:
        info = self.tensors[name]
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"{self.path}: tensor {name}: slice [{start}, {start + count}) "
                             f"is outside its {info.numel} elements")
        return info

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
    config = read_json(path / "config.json")
    params = read_json(path / "params.json")
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
    index = read_json(index_path)
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
        index = read_json(path / BIN_INDEX_NAME)
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
    if any((path / "original").glob("consolidated.*.pth")):
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
            tensors[name] = TensorInfo(name, _pickle_dtype(tensor), tuple(tensor.shape), file)
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


def _pickle_dtype(tensor: torch.Tensor) -> DType:
    """The tensor's :class:`DType`; one safetensors cannot hold (float8, complex) gets an empty
    code, so that the checks can name it and refuse it."""
    try:
        return as_dtype(tensor.dtype)
    except ValueError:
        size = tensor.element_size()
        return DType(str(tensor.dtype).removeprefix("torch."), "", size, f"V{size}")


def _torch():
    """torch, imported on first use: only pickles and torch callers need it."""
    import torch

    return torch


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    torch = _torch()
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
