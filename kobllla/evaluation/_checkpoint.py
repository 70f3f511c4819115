"""What a model argument names (local HF dir or hub id), checked before lm_eval loads it."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


@dataclass(frozen=True)
class ModelRef:
    """A checked model argument.

    Attributes:
        spec: what lm_eval receives as ``pretrained`` (absolute dir, or the hub id).
        local: True for a directory on disk.
        fingerprint: ``sha256:<hex>`` over config and weight files (local), or ``hub:<id>``;
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
        raise FileNotFoundError(f"{path} has no config.json; pass the HF-format output dir of a stage (e.g. its epoch_N/)")
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


def _file_sha256(path: Path, chunk_bytes: int = 8 << 20) -> str:
    inner = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            inner.update(chunk)  # releases the GIL: shards hash in parallel threads
    return inner.hexdigest()


def fingerprint_files(files: list[Path] | tuple[Path, ...], root: Path, workers: int = 8) -> str:
    """``sha256:<hex>`` over each file's relative name and full sha256 (shards hashed in parallel)."""
    files = sorted(files)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        digests = list(pool.map(_file_sha256, files))
    outer = hashlib.sha256()
    for path, digest in zip(files, digests):
        outer.update(f"{path.relative_to(root)}\0{digest}\n".encode())
    return f"sha256:{outer.hexdigest()}"


def resolve_model(spec: str | Path, *, fingerprint: bool = True) -> ModelRef:
    """Local checkpoint dir (checked and, unless ``fingerprint=False``, hashed) or hub id (passed through).

    Raises:
        FileNotFoundError: a local path that is missing or not a complete HF checkpoint.
    """
    text = str(spec)
    if not _looks_local(text):
        return ModelRef(spec=text, local=False, fingerprint=f"hub:{text}")
    path = Path(text).expanduser().resolve()
    files = tuple(check_checkpoint_dir(path))
    digest = fingerprint_files(files, path) if fingerprint else ""
    return ModelRef(spec=str(path), local=True, fingerprint=digest, files=files)
