"""Stage-1 training throughput at the Llama-3-8B shape: the real torchtune recipe vs transformers + peft.

One process (this script) prepares everything and runs both trainers, one after the other, each
in its own process on the same GPU, on the same packs of Korean text:

1. a random-init checkpoint of the exact Meta-Llama-3-8B shape in HF format (bf16, 4 shards,
   weights drawn on the GPU: ~15 s instead of ~70 s for ``tools.make_tiny_model``);
2. a CSV of Korean documents with a Wikipedia-like length mix (konlpy's Constitution and bills,
   cut into documents whose lengths are log-normal, median ~1,200 characters);
3. ours: ``tune run lora_finetune_single_device`` with configs/llama3_8b/stage1_kowiki_lora_single_device.yaml
   plus overrides (seq 4096, batch 1, no accumulation, compile, no activation checkpointing,
   adapter-only save), step times and peak memory read from its metric log;
4. the peer: transformers + peft on the same checkpoint, same packs (document masking from
   ``position_ids``, SDPA), same LoRA targets (q, v, r 8, alpha 16), AdamW, bf16, eager.

``--variants stock,fused,fp8`` runs ours once per component set instead (``VARIANTS``: torchtune's
model and loss; kobllla's fused output projection + loss; float8 base matmuls; ``inline``/``fast``/
``fp8fast``/``fp8all`` with kobllla.models' in-graph flex attention, fused q/k/v and gate/up and a
float8 output), same packs, same seed, and compares each run's per-step losses with the first's
(``loss_agreement``); ``--loss-micro`` also times the output projection + loss alone (torchtune's,
kobllla's, Liger's). ``--grad-accum N`` accumulates N packs per optimizer step (the recipe syncs
with the host once per optimizer step; the shipped config accumulates 128).

It prints, and writes to ``OUT/results.json`` and ``OUT/summary.md``: useful (trained, non-padding)
tokens/s/GPU in steady state, MFU, peak GiB, start-up time to the first step, padding share and
the no-token-dropped check of the packed data; on a GPU also each run's SM clock, power and
power-capped share over its busy seconds (``bench/gpu_clocks.py``: two runs compare only at
comparable clocks).

GPU (one command, wheels carried in .whl/, see bench/train_gpu.sh)::

    bash bench/train_gpu.sh OUT_DIR

CPU dry run (tiny model, a few steps; peft from a separate --target dir, never in .venv)::

    pip install --no-deps --target /tmp/peft_site peft
    .venv/bin/python bench/train_gpu.py --preset tiny --seq-len 256 --steps 4 --warmup 1 \\
        --peer-steps 3 --peer-warmup 1 --work /tmp/kb-train --out /tmp/kb-train/out --peer-pythonpath /tmp/peft_site

FLOPs per trained position (what MFU counts): ``4 N + 12 L d s``. With the base frozen, the
backward pass computes activation gradients only (2N), not weight gradients, so a LoRA step is
4N per position (forward 2N) plus attention's 12 L d s (QK^T and AV, forward and backward, causal
not discounted). N counts matmul weights only (the input embedding is a lookup): 7.50B at 8B
shape, so 36.5 GFLOP per position at s = 4096, against 989 TFLOP/s bf16 dense (H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "configs" / "llama3_8b" / "stage1_kowiki_lora_single_device.yaml"
# The previous code's shipped config, for the "prev" variants: `git archive REV kobllla configs | tar -x -C .prev`
# (an ignored folder; carry it to the GPU machine); those runs import kobllla from there (python -P).
PREV_DIR = REPO / ".prev"


def is_prev(variant: str) -> bool:
    """A variant that runs the previous code (PREV_DIR) and its own shipped config."""
    return variant.startswith("prev")


IGNORE_INDEX = -100  # torchtune's CROSS_ENTROPY_IGNORE_IDX and transformers' loss default

# bf16 dense tensor-core peak, FLOP/s (NVIDIA datasheets, SXM parts)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# --------------------------------------------------------------------------------------------
# Arithmetic (pure functions, tested in tests/test_bench_train.py)
# --------------------------------------------------------------------------------------------


def matmul_params(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> int:
    """Weights that take part in a matmul per position: attention, MLP, lm_head (not the embedding)."""
    head_dim = hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp) + vocab * hidden


def lora_flops_per_position(*, n_matmul: int, layers: int, hidden: int, seq_len: int) -> int:
    """``4 N + 12 L d s``: frozen-base LoRA step (forward 2N, activation-gradient backward 2N) plus attention."""
    return 4 * n_matmul + 12 * layers * hidden * seq_len


def mfu(*, positions_per_s: float, flops_per_position: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return positions_per_s * flops_per_position / peak_flops


def peak_flops_for(device_name: str, override_tflops: float | None = None) -> float:
    """Peak bf16 FLOP/s for a device name (``NVIDIA H100 80GB HBM3``) or the override."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    raise ValueError(f"no bf16 peak known for device {device_name!r}; "
                     f"pass --peak-tflops (one of {sorted(PEAK_BF16_FLOPS)} is known)")


@dataclass
class PackFigures:
    """What the packs of a run hold: positions, trained targets, padding, starts of pieces."""

    packs: int = 0
    positions: int = 0
    trained: int = 0
    padding: int = 0
    piece_starts: int = 0

    @property
    def padding_share(self) -> float:
        return self.padding / self.positions if self.positions else 0.0

    @property
    def trained_share(self) -> float:
        return self.trained / self.positions if self.positions else 0.0


def count_pack(fig: PackFigures, labels: list[int], seq_lens: list[int], *, real_len: int) -> None:
    """Adds one pack: ``real_len`` tokens of text, the rest (up to ``len(labels)``) padding."""
    fig.packs += 1
    fig.positions += len(labels)
    fig.trained += sum(1 for x in labels if x != IGNORE_INDEX)
    fig.padding += len(labels) - real_len
    fig.piece_starts += len(seq_lens) - (1 if len(labels) > real_len else 0)


def steady_state(steps: list[dict], *, warmup: int, positions_per_step: int) -> dict:
    """Steady-state figures from per-step records ``{step, tokens_per_second_per_gpu, wall_time}``.

    Step k's time is the wall-clock gap between its log line and step k-1's (the recipe logs every
    step and restarts its timer right after logging), so its trained tokens are ``tps * gap``.
    Steps ``<= warmup`` (compilation, allocator warm-up) are left out.
    """
    rows = sorted(steps, key=lambda r: r["step"])
    if len(rows) < warmup + 2:
        raise ValueError(f"need more than warmup + 1 = {warmup + 1} logged steps, got {len(rows)}: raise --steps")
    times, tokens = [], []
    for prev, cur in zip(rows, rows[1:], strict=False):
        if cur["step"] <= warmup:
            continue
        gap = cur["wall_time"] - prev["wall_time"]
        times.append(gap)
        tokens.append(cur["tokens_per_second_per_gpu"] * gap)
    total_t = sum(times)
    return {
        "steps_measured": len(times),
        "seconds": total_t,
        "trained_tokens": sum(tokens),
        "useful_tokens_per_s": sum(tokens) / total_t,
        "positions_per_s": positions_per_step * len(times) / total_t,
        "step_s_median": _median(times),
        "useful_tokens_per_s_median_step": _median([t / g for t, g in zip(tokens, times, strict=True)]),
    }


def gc_by_step(passes: list[list], steps: list[dict], *, warmup: int) -> dict:
    """The collector's passes (``bench/gc_probe.py``'s ``[generation, start, seconds, collected]``) charged to
    the step whose interval (previous log line, this one] they started in; the measured steps' totals.

    ``per_step``: ``{step: [full (gen 2) passes, their seconds, all passes' seconds]}`` for every logged step
    after the first; ``measured``: the same summed over the steps after ``warmup``, with the longest pass.
    """
    rows = sorted(steps, key=lambda r: r["step"])
    per_step: dict[int, list] = {}
    longest = 0.0
    for prev, cur in zip(rows, rows[1:], strict=False):
        mine = [p for p in passes if prev["wall_time"] < p[1] <= cur["wall_time"]]
        full = [p for p in mine if p[0] == 2]
        per_step[cur["step"]] = [len(full), round(sum(p[2] for p in full), 4), round(sum(p[2] for p in mine), 4)]
        if cur["step"] > warmup:
            longest = max([longest, *(p[2] for p in mine)])
    measured = [v for k, v in per_step.items() if k > warmup]
    return {"per_step": per_step,
            "measured": {"full_passes": sum(v[0] for v in measured), "full_s": round(sum(v[1] for v in measured), 4),
                         "all_s": round(sum(v[2] for v in measured), 4), "longest_pass_s": round(longest, 4)}}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


_LOG_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def parse_metric_log(text: str) -> list[dict]:
    """Rows of a :class:`WallClockDiskLogger` file: ``Step N | key:value key:value``."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        m = _LOG_LINE.match(line.strip())
        if not m:
            continue
        row: dict = {"step": int(m.group(1))}
        for item in m.group(2).split():
            key, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"metric log line {number}: {item!r} is not key:value")
            try:
                row[key] = float(value)
            except ValueError as exc:
                raise ValueError(f"metric log line {number}: {key}={value!r} is not a number") from exc
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# The metric logger the recipe is given (importable as bench.train_gpu.WallClockDiskLogger)
# --------------------------------------------------------------------------------------------


def _disk_logger_base():
    from torchtune.training.metric_logging import DiskLogger

    return DiskLogger


class WallClockDiskLogger:
    """torchtune's DiskLogger with a ``wall_time`` on every line and tensors written as numbers.

    Built lazily (``__new__`` returns a DiskLogger subclass instance) so that importing this file
    does not import torchtune: the peer process runs without torchtune/torchao on its path.
    """

    def __new__(cls, log_dir: str, filename: str | None = None, **kwargs: object):
        base = _disk_logger_base()

        class _Logger(base):
            def log_dict(self, payload, step):  # noqa: ANN001 - torchtune's signature
                clean = {k: float(v) for k, v in payload.items()}
                clean["wall_time"] = time.time()
                super().log_dict(clean, step)

        logger = _Logger(log_dir, filename)
        logger.log("logger_created_wall_time", time.time(), 0)
        return logger


# --------------------------------------------------------------------------------------------
# Inputs: checkpoint and Korean documents
# --------------------------------------------------------------------------------------------


def write_random_checkpoint(out_dir: Path, *, preset: str, device: str, seed: int, flavor: str = "base") -> dict:
    """HF-format Llama 3 checkpoint (bf16, <= 5 GiB shards), weights N(0, 0.02) drawn on ``device``."""
    import torch

    from kobllla.checkpoint_io import ShardedSafetensorsWriter, atomic_output_dir, write_json
    from kobllla.tiny_model import (
        BOS_ID,
        END_OF_TEXT_ID,
        EOT_ID,
        PRESETS,
        hf_config,
        hf_tensor_shapes,
        write_tokenizer_files,
    )

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    gen = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=5 * 2**30)
        for name, size in hf_tensor_shapes(shape):
            if name.endswith("norm.weight"):
                t = torch.ones(size, dtype=torch.bfloat16)
            else:
                t = torch.randn(size, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
            writer.add(name, t)
        files = [p.name for p in writer.close()]
        write_json(tmp / "config.json", hf_config(shape, flavor=flavor, dtype="bfloat16"))
        write_json(tmp / "generation_config.json", {  # as kobllla.tiny_model.make_model writes it
            "bos_token_id": BOS_ID,
            "eos_token_id": [END_OF_TEXT_ID, EOT_ID] if flavor == "instruct" else END_OF_TEXT_ID,
            "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": shape.max_seq_len,
        })
        write_tokenizer_files(tmp, flavor=flavor, max_len=shape.max_seq_len)
        write_json(tmp / "kobllla_model.json", {
            "made_by": "bench/train_gpu.py write_random_checkpoint", "preset": preset, "seed": seed,
            "dtype": "bfloat16", "shape": asdict(shape), "num_params": shape.num_params(),
        })
    if device == "cuda":
        torch.cuda.empty_cache()  # the trainers run in other processes: leave them the memory
    return {"files": files, "seconds": time.perf_counter() - start, "num_params": shape.num_params()}


def korean_length_mix_csv(path: Path, *, target_chars: int, seed: int, median_chars: int = 1200) -> dict:
    """A ``text`` CSV of Korean documents whose lengths follow a log-normal mix (Wikipedia-like).

    The text is konlpy's Korean corpus (Constitution + 10 bills, ~140 KB) laid end to end and
    read cyclically from random offsets; lengths are ``median_chars * exp(N(0, 1))`` clipped to
    [80, 40,000] characters, so most documents are shorter than a 4,096-token pack and a few
    span several packs, as Korean Wikipedia's articles do.
    """
    import random

    from kobllla.corpora import korean_documents

    source = "\n\n".join(d.text for d in korean_documents())
    rng = random.Random(seed)
    lengths, total = [], 0
    while total < target_chars:
        n = int(min(40_000, max(80, median_chars * math.exp(rng.gauss(0.0, 1.0)))))
        lengths.append(n)
        total += n
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        for n in lengths:
            start = rng.randrange(len(source))
            text = (source[start:] + "\n\n" + source)[:n] if start + n > len(source) else source[start:start + n]
            writer.writerow([text.strip() or source[:n]])
    tmp.replace(path)
    ordered = sorted(lengths)
    return {"documents": len(lengths), "chars": total, "median_chars": ordered[len(ordered) // 2],
            "max_chars": ordered[-1]}


def build_packs(csv_path: Path, *, tokenizer_path: Path, seq_len: int, packs_out: Path) -> dict:
    """Builds kobllla's packed dataset exactly as the recipe will; saves the packs for the peer.

    Checks that no token is dropped: every document token except its BOS is a trained target
    exactly once, so trained targets must equal ``tokens - documents``.
    """
    import numpy as np
    from torchtune.models.llama3 import llama3_tokenizer

    from kobllla.datasets import kowikitext_dataset

    tok = llama3_tokenizer(str(tokenizer_path), max_seq_len=seq_len)
    ds = kowikitext_dataset(tok, source="csv", data_files=str(csv_path), packed=True)
    fig = PackFigures()
    tokens = np.zeros((len(ds), seq_len), dtype=np.int64)
    labels, input_pos = np.zeros_like(tokens), np.zeros_like(tokens)
    for i in range(len(ds)):
        sample = ds[i]
        s, e = ds._packs[i]
        count_pack(fig, sample["labels"].tolist(), sample["seq_lens"].tolist(), real_len=e - s)
        tokens[i], labels[i], input_pos[i] = sample["tokens"], sample["labels"], sample["input_pos"]
    expected = ds.stats.tokens - ds.stats.documents
    if fig.trained != expected:
        raise ValueError(f"{csv_path}: {fig.trained} trained targets, expected tokens - documents = {expected}: "
                         "tokens were dropped or duplicated")
    np.savez(packs_out, tokens=tokens, labels=labels, input_pos=input_pos)
    return {**asdict(fig), "padding_share": fig.padding_share, "trained_share": fig.trained_share,
            "corpus_tokens": ds.stats.tokens, "documents": ds.stats.documents, "no_token_dropped": True}


# --------------------------------------------------------------------------------------------
# Ours: the real recipe through `tune run`
# --------------------------------------------------------------------------------------------


def tiny_model_block() -> dict:
    """``model:`` for the tiny preset (the 8B block names lora_llama3_8b)."""
    from kobllla.tiny_model import PRESETS

    s = PRESETS["tiny"]
    return {"_component_": "torchtune.models.llama3.lora_llama3", "vocab_size": s.vocab, "num_layers": s.layers,
            "num_heads": s.heads, "num_kv_heads": s.kv_heads, "embed_dim": s.hidden, "max_seq_len": s.max_seq_len,
            "intermediate_dim": s.intermediate, "norm_eps": s.norm_eps, "rope_base": s.rope_theta,
            "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False, "apply_lora_to_output": False,
            "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0}


# Component sets laid over the shipped config: (model component, extra model keys, loss component,
# collate). The extra keys are replaced, not merged: "stock" drops a shipped output/fp8 key. Collate
# "torchtune": dataset.packed (torchtune's padded_collate_packed); "kobllla": dataset.pack with
# collate_fn kobllla.datasets.packed_collate (document mask without host syncs).
_TT_MODEL, _KB_MODEL = "torchtune.models.llama3.lora_llama3_8b", "kobllla.models.lora_llama3_8b"
_TT_LOSS, _FUSED_LOSS = "torchtune.modules.loss.CEWithChunkedOutputLoss", "kobllla.losses.FusedLinearCrossEntropyLoss"
_INLINE = {"attention": "flex_inline"}
_FP8ALL = {"fp8": True, "fp8_output": True, "fuse_projections": True, "attention": "flex_inline"}
VARIANTS: dict[str, tuple[str, dict, str, str] | None] = {
    "shipped": None,
    "stock": (_TT_MODEL, {}, _TT_LOSS, "torchtune"),
    "fused": (_KB_MODEL, {"output": "hidden"}, _FUSED_LOSS, "torchtune"),
    "fp8": (_KB_MODEL, {"output": "hidden", "fp8": True}, _FUSED_LOSS, "torchtune"),
    # kobllla.models._fast: fused q/k/v and gate/up frozen matmuls, flex attention in the layer's graph
    "fast": (_KB_MODEL, {"fuse_projections": True, **_INLINE}, _TT_LOSS, "torchtune"),
    "inline": (_KB_MODEL, _INLINE, _TT_LOSS, "torchtune"),
    "fp8fast": (_KB_MODEL, {"fp8": True, "fuse_projections": True, **_INLINE}, _TT_LOSS, "torchtune"),
    "fp8all": (_KB_MODEL, _FP8ALL, _TT_LOSS, "torchtune"),
    # the same with kobllla.datasets.packed_collate
    "stockpc": (_TT_MODEL, {}, _TT_LOSS, "kobllla"),
    "inlinepc": (_KB_MODEL, _INLINE, _TT_LOSS, "kobllla"),
    "fp8allpc": (_KB_MODEL, _FP8ALL, _TT_LOSS, "kobllla"),
    "fastpc": (_KB_MODEL, {"fuse_projections": True, **_INLINE}, _TT_LOSS, "kobllla"),
    "fastfusedpc": (_KB_MODEL, {"fuse_projections": True, "output": "hidden", **_INLINE}, _FUSED_LOSS, "kobllla"),
    # the shipped config under a process setting (VARIANT_ENV): inductor's coordinate-descent tuning of
    # its Triton kernels' launch configs; cuBLASLt instead of cuBLAS for every matmul
    "shippedcd": None,
    "shippedlt": None,
    # ... and inductor's multi-kernels at 2 packs per micro-batch: reductions up to 16x longer rows (the 4,096-wide
    # RMSNorm backward) also compiled persistent (one read of each row), the faster one picked by timing both
    "shippedmkbs2": None,
    # ... and with model.persistent_norms (VARIANT_MODEL): only the reductions up to the model's width (the norms)
    # compiled persistent, by kobllla's inductor choices instead of multi-kernel's timing of both forms
    "persistbs2": None,
    # ... the shipped config without persistent_norms (the code before the tenth session's change), and with
    # model.freeze_gc: the objects alive after the first forwards frozen out of the cyclic collector's full passes
    "flatbs2": None,
    "gcbs2": None,
    # ... with model.fused_rope: q's and k's RoPE as one Triton kernel each, q's adapter output added inside
    "ropebs2": None,
    # the shipped config at 2 (4) packs per micro-batch, with 1/2 (1/4) the accumulation: the same packs per
    # optimizer step in the same order, so the same losses (VARIANT_BATCH)
    "shippedbs2": None,
    "shippedbs4": None,
    # cuDNN's fused attention on ragged documents (kobllla.models._cudnn_attention), packs collated as offsets
    # by kobllla.datasets.packed_varlen_collate; at 1 and at 2 packs per micro-batch
    "cudnn": (_KB_MODEL, {"attention": "cudnn"}, _TT_LOSS, "varlen"),
    "cudnnbs2": (_KB_MODEL, {"attention": "cudnn"}, _TT_LOSS, "varlen"),
    # + the output projection fused with the loss (kobllla.losses.FusedLinearCrossEntropyLoss), at 1 and 2 packs
    "cudnnfused": (_KB_MODEL, {"attention": "cudnn", "output": "hidden"}, _FUSED_LOSS, "varlen"),
    "cudnnfusedbs2": (_KB_MODEL, {"attention": "cudnn", "output": "hidden"}, _FUSED_LOSS, "varlen"),
    # + q/k/v and gate/up as one frozen matmul each (fuse_projections), 2 packs per micro-batch
    "cudnnfastbs2": (_KB_MODEL, {"attention": "cudnn", "output": "hidden", "fuse_projections": True}, _FUSED_LOSS,
                     "varlen"),
    # the pre-cudnn shipped config (flex attention in the layer's graph, packed_collate) at 2 packs per micro-batch
    "inlinepcbs2": (_KB_MODEL, _INLINE, _TT_LOSS, "kobllla"),
    # the previous code (PREV_DIR) with its own shipped config, at 1 and 2 packs per micro-batch
    "prev": None,
    "prevbs2": None,
}
VARIANT_BATCH: dict[str, int] = {"shippedbs2": 2, "shippedbs4": 4, "cudnnbs2": 2, "inlinepcbs2": 2,
                                 "cudnnfusedbs2": 2, "cudnnfastbs2": 2, "prevbs2": 2,
                                 "shippedmkbs2": 2, "persistbs2": 2, "flatbs2": 2, "gcbs2": 2,
                                 "ropebs2": 2}
VARIANT_ENV: dict[str, dict[str, str]] = {
    "shippedcd": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"},
    "shippedlt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},
    "shippedmkbs2": {"TORCHINDUCTOR_MULTI_KERNEL": "1"},
}
# model keys laid over the shipped config's own (variants whose VARIANTS entry is None)
VARIANT_MODEL: dict[str, dict] = {"persistbs2": {"persistent_norms": True}, "flatbs2": {"persistent_norms": False},
                                  "gcbs2": {"freeze_gc": True}, "ropebs2": {"fused_rope": True}}
SPEED_KEYS = ("output", "fp8", "fp8_output", "fuse_projections", "attention", "persistent_norms", "freeze_gc",
              "fused_rope")
PACKED_COLLATE = "kobllla.datasets.packed_collate"  # kobllla.datasets._collate.COLLATE_PATH (that imports torch)
VARLEN_COLLATE = "kobllla.datasets.packed_varlen_collate"  # ... .VARLEN_COLLATE_PATH


def set_collate(cfg: dict, collate: str) -> None:
    """``cfg``'s dataset packs, collated by torchtune's ``padded_collate_packed`` or kobllla's (``kobllla``:
    ``packed_collate``, a ``BlockMask``; ``varlen``: ``packed_varlen_collate``, document offsets)."""
    ds = {k: v for k, v in cfg["dataset"].items() if k not in ("packed", "pack")}
    cfg.pop("collate_fn", None)
    if collate in ("kobllla", "varlen"):
        cfg["dataset"] = {**ds, "pack": True}
        cfg["collate_fn"] = PACKED_COLLATE if collate == "kobllla" else VARLEN_COLLATE
    else:
        cfg["dataset"] = {**ds, "packed": True}


def apply_variant(cfg: dict, variant: str, *, tiny: bool) -> None:
    """Sets ``cfg``'s model, loss and collate to ``VARIANTS[variant]`` (in place)."""
    spec = VARIANTS[variant]
    if spec is None:
        cfg["model"].update(VARIANT_MODEL.get(variant, {}))
        return
    component, extra, loss, collate = spec
    if tiny:  # the generic builders take the shape; kobllla.models has the same two names
        component = component.replace("lora_llama3_8b", "lora_llama3")
    model = {k: v for k, v in cfg["model"].items() if k not in ("_component_", *SPEED_KEYS)}
    cfg["model"] = {"_component_": component, **model, **extra}
    cfg["loss"] = {"_component_": loss}
    set_collate(cfg, collate)


def loss_agreement(losses: dict[str, list[float]], *, reference: str, first: int) -> dict[str, dict]:
    """Per run, how far its per-step losses are from ``reference``'s (same data, same seed).

    ``max_rel_first_n``: the largest ``|loss - ref| / ref`` over the first ``first`` steps both
    logged; ``rel_last``: the same at the last step both logged.
    """
    if reference not in losses:
        raise ValueError(f"no reference run {reference!r}; have {sorted(losses)}")
    ref = losses[reference]
    out = {}
    for name, curve in losses.items():
        if name == reference:
            continue
        n = min(len(curve), len(ref))
        if n == 0:
            out[name] = {"steps_compared": 0}
            continue
        rel = [abs(a - b) / abs(b) for a, b in zip(curve[:n], ref[:n], strict=True)]
        out[name] = {"steps_compared": min(n, first), "max_rel_first_n": max(rel[:first]), "last_step": n,
                     "rel_last": rel[n - 1], "loss_last": curve[n - 1], "reference_loss_last": ref[n - 1]}
    return out


def write_recipe_config(path: Path, *, model_dir: Path, files: list[str], csv_path: Path, run_dir: Path,
                        preset: str, seq_len: int, batch_size: int, steps: int, compile_model: bool,
                        device: str, dtype: str, variant: str = "shipped", grad_accum: int = 1,
                        profile: dict | None = None) -> dict:
    """The shipped single-device stage-1 config with the benchmark's overrides, written as YAML.

    ``variant`` (one of ``VARIANTS``) swaps the model and loss components: ``shipped`` keeps the
    config's own, ``stock`` torchtune's, ``fused``/``fp8`` kobllla's (see ``VARIANTS``).
    """
    from omegaconf import OmegaConf

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    config = PREV_DIR / SHIPPED_CONFIG.relative_to(REPO) if is_prev(variant) else SHIPPED_CONFIG
    for need in (config, *([PREV_DIR / "kobllla" / "__init__.py"] if is_prev(variant) else [])):
        if not need.is_file():  # without the old package the run would import today's kobllla unnoticed
            raise FileNotFoundError(f"{need}: the {variant} variant runs the previous code's package and config "
                                    "from there (git archive REV kobllla configs | tar -x -C .prev)")
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    cfg["output_dir"] = str(run_dir / "out")
    cfg["tokenizer"].update(path=str(model_dir / "original" / "tokenizer.model"), max_seq_len=seq_len)
    cfg["checkpointer"].update(checkpoint_dir=str(model_dir), checkpoint_files=files)
    shipped_collate = {PACKED_COLLATE: "kobllla", VARLEN_COLLATE: "varlen"}.get(cfg.get("collate_fn"), "torchtune")
    cfg["dataset"] = {"_component_": "kobllla.datasets.kowikitext_dataset", "source": "csv",
                      "data_files": str(csv_path), "column": "text"}
    set_collate(cfg, shipped_collate)
    if preset == "tiny":  # the tiny shape, built by the config's own builder with its speed options
        speed = {k: v for k, v in cfg["model"].items() if k in SPEED_KEYS}
        component = cfg["model"]["_component_"].replace("lora_llama3_8b", "lora_llama3")
        cfg["model"] = {**tiny_model_block(), "_component_": component, **speed}
    apply_variant(cfg, variant, tiny=preset == "tiny")
    cfg.update(batch_size=batch_size, gradient_accumulation_steps=grad_accum, epochs=1, max_steps_per_epoch=steps,
               compile=compile_model, enable_activation_checkpointing=False, save_adapter_weights_only=True,
               log_every_n_steps=1, log_peak_memory_stats=True, device=device, dtype=dtype)
    cfg["optimizer"]["fused"] = device == "cuda"
    if profile:  # torchtune's own profiler, stepped once per micro-batch by the recipe
        cfg["profiler"] = {"_component_": "torchtune.training.setup_torch_profiler", "enabled": True,
                           "output_dir": str(run_dir / "profile"), "cpu": True, "cuda": device == "cuda",
                           "profile_memory": False, "with_stack": False, "record_shapes": False,
                           "with_flops": False, "num_cycles": 1, **profile}
    cfg["metric_logger"] = {"_component_": "bench.train_gpu.WallClockDiskLogger", "log_dir": str(run_dir / "logs")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)), encoding="utf-8")
    return cfg


def run_ours(*, cfg_path: Path, run_dir: Path, log_path: Path, warmup: int, positions_per_step: int,
             timeout_s: float, env: dict[str, str] | None = None, prev: bool = False) -> dict:
    """``tune run lora_finetune_single_device --config cfg_path`` (with ``env`` added to the process's
    environment); figures from its metric log."""
    gc_path = run_dir / "gc_passes.json"  # every cyclic-GC pass of the run, timed (bench/gc_probe.py)
    cmd = [sys.executable, str(REPO / "bench" / "gc_probe.py"), str(gc_path), "torchtune._cli.tune", "run",
           "lora_finetune_single_device", "--config", str(cfg_path)]
    extra = dict(env or {})
    env = {**os.environ, **extra}
    if prev:  # kobllla from PREV_DIR: first on the path, and not the working directory's (-P)
        cmd.insert(1, "-P")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PREV_DIR), str(REPO), env.get("PYTHONPATH", "")]))
    launched = time.time()
    rc = _run_logged(cmd, log_path, env=env, timeout_s=timeout_s)
    ended = time.time()
    result: dict = {"command": " ".join(cmd[1:]), "rc": rc, "wall_s": ended - launched, "env": extra,
                    "kobllla": str(PREV_DIR) if prev else str(REPO)}
    logs = sorted((run_dir / "logs").glob("log_*.txt"))
    if rc != 0 or not logs:
        result["error"] = f"recipe exited {rc}; see {log_path.name}"
        return result
    rows = parse_metric_log(logs[-1].read_text(encoding="utf-8"))
    created = next(r["logger_created_wall_time"] for r in rows if "logger_created_wall_time" in r)
    steps = [r for r in rows if "tokens_per_second_per_gpu" in r]
    first = min(steps, key=lambda r: r["step"])
    result.update(steady_state(steps, warmup=warmup, positions_per_step=positions_per_step))
    if gc_path.is_file():
        probe = json.loads(gc_path.read_text(encoding="utf-8"))
        result["gc"] = {"python": probe["python"].split()[0], "frozen_at_exit": probe["frozen_at_exit"],
                        **gc_by_step(probe["passes"], steps, warmup=warmup)}
    result.update({
        "steps": steps,
        "import_to_logger_s": created - launched,
        "startup_to_first_step_s": first["wall_time"] - launched,
    })
    for key in ("alloc", "reserved", "active"):  # the recipe logs memory on CUDA only
        values = [r[f"peak_memory_{key}"] for r in steps if f"peak_memory_{key}" in r]
        if values:
            result[f"peak_{key}_gib"] = max(values)
    return result


def _run_logged(cmd: list[str], log_path: Path, *, env: dict, timeout_s: float) -> int:
    """Runs ``cmd`` from the repo root, output to ``log_path`` and this process's stdout; killed after ``timeout_s``."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(max(timeout_s, 1.0), proc.kill)  # fires even while the child prints nothing
        watchdog.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if "it/s]" not in line and "s/it]" not in line:
                    print(line, end="", flush=True)
            rc = proc.wait()
        finally:
            watchdog.cancel()
        if rc < 0:
            log.write(f"killed after the {timeout_s:.0f} s left in the budget\n")
        return rc


# --------------------------------------------------------------------------------------------
# Peer: transformers + peft (a separate process, without torchao importable)
# --------------------------------------------------------------------------------------------


def peer_main(args: argparse.Namespace) -> int:
    """The peer's training loop; writes its figures to ``args.result``."""
    sys.modules["torchao"] = None  # peft refuses torchao < 0.16 when importable; the peer never uses it
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = args.device
    t_load = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa",
        **({"device_map": device} if device == "cuda" else {}))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.01,
                            fused=device == "cuda")
    loaded = time.time()
    with np.load(args.packs) as npz:
        packs = {k: npz[k] for k in ("tokens", "labels", "input_pos")}
    n, bs = len(packs["tokens"]), args.batch_size
    steps = []
    for step in range(1, args.steps + 1):
        idx = [((step - 1) * bs + j) % n for j in range(bs)]
        batch = {k: torch.from_numpy(packs[k][idx]).to(device) for k in ("tokens", "labels", "input_pos")}
        t0 = time.perf_counter()
        out = model(input_ids=batch["tokens"], position_ids=batch["input_pos"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        gap = time.perf_counter() - t0
        trained = int((batch["labels"] != IGNORE_INDEX).sum())
        steps.append({"step": step, "seconds": gap, "trained": trained, "loss": out.loss.detach().item(),
                      "wall_time": time.time()})
    measured = [s for s in steps if s["step"] > args.warmup]
    secs = sum(s["seconds"] for s in measured)
    result = {
        "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
        "trainable_params": trainable, "load_s": loaded - t_load, "steps": steps,
        "startup_to_first_step_s": steps[0]["wall_time"] - args.launched,
        "steps_measured": len(measured), "seconds": secs,
        "useful_tokens_per_s": sum(s["trained"] for s in measured) / secs,
        "useful_tokens_per_s_median_step": _median([s["trained"] / s["seconds"] for s in measured]),
        "step_s_median": _median([s["seconds"] for s in measured]),
        "positions_per_s": len(measured) * bs * packs["tokens"].shape[1] / secs,
    }
    if device == "cuda":
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    Path(args.result).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def run_peer(*, args: argparse.Namespace, model_dir: Path, packs: Path, out: Path, device: str,
             timeout_s: float) -> dict:
    result_path = out / "peer.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "peer", "--model", str(model_dir), "--packs", str(packs),
           "--steps", str(args.peer_steps), "--warmup", str(args.peer_warmup), "--batch-size", str(args.batch_size),
           "--device", device, "--result", str(result_path), "--launched", str(time.time())]
    env = os.environ.copy()
    env["PYTHONPATH"] = args.peer_pythonpath  # never the wheel dir holding torchao 0.14
    rc = _run_logged(cmd, out / "peer.log", env=env, timeout_s=timeout_s)
    if rc != 0 or not result_path.exists():
        return {"rc": rc, "error": f"peer exited {rc}; see peer.log"}
    return {"rc": rc, **json.loads(result_path.read_text(encoding="utf-8"))}


# --------------------------------------------------------------------------------------------
# The output projection + loss alone (a separate process on the same GPU)
# --------------------------------------------------------------------------------------------


def loss_micro_main(args: argparse.Namespace) -> int:
    """Times forward + backward of the 128,256-way output + loss at 4,096 x 4,096 bf16 (8B, seq 4096).

    torchtune's path (8 chunks of ``output(h)``, compiled ``compute_cross_entropy``) against
    kobllla's fused loss at a few chunk sizes and, if importable, Liger's fused linear + CE.
    Median of 10 timed runs after 3 warm-ups; loss and hidden-state gradient compared with torchtune's.
    """
    import torch
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.training import compile_loss

    from kobllla.losses import FusedLinearCrossEntropyLoss, ProjectionInput

    dev, n, d, v = args.device, 4096, 4096, 128256
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(1, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(v, d, device=dev, dtype=torch.bfloat16, generator=g).mul_(0.02)
    labels = torch.randint(0, v, (1, n), device=dev, generator=g)
    labels[0, -1] = -100
    tt = compile_loss(CEWithChunkedOutputLoss(), verbose=False) if dev == "cuda" else CEWithChunkedOutputLoss()

    def stock(h):
        return tt([c @ w.t() for c in h.chunk(8, dim=1)], labels)

    runs = {"torchtune_chunked_ce": stock}
    for chunk in (1024, 2048, 4096):
        fn = FusedLinearCrossEntropyLoss(chunk_size=chunk)
        runs[f"kobllla_fused_chunk{chunk}"] = lambda h, fn=fn: fn(ProjectionInput(h, w), labels)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        runs["liger_flce"] = lambda h: liger(w, h.reshape(-1, d), labels.reshape(-1))
    except Exception as exc:  # noqa: BLE001 - recorded
        runs["liger_flce"] = None
        liger_error = f"{type(exc).__name__}: {exc}"
    result: dict = {"shape": {"positions": n, "hidden": d, "vocab": v}}
    ref_loss = ref_grad = None
    for name, fn in runs.items():
        if fn is None:
            result[name] = {"error": liger_error}
            continue
        try:
            times = []
            for i in range(13):
                h = h0.clone().requires_grad_(True)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                loss = fn(h)
                loss.backward()
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            entry = {"ms_median": _median(times), "ms_min": min(times), "loss": loss.item(),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            if ref_loss is None:
                ref_loss, ref_grad = loss.item(), h.grad.float()
            else:
                entry["rel_loss_diff"] = abs(loss.item() - ref_loss) / ref_loss
                entry["rel_grad_diff"] = ((h.grad.float() - ref_grad).norm() / ref_grad.norm()).item()
            result[name] = entry
        except Exception as exc:  # noqa: BLE001 - recorded, the next one still runs
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        torch.cuda.reset_peak_memory_stats()
        print(name, result[name], flush=True)
    Path(args.result).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def run_loss_micro(*, out: Path, device: str, timeout_s: float) -> dict:
    result_path = out / "loss_micro.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "loss-micro", "--device", device,
           "--result", str(result_path)]
    rc = _run_logged(cmd, out / "loss_micro.log", env=os.environ.copy(), timeout_s=timeout_s)
    if rc != 0 or not result_path.exists():
        return {"rc": rc, "error": f"loss-micro exited {rc}; see loss_micro.log"}
    return json.loads(result_path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device"] = "cpu"
    for name in ("torchtune", "torchao", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"unavailable: {exc}"
    return info


def figures(result: dict, *, flops_per_position: int, peak: float | None) -> dict:
    if "useful_tokens_per_s" not in result:
        return {}
    out = {"useful_tok_s_gpu": round(result["useful_tokens_per_s"], 1),
           "median_step_tok_s_gpu": round(result["useful_tokens_per_s_median_step"], 1)}
    if peak:
        out["mfu"] = round(mfu(positions_per_s=result["positions_per_s"], flops_per_position=flops_per_position,
                               peak_flops=peak), 4)
    for key in ("peak_alloc_gib", "peak_reserved_gib", "startup_to_first_step_s"):
        if key in result:
            out[key] = round(result[key], 2)
    for key in ("sm_mhz_mean", "power_w_mean", "power_capped_share"):  # the busy seconds of the whole run
        if key in result.get("gpu_clocks", {}):
            out[key] = result["gpu_clocks"][key]
    return out


class Clock:
    """Seconds since the benchmark started, against its ``--deadline-s`` (one device call's budget)."""

    def __init__(self, deadline_s: float) -> None:
        self.start, self.deadline_s = time.time(), deadline_s

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.deadline_s - self.elapsed()


PROFILE_SCHEDULE = {"wait_steps": 6, "warmup_steps": 2, "active_steps": 3}


def variant_batch(variant: str, *, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` of a run of ``variant``: ``VARIANT_BATCH`` packs per micro-batch and
    the accumulation divided by as much (the same packs per optimizer step), else the arguments."""
    per = VARIANT_BATCH.get(variant)
    if per is None:
        return batch_size, grad_accum
    if batch_size != 1 or grad_accum % per:
        raise ValueError(f"variant {variant} runs {per} packs per micro-batch: it needs --batch-size 1 and a "
                         f"--grad-accum divisible by {per} (got {batch_size} and {grad_accum})")
    return per, grad_accum // per


def profile_steps(accum: int) -> int:
    """Optimizer steps that cover torchtune's profiler schedule (stepped per micro-batch), plus one."""
    return -(-(sum(PROFILE_SCHEDULE.values()) + 1) // accum) + 1


def too_late(walls: list[float], left_s: float) -> str | None:
    """Why a recipe run should not start with ``left_s`` seconds of the call's deadline left, given the wall
    times of the runs that finished before it (None: start it). A run killed at the deadline measures
    nothing and spends its device time, so one is started only while the slowest finished run would fit;
    with none finished yet, only the ``--ours-timeout-s`` cut applies."""
    if walls and left_s < max(walls):
        return f"skipped: {left_s:.0f} s left < {max(walls):.0f} s, the slowest finished run"
    return None


def _ours_run(name: str, *, args: argparse.Namespace, ctx: dict, batch_size: int, compile_model: bool,
              timeout_s: float, variant: str = "shipped", profile: bool = False) -> dict:
    run_dir = Path(args.work) / name
    cfg_path = run_dir / "config.yaml"
    batch_size, accum = variant_batch(variant, batch_size=batch_size,
                                      grad_accum=args.profile_accum if profile else args.grad_accum)
    steps = profile_steps(accum) if profile else args.steps
    write_recipe_config(cfg_path, model_dir=ctx["model_dir"], files=ctx["files"], csv_path=ctx["csv"], run_dir=run_dir,
                        preset=args.preset, seq_len=args.seq_len, batch_size=batch_size, steps=steps,
                        compile_model=compile_model, device=ctx["device"],
                        dtype="bf16" if ctx["device"] == "cuda" else "fp32", variant=variant,
                        grad_accum=accum, profile=PROFILE_SCHEDULE if profile else None)
    result = _with_clocks(lambda: run_ours(cfg_path=cfg_path, run_dir=run_dir, log_path=Path(args.out) / f"{name}.log",
                                           warmup=min(args.warmup, steps - 2),
                                           positions_per_step=batch_size * args.seq_len * accum,
                                           timeout_s=timeout_s, env=VARIANT_ENV.get(variant),
                                           prev=is_prev(variant)))
    result = {"batch_size": batch_size, "grad_accum": accum, "compile": compile_model, "variant": variant, **result}
    if profile:
        result["gaps"] = _profile_gaps(run_dir / "profile", Path(args.out), name)
    return result


def _with_clocks(run: Callable[[], dict]) -> dict:
    """``run()``'s result, with the GPU's clock, power and power cap over it as ``gpu_clocks`` where
    nvidia-smi is there to sample them (the clock decides what a figure means)."""
    try:
        from bench.gpu_clocks import ClockSampler
    except ImportError:  # run as a script: bench/ itself is on the path
        from gpu_clocks import ClockSampler
    with ClockSampler() as clocks:
        result = run()
    summary = clocks.summary()
    if summary is not None:
        result["gpu_clocks"] = summary
    return result


def _profile_gaps(profile_dir: Path, out: Path, name: str) -> dict:
    """bench/trace_gaps.py's report on the run's trace, as JSON and Markdown in ``out``; the trace
    itself too when it fits what the device tool brings back (16 MiB)."""
    import shutil

    try:
        from bench.trace_gaps import gap_report, load_trace, markdown
    except ImportError:  # run as a script: bench/ itself is on the path
        from trace_gaps import gap_report, load_trace, markdown

    traces = sorted(profile_dir.rglob("*.pt.trace.json*"))
    if not traces:
        return {"error": f"no trace under {profile_dir}"}
    try:
        rep = gap_report(load_trace(traces[-1]))
    except ValueError as e:  # e.g. a CPU run: no GPU events
        return {"trace": str(traces[-1]), "error": str(e)}
    (out / f"{name}-gaps.md").write_text(markdown(rep), encoding="utf-8")
    _write_json(out / f"{name}-gaps.json", rep)
    if traces[-1].stat().st_size <= 15 << 20:
        shutil.copy(traces[-1], out / f"{name}.pt.trace.json.gz")
    print(markdown(rep), flush=True)
    return {"trace": str(traces[-1]), "mean": rep["mean"], "idle_by_top_op": rep["idle_by_top_op"][:8]}


def _prepare(args: argparse.Namespace, res: dict, device: str) -> dict:
    work = Path(args.work)
    model_dir = work / f"model-{args.preset}"
    res["checkpoint"] = write_random_checkpoint(model_dir, preset=args.preset, device=device, seed=args.seed)
    print(f"checkpoint: {res['checkpoint']}", flush=True)
    csv_path, packs = work / "ko_docs.csv", work / "packs.npz"
    need = args.steps * max(args.batch_size, args.extra_batch_size) * args.grad_accum
    # ~1.8 characters per token for Korean with the Llama 3 tokenizer: 2.2 leaves ~20 % spare packs
    res["corpus"] = korean_length_mix_csv(csv_path, target_chars=int((need + 2) * args.seq_len * 2.2), seed=args.seed)
    res["packs"] = build_packs(csv_path, tokenizer_path=model_dir / "original" / "tokenizer.model",
                               seq_len=args.seq_len, packs_out=packs)
    print(f"corpus: {res['corpus']}\npacks: {res['packs']}", flush=True)
    if res["packs"]["packs"] < need:
        raise ValueError(f"{csv_path}: {res['packs']['packs']} packs, fewer than the {need} the runs need; "
                         "raise the corpus size factor")
    return {"model_dir": model_dir, "files": res["checkpoint"]["files"], "csv": csv_path, "packs": packs,
            "device": device}


def run_all(args: argparse.Namespace) -> dict:
    """Prepares inputs, runs ours (compiled; eager only if that fails), the peer, then an optional
    extra batch size, each only while ``--deadline-s`` leaves time for it. Always writes results.json."""
    import torch

    from kobllla.tiny_model import PRESETS

    clock = Clock(args.deadline_s)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args), "machine": machine_info(device)}
    shape = PRESETS[args.preset]
    n_mm = matmul_params(hidden=shape.hidden, layers=shape.layers, heads=shape.heads, kv_heads=shape.kv_heads,
                         intermediate=shape.intermediate, vocab=shape.vocab)
    fpp = lora_flops_per_position(n_matmul=n_mm, layers=shape.layers, hidden=shape.hidden, seq_len=args.seq_len)
    peak = peak_flops_for(res["machine"]["device"], args.peak_tflops) if device == "cuda" else None
    res["flops"] = {"matmul_params": n_mm, "per_position": fpp, "peak": peak}
    try:
        ctx = _prepare(args, res, device)
        walls: list[float] = []  # the finished runs' wall times: a run that can't finish isn't started
        runs = [(f"ours-{v}", v, False) for v in args.variants] + [(f"profile-{v}", v, True) for v in args.profile]
        for name, variant, profile in runs:
            if (why := too_late(walls, clock.left() - 5)) is not None:
                res[name] = {"variant": variant, "error": why}
                continue
            res[name] = _ours_run(name, args=args, ctx=ctx, batch_size=args.batch_size, compile_model=args.compile,
                                  timeout_s=min(args.ours_timeout_s, clock.left() - 5), variant=variant,
                                  profile=profile)
            walls += [res[name]["wall_s"]] if res[name].get("rc") == 0 else []
            _write_json(out / "results.json", res)
        if args.loss_micro and clock.left() > 60:
            res["loss-micro"] = run_loss_micro(out=out, device=device, timeout_s=min(120, clock.left()))
        if args.peer_steps <= 0:
            res["peer"] = {"error": "skipped: --peer-steps 0"}
        elif clock.left() > args.peer_needs_s:
            res["peer"] = _with_clocks(lambda: run_peer(args=args, model_dir=ctx["model_dir"], packs=ctx["packs"],
                                                        out=out, device=device, timeout_s=clock.left()))
        else:
            res["peer"] = {"error": f"skipped: {clock.left():.0f} s left < --peer-needs-s {args.peer_needs_s}"}
        _write_json(out / "results.json", res)
        if args.extra_batch_size and clock.left() > args.extra_needs_s:
            name = f"ours-bs{args.extra_batch_size}"
            res[name] = _ours_run(name, args=args, ctx=ctx, batch_size=args.extra_batch_size,
                                  compile_model=args.compile, timeout_s=clock.left(), variant=args.variants[0])
        elif args.extra_batch_size:
            res[f"ours-bs{args.extra_batch_size}"] = {"error": f"skipped: {clock.left():.0f} s left"}
    finally:
        runs = [k for k in res if k.startswith(("ours-", "profile-")) or k == "peer"]
        res["figures"] = {k: figures(res[k], flops_per_position=fpp, peak=peak) for k in runs}
        packs_per_step = args.batch_size * args.grad_accum  # the same data per optimizer step: comparable losses
        curves = {k: [r["loss"] for r in res[k]["steps"]] for k in runs if k.startswith("ours-") and "steps" in res[k]
                  and res[k].get("batch_size", 0) * res[k].get("grad_accum", 0) == packs_per_step}
        if f"ours-{args.variants[0]}" in curves and len(curves) > 1:
            res["loss_agreement"] = loss_agreement(curves, reference=f"ours-{args.variants[0]}", first=30)
        best = max((f["useful_tok_s_gpu"] for k, f in res["figures"].items() if k != "peer" and f), default=None)
        if best and res["figures"].get("peer"):
            res["figures"]["best_ours_over_peer"] = round(best / res["figures"]["peer"]["useful_tok_s_gpu"], 3)
        res["total_s"] = clock.elapsed()
        _write_json(out / "results.json", res)
    return res


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    peer = sub.add_parser("peer", help="internal: the transformers + peft loop")
    peer.add_argument("--model", required=True)
    peer.add_argument("--packs", required=True)
    peer.add_argument("--steps", type=int, required=True)
    peer.add_argument("--warmup", type=int, required=True)
    peer.add_argument("--batch-size", type=int, required=True)
    peer.add_argument("--device", required=True)
    peer.add_argument("--result", required=True)
    peer.add_argument("--launched", type=float, required=True)
    micro = sub.add_parser("loss-micro", help="internal: the output projection + loss timed alone")
    micro.add_argument("--device", required=True)
    micro.add_argument("--result", required=True)
    p.add_argument("--preset", default="llama3-8b", choices=["llama3-8b", "tiny"])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of our run (1 pack each at batch 1)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of steady state (compilation)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (the recipe syncs with the host once per step: the "
                        "shipped config accumulates 128)")
    p.add_argument("--peer-steps", type=int, default=12)
    p.add_argument("--peer-warmup", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="our runs eager (default: compiled)")
    p.add_argument("--variants", type=_variant_list, default=["shipped"],
                   help="comma-separated component sets to run, the first is the loss reference: "
                        f"{', '.join(VARIANTS)}")
    p.add_argument("--profile", type=_variant_list, default=[],
                   help="after the variants, run these once more under torchtune's profiler (micro-batches "
                        f"{PROFILE_SCHEDULE['wait_steps'] + PROFILE_SCHEDULE['warmup_steps'] + 1}-"
                        f"{sum(PROFILE_SCHEDULE.values())} traced) and report where the GPU idles "
                        "(bench/trace_gaps.py)")
    p.add_argument("--profile-accum", type=_positive_int, default=1,
                   help="the profiled runs' accumulation: 1 traces optimizer steps (a host sync each), 8 "
                        "micro-batches in the middle of one")
    p.add_argument("--loss-micro", action="store_true", help="also time the output projection + loss alone (GPU)")
    p.add_argument("--peer-pythonpath", default="", help="PYTHONPATH of the peer process (where peft is)")
    p.add_argument("--extra-batch-size", type=int, default=0,
                   help="also run ours at this batch size (last, if time is left)")
    p.add_argument("--deadline-s", type=float, default=1e9, help="the whole benchmark's time budget (seconds)")
    p.add_argument("--peer-needs-s", type=float, default=90, help="run the peer only with this much budget left")
    p.add_argument("--extra-needs-s", type=float, default=120, help="run the extra batch size only with this much left")
    p.add_argument("--ours-timeout-s", type=float, default=3600)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when the GPU is not an H100/H200/A100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/kobllla-bench-train")
    p.add_argument("--out", default="/tmp/kobllla-bench-train/out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "peer":
        return peer_main(args)
    if args.command == "loss-micro":
        return loss_micro_main(args)
    if args.steps < args.warmup + 2:
        print(f"error: --steps {args.steps} leaves nothing to measure after --warmup {args.warmup}; use >= warmup + 2")
        return 2
    try:
        for variant in args.variants:
            variant_batch(variant, batch_size=args.batch_size, grad_accum=args.grad_accum)
        for variant in args.profile:
            variant_batch(variant, batch_size=args.batch_size, grad_accum=args.profile_accum)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    res = run_all(args)
    print(json.dumps({"machine": res["machine"], "packs": res["packs"], "figures": res["figures"]}, indent=1))
    ok = any("useful_tokens_per_s" in res[k] for k in res if k.startswith("ours-"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
