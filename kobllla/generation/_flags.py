"""The generation flags every CLI shares (``tools.generate``, ``tools.chat``, ``eval.samples``), declared once."""

from __future__ import annotations

import argparse
from pathlib import Path

from kobllla.generation._generate import DTYPES, GenerationOptions


def add_generation_flags(parser: argparse.ArgumentParser, *, batch_size: bool = True, base: bool = True) -> None:
    """Adds ``--max-new-tokens --temperature --top-p --seed --device --dtype`` (+ ``--batch-size``, ``--base``)."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samplers (default 0)")
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=8, help="rows per left-padded batch (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: float32 on CPU, the checkpoint's dtype on CUDA")
    if base:
        parser.add_argument("--base", type=Path, help="the base model of an adapter-only torchtune epoch_N/")


def options_from_args(args: argparse.Namespace, **override) -> GenerationOptions:
    """``GenerationOptions`` from the flags of :func:`add_generation_flags` (``override`` wins)."""
    fields = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed, "device": args.device, "dtype": args.dtype,
              "batch_size": getattr(args, "batch_size", 1)}
    fields.update(override)
    return GenerationOptions(**fields)
