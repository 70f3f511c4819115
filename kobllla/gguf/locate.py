"""Where llama.cpp's converter and quantizer come from.

kobllla runs llama.cpp's own code, never a re-implementation: ``convert_hf_to_gguf.py`` (with the
``conversion/`` package and the ``gguf-py/`` it ships) and its quantizer. In order of precedence:

1. ``--llama-cpp DIR`` or ``LLAMA_CPP_DIR=DIR``: a user's llama.cpp clone. Its ``llama-quantize``
   binary is used when built (``build/bin/llama-quantize``), else llama-cpp-python's
   ``llama_model_quantize``.
2. A kobllla-managed copy in ``~/.cache/kobllla/llama.cpp-<version>/`` (``$KOBLLLA_CACHE_DIR`` or
   ``$XDG_CACHE_HOME/kobllla`` move it): the converter files extracted from the llama-cpp-python
   sdist of the installed version, which vendors the whole llama.cpp tree, so converter and
   quantizer are the same llama.cpp commit. ``make llama-cpp`` (or ``python -m tools.export_gguf
   --fetch-llama-cpp``) gets it once with ``pip download``; an export fetches it on first use.

Torch-free: this module only finds files and runs pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

# The version pyproject's `gguf` extra pins; the installed llama-cpp-python wins when there is one.
PINNED_LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the vendored tree (the rest of the 76 MB sdist is C++ and test models).
_CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/", "include/llama.h", "LICENSE")
_QUANTIZE_BINARIES = ("build/bin/llama-quantize", "bin/llama-quantize", "llama-quantize")
VERSION_FILE = "kobllla_llama_cpp.json"


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp tree that can convert (and maybe quantize) models."""

    root: Path
    source: str  # "--llama-cpp", "LLAMA_CPP_DIR" or "kobllla cache"
    version: str  # llama.cpp commit (or "unknown" for a clone without git metadata)
    quantize_binary: Path | None

    @property
    def converter(self) -> Path:
        return self.root / CONVERTER

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def describe(self) -> dict:
        info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        info["converter"] = str(self.converter)
        return info


def llama_cpp_python_version() -> str | None:
    """The installed llama-cpp-python's version, or None when it is not installed."""
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def cache_root() -> Path:
    """``$KOBLLLA_CACHE_DIR``, else ``$XDG_CACHE_HOME/kobllla``, else ``~/.cache/kobllla``."""
    if os.environ.get("KOBLLLA_CACHE_DIR"):
        return Path(os.environ["KOBLLLA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kobllla"


def managed_dir(version: str | None = None) -> Path:
    """The kobllla-managed converter copy for a llama-cpp-python version."""
    return cache_root() / f"llama.cpp-{version or llama_cpp_python_version() or PINNED_LLAMA_CPP_PYTHON}"


def how_to_get() -> str:
    """The one sentence a 'missing llama.cpp' error ends with."""
    version = llama_cpp_python_version() or PINNED_LLAMA_CPP_PYTHON
    return (f"run `make llama-cpp` (or `python -m tools.export_gguf --fetch-llama-cpp`), which extracts it from the "
            f"llama-cpp-python {version} sdist into {managed_dir()}, or pass --llama-cpp DIR / set LLAMA_CPP_DIR "
            "to a llama.cpp clone (git clone https://github.com/ggml-org/llama.cpp)")


def _git_commit(root: Path) -> str:
    stamp = root / VERSION_FILE
    if stamp.is_file():
        return json.loads(stamp.read_text(encoding="utf-8"))["llama_cpp_commit"]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _checked(root: Path, source: str) -> LlamaCpp:
    missing = [p for p in (CONVERTER, "gguf-py/gguf/__init__.py") if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} {root} has no {missing[0]}; {how_to_get()}")
    binary = next((root / b for b in _QUANTIZE_BINARIES if os.access(root / b, os.X_OK)), None)
    return LlamaCpp(root=root, source=source, version=_git_commit(root), quantize_binary=binary)


def find_llama_cpp(explicit: Path | None = None, *, fetch: bool = False) -> LlamaCpp:
    """The llama.cpp tree to use: ``explicit``, ``LLAMA_CPP_DIR``, else the managed copy.

    Args:
        explicit (Path | None): ``--llama-cpp DIR``.
        fetch (bool): get the managed copy with ``pip download`` when it is missing.

    Raises:
        FileNotFoundError: one line saying how to get llama.cpp.
    """
    if explicit is not None:
        return _checked(Path(explicit), "--llama-cpp")
    if os.environ.get("LLAMA_CPP_DIR"):
        return _checked(Path(os.environ["LLAMA_CPP_DIR"]), "LLAMA_CPP_DIR")
    root = managed_dir()
    if not (root / VERSION_FILE).is_file():
        if not fetch:
            raise FileNotFoundError(f"llama.cpp's converter is not installed; {how_to_get()}")
        install_llama_cpp()
    return _checked(root, "kobllla cache")


def download_sdist(dest: Path, version: str) -> Path:
    """``pip download`` of the llama-cpp-python sdist (pip's cache answers after the first time)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise OSError(f"`{' '.join(cmd[2:])}` failed ({last}); download llama_cpp_python-{version}.tar.gz "
                      "elsewhere and pass --sdist FILE, or pass --llama-cpp DIR")
    return found[0]


def install_llama_cpp(*, sdist: Path | None = None, version: str | None = None) -> Path:
    """Extracts the converter parts of a llama-cpp-python sdist into :func:`managed_dir` (atomically).

    Args:
        sdist (Path | None): a ``llama_cpp_python-X.tar.gz``; None downloads the installed version's
            (nothing is done when that version's copy is already there).
        version (str | None): the version to fetch (default: installed, else the pinned one).

    Returns:
        Path: the managed directory.
    """
    version = version or llama_cpp_python_version() or PINNED_LLAMA_CPP_PYTHON
    final = managed_dir(version)
    if sdist is None and (final / VERSION_FILE).is_file():
        return final  # already there (a given --sdist is extracted again)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.tmp-") as tmp:
        sdist = Path(sdist) if sdist is not None else download_sdist(Path(tmp), version)
        out = Path(tmp) / "tree"
        commit = _extract_converter(sdist, out)
        (out / VERSION_FILE).write_text(json.dumps({
            "llama_cpp_python": version, "llama_cpp_commit": commit, "sdist": sdist.name,
        }, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    return final


def _extract_converter(sdist: Path, out: Path) -> str:
    """Extracts ``vendor/llama.cpp/{converter parts}``; returns the vendored llama.cpp commit."""
    if not sdist.is_file():
        raise FileNotFoundError(f"--sdist {sdist} does not exist")
    try:
        tar = tarfile.open(sdist, "r:gz")
    except tarfile.TarError as exc:
        raise ValueError(f"--sdist {sdist}: not a .tar.gz ({exc})") from None
    with tar:
        names = tar.getnames()
        top = names[0].split("/")[0] if names else ""
        vendor = f"{top}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(vendor)
                   and m.name[len(vendor):].startswith(_CONVERTER_PARTS)]
        if not any(m.name == vendor + CONVERTER for m in members):
            raise ValueError(f"--sdist {sdist} has no {vendor}{CONVERTER}; pass a llama-cpp-python sdist")
        for m in members:
            m.name = m.name[len(vendor):]
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extract(m, out, **kwargs)
        head = f"{top}/.git/modules/vendor/llama.cpp/HEAD"
        commit = tar.extractfile(head).read().decode().strip() if head in names else "unknown"
    return commit
