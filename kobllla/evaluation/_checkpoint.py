"""What a model argument names (local HF dir or hub id), checked before lm_eval loads it."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


@dataclass(frozen=True)
class ModelRef:
    """A checked model argument.

    Attributes:
        spec: what lm_eval receives as ``pretrained`` (absolute dir, or the hub id).
        local: True for a directory on disk.
        fingerprint: ``sha256-sampled:<hex>`` / ``sha256:<hex>`` over config and weight files
            (local, see :func:`fingerprint_files`), or ``hub:<id>``;
            empty when resolved with ``fingerprint=False`` (compute it later from ``files``).
        files: the config and weight files of a local checkpoint.
    """

    spec: str
    local: bool
    fingerprint: str
    files: tuple[Path, ...] = ()


def _looks_local(spec: str) -> bool:
    # A path that starts like one, or whose parent exists here ("runs/stage1" with runs/ present),
    # is a local path; only a bare "org/name" that matches nothing on disk is a hub id.
    if spec.startswith(("/", ".", "~")) or Path(spec).exists():
        return True
    parent = Path(spec).expanduser().parent
    return not _HUB_ID.match(spec) or (str(parent) not in ("", ".") and parent.exists())


def check_checkpoint_dir(path: Path) -> list[Path]:
    """Checks that ``path`` is a loadable HF checkpoint dir; returns its config + weight files.

    Raises:
        FileNotFoundError: no such dir, no ``config.json``, no weights or no tokenizer files.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint dir {path} does not exist; pass a Hugging Face model dir or a hub id")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; "
                                "pass the HF-format output dir of a stage (e.g. its epoch_N/)")
    weights = sorted({p for g in _WEIGHT_GLOBS for p in path.glob(g)})
    if not weights:
        raise FileNotFoundError(f"{path} has no weights (*.safetensors or *.bin); was the checkpoint fully written?")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    if not has_tokenizer or not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer files (need tokenizer.json and tokenizer_config.json); "
            f"copy them from the base model, e.g. cp BASE_DIR/tokenizer*.json {path}/"
        )
    return [path / "config.json", *weights]


_BLOCK = 64 << 20
_SAMPLE = 1 << 20
FingerprintMode = Literal["sampled", "full"]


def _block_sha256(job: tuple[Path, int, int]) -> bytes:
    path, offset, size = job
    with open(path, "rb") as handle:
        handle.seek(offset)
        return hashlib.sha256(handle.read(size)).digest()  # hashlib releases the GIL


def fingerprint_files(files: list[Path] | tuple[Path, ...], root: Path, *, mode: FingerprintMode = "sampled",
                      workers: int | None = None) -> str:
    """A tree hash over each file's relative name, size and the sha256s of its 64 MiB blocks.

    ``full`` hashes every byte (``sha256:``); on the H100 device 16 GB of 8B weights took ~30 s
    there, longer than loading them. ``sampled`` (``sha256-sampled:``) hashes the first 1 MiB of
    every 64 MiB block and every small file whole (256 MB of 16 GB): any merge, LoRA or chat
    vector rewrites whole matrices, so it still tells stage checkpoints apart, in ~1 s.
    """
    files = sorted(files)
    jobs = []
    for path in files:
        size = path.stat().st_size
        for off in range(0, max(size, 1), _BLOCK):
            length = min(_BLOCK, size - off) if mode == "full" or size <= _BLOCK else min(_SAMPLE, size - off)
            jobs.append((path, off, length))
    with ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_block_sha256, jobs))
    outer = hashlib.sha256()
    for (path, offset, length), digest in zip(jobs, digests, strict=True):
        outer.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0{offset}\0{length}\0".encode() + digest)
    return f"{'sha256' if mode == 'full' else 'sha256-sampled'}:{outer.hexdigest()}"


def resolve_model(spec: str | Path, *, fingerprint: bool = True, mode: FingerprintMode = "sampled") -> ModelRef:
    """Local checkpoint dir (checked and, unless ``fingerprint=False``, hashed) or hub id (passed through).

    Raises:
        FileNotFoundError: a local path that is missing or not a complete HF checkpoint.
    """
    text = str(spec)
    if not _looks_local(text):
        return ModelRef(spec=text, local=False, fingerprint=f"hub:{text}")
    path = Path(text).expanduser().resolve()
    files = tuple(check_checkpoint_dir(path))
    digest = fingerprint_files(files, path, mode=mode) if fingerprint else ""
    return ModelRef(spec=str(path), local=True, fingerprint=digest, files=files)
