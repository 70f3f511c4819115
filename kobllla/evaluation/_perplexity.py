"""Perplexity of held-out Korean and English text: a cheap sign that stage 1 changed the model.

Each document is scored on its own, every token after the first exactly once (the first token
is scored from BOS when the tokenizer adds one), in windows of at most ``max_length`` tokens
that advance by ``stride`` scored tokens; ``stride = max_length - 1`` (the default) scores like
lm_eval's ``loglikelihood_rolling`` (disjoint windows), a smaller stride gives later windows
more context at ``max_length / stride`` times the cost.

Reported per language: token perplexity (same tokenizer across stages, so comparable between
them) and bits per UTF-8 byte (comparable across tokenizers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kobllla.jsonl import iter_jsonl

HELDOUT_VERSION = "kobllla-heldout/1"  # bump when the scoring above changes


def read_heldout(source: Path | list[str]) -> list[str]:
    """Documents from a ``.txt`` file (blank-line separated), a ``.jsonl`` file (``text`` field) or a list.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, a bad row, or no documents.
    """
    if isinstance(source, list):
        docs = [d for d in source if isinstance(d, str) and d.strip()]
        where = "the given list"
    else:
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(f"held-out text {path} is a directory; pass a .txt or .jsonl file")
        if not path.is_file():
            raise FileNotFoundError(f"held-out text {path} does not exist")
        where = str(path)
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not text; CRLF is read as \n
            docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        elif path.suffix == ".jsonl":
            docs = _read_jsonl_texts(path)
        else:
            raise ValueError(f"held-out text {path}: "
                             "use .txt (documents split by blank lines) or .jsonl (field 'text')")
    if not docs:
        raise ValueError(f"held-out text {where} has no documents")
    return docs


def _read_jsonl_texts(path: Path) -> list[str]:
    docs = []
    for row_no, row in iter_jsonl(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path} line {row_no}: field 'text' must be a non-empty string")
        docs.append(row["text"])
    return docs


@torch.inference_mode()
def document_nll(model: torch.nn.Module, ids: list[int], *, max_length: int, stride: int) -> tuple[float, int]:
    """Sum of negative log-likelihoods (nats) of ``ids[1:]`` and how many tokens that is."""
    device = next(model.parameters()).device
    total, n_scored, start = 0.0, 0, 1
    while start < len(ids):
        end = min(start + stride, len(ids))
        first = max(0, end - max_length)  # end - first <= max_length, and first <= start - 1
        window = torch.tensor([ids[first:end]], device=device)
        logits = model(window).logits[0, start - 1 - first : end - 1 - first].float()
        targets = window[0, start - first : end - first]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        n_scored += end - start
        start = end
    return total, n_scored


def perplexity_of_texts(
    model: torch.nn.Module,
    tokenizer,
    docs: list[str],
    *,
    max_length: int,
    stride: int | None = None,
) -> dict:
    """Token perplexity and bits per byte of ``docs`` under an HF causal LM and its tokenizer.

    Returns:
        dict: ``token_ppl``, ``bits_per_byte``, ``nll`` (nats), ``tokens``, ``bytes``, ``documents``.
    """
    stride = stride or max_length - 1
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")
    nll, tokens = 0.0, 0
    for doc in docs:
        doc_nll, doc_tokens = document_nll(model, tokenizer(doc)["input_ids"], max_length=max_length, stride=stride)
        nll, tokens = nll + doc_nll, tokens + doc_tokens
    if tokens == 0:
        raise ValueError("the held-out documents tokenize to single tokens; nothing to score")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "token_ppl": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "nll": nll,
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": len(docs),
    }


def perplexity(
    model: str | Path,
    heldout: dict[str, Path | list[str]],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int = 2048,
    stride: int | None = None,
) -> dict[str, dict]:
    """Loads a checkpoint with transformers and scores each language's held-out text.

    Args:
        model: HF checkpoint dir or hub id.
        heldout: language -> ``.txt``/``.jsonl`` file or list of documents, e.g.
            ``{"ko": "heldout/ko.txt", "en": "heldout/en.txt"}``.
        device: ``cpu`` or ``cuda``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_length: window length in tokens (at most the model's context).
        stride: scored tokens per window (default ``max_length - 1``).

    Returns:
        dict[str, dict]: per language, the dict of :func:`perplexity_of_texts`.

    Raises:
        FileNotFoundError: checkpoint or text file missing.
        ValueError: bad text file, dtype or stride.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kobllla.evaluation._checkpoint import resolve_model

    ref = resolve_model(model)
    docs = {lang: read_heldout(src) for lang, src in heldout.items()}
    torch_dtype = _torch_dtype(dtype)
    lm = AutoModelForCausalLM.from_pretrained(ref.spec, dtype=torch_dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(ref.spec)
    return {lang: perplexity_of_texts(lm, tok, d, max_length=max_length, stride=stride) for lang, d in docs.items()}


def _torch_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]
