"""llama.cpp (through llama-cpp-python) beside transformers on the same token ids.

- :func:`llama_cpp_tokenize`: llama.cpp's tokenizer on a GGUF's vocabulary.
- :func:`llama_cpp_logits` / :func:`hf_logits`: next-token logits for one window of ids.
- :class:`NextTokenStats`: negative log-likelihood, KL divergence from a reference and top-1
  agreement, accumulated over windows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def open_llama(gguf_path: Path, *, n_ctx: int = 256, threads: int | None = None,
               vocab_only: bool = False) -> Iterator[object]:
    """A ``llama_cpp.Llama`` over the file, closed on exit (its ``__del__`` is noisy at interpreter exit)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=not vocab_only,
                vocab_only=vocab_only, n_threads=threads or os.cpu_count() or 1, verbose=False, seed=0)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_tokenize(llm, text: str, *, add_bos: bool = True) -> list[int]:
    """llama.cpp's tokenization of ``text`` (special tokens in the text are not parsed)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """``[len(ids), vocab]`` float32 logits of llama.cpp for one window (fresh context)."""
    if len(ids) > llm.n_ctx():
        raise ValueError(f"window of {len(ids)} tokens is longer than the context ({llm.n_ctx()})")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """``[len(ids), vocab]`` float32 logits of a transformers model for one window."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.tensor([ids], device=device)).logits[0]
    return out.float().cpu().numpy()


@dataclass
class NextTokenStats:
    """Sums over scored positions: NLL of the targets, KL(reference || model), argmax agreement."""

    nll: float = 0.0
    kl: float = 0.0
    top1_same: int = 0
    n: int = 0

    def add(self, logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None) -> None:
        """``logits``/``reference``: ``[n, vocab]`` at the positions that predict ``targets`` ``[n]``.

        float64 throughout: the KL of an f32 GGUF from the float32 model is ~1e-9 nats, below float32's noise.
        """
        import torch

        lp = torch.log_softmax(torch.from_numpy(np.asarray(logits)).double(), dim=-1)
        tgt = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        self.nll -= float(lp[torch.arange(len(tgt)), tgt].sum())
        self.n += len(tgt)
        if reference is not None:
            ref = torch.log_softmax(torch.from_numpy(np.asarray(reference)).double(), dim=-1)
            self.kl += float((ref.exp() * (ref - lp)).sum())
            self.top1_same += int((lp.argmax(-1) == ref.argmax(-1)).sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.n)) if self.n else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n if self.n else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.top1_same / self.n if self.n else float("nan")
