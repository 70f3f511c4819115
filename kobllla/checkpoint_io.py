"""Hugging Face checkpoint output: sharded safetensors written tensor by tensor, atomically.

Outputs are built in a hidden temporary sibling (``.NAME.tmp-PID``) and renamed into place
only when complete, so a killed job never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard file name, e.g. ``model-00001-of-00004.safetensors``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Memory stays bounded by one shard's buffer: tensors are held until the shard is full,
    then written and released. ``close()`` names the shards ``model-0000i-of-0000N`` (or
    ``model.safetensors`` when one shard suffices) and writes the index.

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


def write_json(path: Path, obj: object) -> None:
    """Writes JSON through a temporary file and a rename."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``out_dir``; renames it to ``out_dir`` on success.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pick another output or pass --overwrite to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
