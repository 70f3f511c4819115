"""Checks done before anything is written: the three checkpoints against each other
(architecture, tensor names, shapes, floating dtypes), the vocabulary policy, the output path;
and the per-tensor plans (:class:`TensorPlan`) the streaming follows."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kobllla.checkpoint_io import Checkpoint, DType, as_dtype

EmbeddingPolicy = Literal["error", "skip", "overlap"]
OutDtype = Literal["auto", "bfloat16", "float16", "float32"]
VectorDtype = Literal["float32", "bfloat16"]

EMBEDDING_POLICIES: tuple[str, ...] = ("error", "skip", "overlap")
OUT_DTYPES: dict[str, DType | None] = {
    "auto": None, "bfloat16": as_dtype("bfloat16"), "float16": as_dtype("float16"), "float32": as_dtype("float32"),
}
VOCAB_TENSORS: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
_FLOAT_DTYPES = tuple(as_dtype(n) for n in ("float64", "float32", "float16", "bfloat16"))
DTYPE_NAMES: dict[DType, str] = {d: d.name for d in _FLOAT_DTYPES}

# Config fields that must agree for a weight difference to mean the same thing in the target.
# vocab_size is left out: a differing vocabulary is the --embeddings policy's business.
ARCH_DEFAULTS: dict[str, object] = {
    "model_type": None, "hidden_size": None, "num_hidden_layers": None,
    "num_attention_heads": None, "num_key_value_heads": None, "intermediate_size": None,
    "head_dim": None, "hidden_act": "silu", "rms_norm_eps": None, "rope_theta": None,
    "rope_scaling": None,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of a flattened tensor; ``merge`` adds the vector, ``keep``
    copies the target (rows outside the shared vocabulary)."""

    start: int
    end: int
    mode: Literal["merge", "keep"]


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]


def architecture(ckpt: Checkpoint) -> dict[str, object] | None:
    """The architecture fields of ``config.json`` (or Meta's ``params.json``), defaults filled.

    RoPE settings are read from the top-level ``rope_theta``/``rope_scaling`` or from
    transformers 5's ``rope_parameters``, whichever the file has.
    """
    if ckpt.config is not None:
        cfg = ckpt.config
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None)
        theta = cfg.get("rope_theta") or theta or 10000.0
        rope.update(cfg.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type")) == "default":
            rope = {}
        arch = {k: cfg.get(k, default) for k, default in ARCH_DEFAULTS.items()}
        arch["rope_theta"], arch["rope_scaling"] = float(theta), rope or None
    elif ckpt.params is not None:
        p = ckpt.params
        arch = {"hidden_size": p.get("dim"), "num_hidden_layers": p.get("n_layers"),
                "num_attention_heads": p.get("n_heads"),
                "num_key_value_heads": p.get("n_kv_heads", p.get("n_heads")),
                "rms_norm_eps": p.get("norm_eps"), "rope_theta": float(p.get("rope_theta", 10000.0))}
    else:
        return None
    if arch.get("head_dim") is None and arch.get("hidden_size") and arch.get("num_attention_heads"):
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    if arch.get("num_key_value_heads") is None:
        arch["num_key_value_heads"] = arch.get("num_attention_heads")
    return arch


def _config_file(ckpt: Checkpoint) -> str:
    name = "config.json" if ckpt.config is not None else "params.json"
    return str(ckpt.path / name)


def check_same_architecture(named: dict[str, Checkpoint]) -> list[str]:
    """Raises ``ValueError`` naming the first field that differs; returns notes for inputs
    without any config (checked by tensor shapes only)."""
    archs = {role: architecture(ck) for role, ck in named.items()}
    notes = [f"{role}: no config.json/params.json in {named[role].path}; checked by tensor shapes only"
             for role, arch in archs.items() if arch is None]
    known = [(role, arch) for role, arch in archs.items() if arch is not None]
    for (role_a, a), (role_b, b) in zip(known, known[1:], strict=False):
        for key in ARCH_DEFAULTS:
            if key in a and key in b and a[key] != b[key]:
                raise ValueError(
                    f"architecture differs: {key} is {a[key]!r} in {role_a} ({_config_file(named[role_a])}) "
                    f"but {b[key]!r} in {role_b} ({_config_file(named[role_b])}); a chat vector only "
                    "transfers between models of one architecture")
    return notes


def check_same_tensors(a: Checkpoint, role_a: str, b: Checkpoint, role_b: str) -> None:
    """Same tensor names in both; raises ``ValueError`` naming a missing tensor."""
    only_a = sorted(set(a.tensors) - set(b.tensors))
    only_b = sorted(set(b.tensors) - set(a.tensors))
    for missing_in, has, names in ((role_b, (role_a, a), only_a), (role_a, (role_b, b), only_b)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise ValueError(
                f"missing tensor: {names[0]}{more} is in {has[0]} ({has[1].path}) but not in "
                f"{missing_in}; the checkpoints must hold the same tensors (same model family, "
                "same tied/untied lm_head)")


def check_floating(ckpt: Checkpoint, role: str) -> None:
    for info in ckpt.tensors.values():
        if info.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{role} tensor {info.name} in {info.file} has dtype {info.dtype}; "
                             "a chat vector needs floating-point weights (dequantize first)")


def check_vector_shapes(base: Checkpoint, instruct: Checkpoint) -> None:
    for name, info in base.tensors.items():
        other = instruct.tensors[name]
        if other.shape != info.shape:
            raise ValueError(
                f"shape mismatch: tensor {name} is {list(info.shape)} in base ({info.file}) but "
                f"{list(other.shape)} in instruct ({other.file}); base and instruct must be the same model")


def plan_tensors(
    target: Checkpoint, vector_shapes: dict[str, tuple[int, ...]], *,
    embeddings: EmbeddingPolicy, dtype: OutDtype,
) -> tuple[list[TensorPlan], dict[str, str]]:
    """One plan per target tensor and a note for each tensor the vocabulary policy touched.

    Raises:
        ValueError: a shape differs (outside the vocabulary rows, or with policy ``error``),
            or the policy is unknown.
    """
    if embeddings not in EMBEDDING_POLICIES:
        raise ValueError(f"unknown embeddings policy {embeddings!r}; choose one of {list(EMBEDDING_POLICIES)}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unknown output dtype {dtype!r}; choose one of {list(OUT_DTYPES)}")
    _check_vocab_policy(target, vector_shapes, embeddings)
    plans, notes = [], {}
    for name, info in target.tensors.items():
        out_dtype = OUT_DTYPES[dtype] or info.dtype
        segments, note = _segments(info.name, info.shape, vector_shapes[name], embeddings)
        if note:
            notes[name] = note
        plans.append(TensorPlan(name, out_dtype, info.shape, segments))
    return plans, notes


def _check_vocab_policy(target: Checkpoint, vector_shapes: dict[str, tuple[int, ...]], policy: str) -> None:
    differing = [n for n, info in target.tensors.items() if info.shape != vector_shapes[n]]
    for name in differing:
        t, v = target.tensors[name].shape, vector_shapes[name]
        if name not in VOCAB_TENSORS or len(t) != 2 or t[1:] != v[1:]:
            raise ValueError(
                f"shape mismatch: tensor {name} is {list(t)} in target ({target.tensors[name].file}) "
                f"but {list(v)} in the vector (instruct - base); only the vocabulary rows of "
                f"{' and '.join(VOCAB_TENSORS)} may differ")
    if differing and policy == "error":
        shapes = "; ".join(f"{n} {list(target.tensors[n].shape)} in target vs {list(vector_shapes[n])} "
                           "in base/instruct" for n in VOCAB_TENSORS if n in differing)
        raise ValueError(f"vocabulary differs: {shapes}; pass --embeddings skip (keep the target's "
                         "embedding rows) or --embeddings overlap (add the vector to the shared rows only)")


def _segments(
    name: str, shape: tuple[int, ...], vshape: tuple[int, ...], policy: str
) -> tuple[tuple[Segment, ...], str | None]:
    numel = 1
    for d in shape:
        numel *= d
    if name not in VOCAB_TENSORS or policy == "error" or (shape == vshape and policy != "skip"):
        return (Segment(0, numel, "merge"),), None
    if policy == "skip":
        return (Segment(0, numel, "keep"),), f"skip: kept the target's {shape[0]} rows unchanged"
    rows, width = min(shape[0], vshape[0]), shape[1]
    segs = [Segment(0, rows * width, "merge")]
    if rows < shape[0]:
        segs.append(Segment(rows * width, numel, "keep"))
    return tuple(segs), (f"overlap: vector added to rows 0..{rows - 1}; rows {rows}..{shape[0] - 1} "
                         "kept from the target" if rows < shape[0] else
                         f"overlap: vector added to all {rows} target rows (vector has {vshape[0]})")


def check_output_path(out: Path, inputs: list[Path], *, overwrite: bool, needed_bytes: int) -> None:
    """Refuses an output that exists (without ``overwrite``), overlaps an input, or does not fit."""
    out = Path(out).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or out in inp.parents or inp in out.parents:
            raise ValueError(f"output {out} overlaps input {inp}; inputs are never modified: "
                             "pick an output outside every input directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pick another output or pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + 64 * 2**20:
        raise ValueError(f"not enough disk space for {out}: needs {needed_bytes / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB free on {parent}; free space or pick another disk")
