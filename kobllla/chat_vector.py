"""Chat vector (stage 2): ``out = target + ratio * (instruct - base)``, streamed and exact.

Every output element is ``dtype(fp32(target) + ratio * (fp32(instruct) - fp32(base)))``:
inputs are widened to float32, the arithmetic is done in float32 in that order (difference,
then scale, then add), and the result is rounded once to the output dtype. The tensors are
streamed slice by slice (``chunk_elements`` at a time) from the three inputs into output
shards whose headers are laid out up front, so memory stays at a few slice buffers whatever
the model's size (safetensors inputs; torch pickles are memory-mapped a tensor at a time).

Before anything is written, the three checkpoints are checked against each other: same
architecture fields in their configs, same tensor names, same shapes, floating dtypes, intact
files, and a vocabulary policy when the target's embedding rows differ. Values are checked as
they stream: a NaN or Inf in any input, or a result outside the output dtype's range, stops
the run and removes the temporary directory, so nothing appears at ``out``.

The ChatVector paper's extract/add split is :func:`extract_chat_vector` (saves
``instruct - base`` in float32 by default, so a later :func:`apply_chat_vector` gives the same
bits as :func:`merge_chat_vector`) and :func:`apply_chat_vector`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from kobllla import __version__
from kobllla.chat_format import write_chat_stop_tokens
from kobllla.checkpoint_io import (
    Checkpoint,
    SequentialHasher,
    StreamingSafetensorsWriter,
    atomic_output_dir,
    open_checkpoint,
    plan_shards,
    write_json,
)

EmbeddingPolicy = Literal["error", "skip", "overlap"]
OutDtype = Literal["auto", "bfloat16", "float16", "float32"]
VectorDtype = Literal["float32", "bfloat16"]

EMBEDDING_POLICIES: tuple[str, ...] = ("error", "skip", "overlap")
OUT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
VOCAB_TENSORS: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
MANIFEST_NAME = "kobllla_manifest.json"
FORMULA = "out = dtype(fp32(target) + ratio * (fp32(instruct) - fp32(base)))"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}

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
    dtype: torch.dtype
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]


@dataclass
class ChatVectorResult:
    """What a run did; the same facts are in the output's ``kobllla_manifest.json``."""

    out: Path
    operation: str
    tensors: int
    output_bytes: int
    input_bytes_read: int
    seconds: float
    embeddings: dict[str, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Checks done before writing
# --------------------------------------------------------------------------------------------


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
    for (role_a, a), (role_b, b) in zip(known, known[1:]):
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


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class _Buffers:
    """One worker's slice buffers: raw bytes per input, two float32 slices, output slices."""

    def __init__(self, chunk: int) -> None:
        self.raw = {role: torch.empty(chunk * 8, dtype=torch.uint8)
                    for role in ("target", "base", "instruct", "vector")}
        self.a = torch.empty(chunk, dtype=torch.float32)
        self.b = torch.empty(chunk, dtype=torch.float32)
        self.outs: dict[torch.dtype, torch.Tensor] = {}


class _Streamer:
    """Runs tensor plans through the formula, slice by slice, in order.

    Slices are computed by ``workers`` threads, each with its own buffers, while the caller's
    thread writes finished slices in order; at most ``workers + 1`` slices are in flight, so
    memory is bounded by that many buffer sets (~30 bytes x ``chunk_elements`` each). Each
    torch op runs single-threaded: on a shared machine OpenMP's threads, descheduled by other
    jobs, made every op wait for the slowest (measured: 8x slower at load 9 on 2 cores).
    """

    def __init__(self, *, target: Checkpoint | None, base: Checkpoint | None,
                 instruct: Checkpoint | None, vector: Checkpoint | None, ratio: float,
                 chunk_elements: int, workers: int, progress, hash_files: bool) -> None:
        self.target, self.base, self.instruct, self.vector = target, base, instruct, vector
        self.ratio, self.chunk, self.progress = float(ratio), chunk_elements, progress
        self.hashers = _input_hashers([c for c in (target, base, instruct, vector) if c]) if hash_files else None
        self.depth = workers + 1
        self.free = [_Buffers(chunk_elements) for _ in range(self.depth)]
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chat-vector")
        self.bytes_read = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, plan: TensorPlan, writer: StreamingSafetensorsWriter, *, operation: str) -> None:
        pending: deque[tuple[Future, _Buffers]] = deque()
        try:
            for seg in plan.segments:
                for start in range(seg.start, seg.end, self.chunk):
                    if len(pending) == self.depth:
                        self._write_oldest(pending, plan, writer)
                    bufs = self.free.pop()
                    n = min(self.chunk, seg.end - start)
                    claims = self._claim(plan.name, start, n, self._roles(seg.mode, operation))
                    job = self.pool.submit(self._slice, plan, start, n, seg.mode, operation, bufs, claims)
                    pending.append((job, bufs))
            while pending:
                self._write_oldest(pending, plan, writer)
        except BaseException:
            for job, bufs in pending:
                job.cancel()
            wait([job for job, _ in pending])
            self.free.extend(bufs for _, bufs in pending)
            raise

    def _write_oldest(self, pending: deque, plan: TensorPlan, writer: StreamingSafetensorsWriter) -> None:
        job, bufs = pending[0]
        out, nread = job.result()
        pending.popleft()
        writer.write(plan.name, out)
        self.free.append(bufs)
        self.bytes_read += nread
        if self.progress is not None:
            self.progress.update(nread)

    def _claim(self, name: str, start: int, n: int, roles: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """The input byte ranges this slice will hash, claimed in read order (main thread), so
        that the workers hash each file in order, in parallel with the other files."""
        if self.hashers is None:
            return []
        claims = []
        for role in roles:
            info = getattr(self, role).tensors[name]
            if info.offset is not None:
                offset, nbytes = info.offset + start * info.dtype.itemsize, n * info.dtype.itemsize
                if self.hashers[info.file].claim(offset, nbytes):
                    claims.append((role, offset, nbytes))
        return claims

    def _hash_claims(self, name: str, claims: list[tuple[str, int, int]], bufs: _Buffers) -> None:
        for role, offset, nbytes in claims:
            file = getattr(self, role).tensors[name].file
            self.hashers[file].feed_in_turn(offset, bufs.raw[role][:nbytes].numpy().data)

    def _read(self, role: str, name: str, start: int, n: int, bufs: _Buffers) -> torch.Tensor:
        return getattr(self, role).read_slice(name, start, n, bufs.raw[role])

    def _slice(self, plan: TensorPlan, start: int, n: int, mode: str, operation: str,
               bufs: _Buffers, claims: list[tuple[str, int, int]]) -> tuple[torch.Tensor, int]:
        """Computes one output slice and hashes the input bytes it read (in turn with the
        other workers); returns the slice (a view of ``bufs``) and the bytes read."""
        try:
            out, nread = self._compute(plan, start, n, mode, operation, bufs)
            self._hash_claims(plan.name, claims, bufs)
        except BaseException:
            for role, _, _ in claims:  # later slices must not wait for bytes that never come
                self.hashers[getattr(self, role).tensors[plan.name].file].abandon()
            raise
        return out, nread

    def _compute(self, plan: TensorPlan, start: int, n: int, mode: str, operation: str,
                 bufs: _Buffers) -> tuple[torch.Tensor, int]:
        a, b = bufs.a[:n], bufs.b[:n]
        roles = self._roles(mode, operation)
        if mode == "keep":
            a.copy_(self._read("target", plan.name, start, n, bufs))
        else:
            if self.vector is not None:
                a.copy_(self._read("vector", plan.name, start, n, bufs))
            else:
                a.copy_(self._read("instruct", plan.name, start, n, bufs))
                b.copy_(self._read("base", plan.name, start, n, bufs))
                a.sub_(b)
            if operation != "extract":
                if self.ratio != 1.0:  # x * 1.0 == x exactly, so skipping it changes no bit
                    a.mul_(self.ratio)
                b.copy_(self._read("target", plan.name, start, n, bufs))
                a.add_(b)
        out = self._round(a, plan.dtype, bufs)
        _check_finite(a, out, lambda: self._diagnose(plan, start, n, a, out, roles, bufs))
        nread = sum(n * getattr(self, r).tensors[plan.name].dtype.itemsize for r in roles)
        return out, nread

    def _roles(self, mode: str, operation: str) -> tuple[str, ...]:
        roles: tuple[str, ...] = ()
        if mode == "merge":
            roles = ("vector",) if self.vector is not None else ("instruct", "base")
        return roles + (("target",) if operation != "extract" else ())

    def _round(self, a: torch.Tensor, dtype: torch.dtype, bufs: _Buffers) -> torch.Tensor:
        if dtype == torch.float32:
            return a
        if dtype not in bufs.outs:
            bufs.outs[dtype] = torch.empty(self.chunk, dtype=dtype)
        return bufs.outs[dtype][: a.numel()].copy_(a)

    def _diagnose(self, plan: TensorPlan, start: int, n: int, a: torch.Tensor,
                  out: torch.Tensor, roles: tuple[str, ...], bufs: _Buffers) -> None:
        for role in roles:
            ckpt = getattr(self, role)
            part = self._read(role, plan.name, start, n, bufs).float()
            bad = (~torch.isfinite(part)).nonzero()
            if bad.numel():
                idx = start + int(bad[0])
                raise ValueError(
                    f"non-finite value in {role}: tensor {plan.name} in {ckpt.tensors[plan.name].file} "
                    f"has {float(part[int(bad[0])])} at flat index {idx}{_row_col(plan.shape, idx)}; "
                    "repair or re-export that checkpoint")
        bad = (~torch.isfinite(out.float())).nonzero()
        if bad.numel():
            idx = start + int(bad[0])
            raise ValueError(
                f"result overflows {_DTYPE_NAMES[plan.dtype]}: tensor {plan.name} at flat index {idx}"
                f"{_row_col(plan.shape, idx)} is {float(a[int(bad[0])])} in float32; "
                "use --dtype float32 or a smaller --ratio")


def _input_hashers(cks: list[Checkpoint]) -> dict[Path, SequentialHasher]:
    hashers = {}
    for ck in cks:
        for f in ck.files:
            offsets = [t.offset for t in ck.tensors.values() if t.file == f and t.offset is not None]
            hashers[f] = SequentialHasher(f, prime=min(offsets, default=0))
    return hashers


def _row_col(shape: tuple[int, ...], idx: int) -> str:
    if len(shape) != 2:
        return ""
    return f" (row {idx // shape[1]}, column {idx % shape[1]})"


def _check_finite(a: torch.Tensor, out: torch.Tensor, diagnose) -> None:
    """One reduction per slice: NaN fails both comparisons, Inf or an out-of-range value
    fails one; only then the slow path looks for the culprit (and may find none when a
    value just above the dtype's max rounded down to it)."""
    lo, hi = torch.aminmax(a)
    limit = torch.finfo(out.dtype).max
    if -limit <= float(lo) and float(hi) <= limit:
        return
    diagnose()


# --------------------------------------------------------------------------------------------
# Metadata files and manifest
# --------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "added_tokens.json",
                    "original/tokenizer.model")


def copy_model_files(out: Path, *, target: Path, chat: Path, out_dtype: str | None,
                     vocab_rows: int | None) -> dict[str, str]:
    """Writes config/generation/tokenizer files; returns ``{file: where it came from}``.

    The vocabulary (tokenizer.json, tokenizer.model) comes from the target, whose embedding
    rows it indexes; what makes a chat model (chat template, eos ``<|eot_id|>``, generation
    settings) comes from ``chat`` (the instruct model, or a saved vector that carries its files).
    """
    sources: dict[str, str] = {}
    first_choice = [(rel, ("target", target), ("instruct", chat)) for rel in _TOKENIZER_FILES]
    first_choice += [(rel, ("instruct", chat), ("target", target))
                     for rel in ("generation_config.json", "chat_template.jinja")]
    for rel, *candidates in first_choice:
        for label, root in candidates:
            if (root / rel).is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, out / rel)
                sources[rel] = label
                break
    sources.update(_write_config(out, target=target, chat=chat, out_dtype=out_dtype, vocab_rows=vocab_rows))
    for rel in ("tokenizer_config.json", "special_tokens_map.json"):
        merged = _merge_tokenizer_json(target / rel, chat / rel)
        if merged is not None:
            write_json(out / rel, merged[0])
            sources[rel] = merged[1]
    return sources


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_config(out: Path, *, target: Path, chat: Path, out_dtype: str | None,
                  vocab_rows: int | None) -> dict[str, str]:
    tcfg, ccfg = _load(target / "config.json"), _load(chat / "config.json")
    if tcfg is None and ccfg is None:
        return {}
    cfg = dict(tcfg if tcfg is not None else ccfg)
    where = "target" if tcfg is not None else "instruct"
    if ccfg is not None and tcfg is not None:
        for key in ("eos_token_id", "bos_token_id"):
            if key in ccfg:
                cfg[key] = ccfg[key]
        where += " (eos_token_id, bos_token_id from instruct)"
    if vocab_rows is not None and cfg.get("vocab_size") != vocab_rows:
        cfg["vocab_size"] = vocab_rows
        where += f" (vocab_size set to the target's {vocab_rows} rows)"
    if out_dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = out_dtype
    write_json(out / "config.json", cfg)
    return {"config.json": where}


def _merge_tokenizer_json(target_file: Path, chat_file: Path) -> tuple[dict, str] | None:
    tdata, cdata = _load(target_file), _load(chat_file)
    if tdata is None:
        return (cdata, "instruct") if cdata is not None else None
    if cdata is None:
        return tdata, "target"
    taken = [k for k in ("chat_template", "eos_token") if k in cdata]
    return {**tdata, **{k: cdata[k] for k in taken}}, f"target ({', '.join(taken)} from instruct)"


def describe_input(ckpt: Checkpoint, *, hashes: dict[Path, SequentialHasher] | None) -> dict:
    files = []
    for f in ckpt.files:
        entry = {"file": f.name, "bytes": f.stat().st_size}
        if hashes is not None:
            entry["sha256"] = hashes[f].finish()
        files.append(entry)
    return {"path": str(ckpt.path.resolve()), "format": ckpt.format, "tensors": len(ckpt.tensors),
            "files": files}


def _versions() -> dict[str, str]:
    import safetensors
    return {"kobllla": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": sys.version.split()[0]}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                file=sys.stderr, mininterval=0.5)


def _is_saved_vector(path: Path) -> bool:
    manifest = Path(path) / MANIFEST_NAME
    return manifest.is_file() and (_load(manifest) or {}).get("operation") == "extract"


def _open_all(paths: dict[str, Path]) -> dict[str, Checkpoint]:
    """Opens model checkpoints (refusing a saved vector passed as a model) and checks dtypes."""
    for role, p in paths.items():
        if _is_saved_vector(p):
            raise ValueError(f"--{role} {p} is a chat vector saved by --save-vector, not a model; "
                             "pass it as --vector")
    opened: dict[str, Checkpoint] = {}
    try:
        for role, p in paths.items():
            opened[role] = open_checkpoint(p)
        for role, ck in opened.items():
            check_floating(ck, role)
    except BaseException:
        for ck in opened.values():
            ck.close()
        raise
    return opened


def default_workers() -> int:
    """One worker per usable core, at most 8 (the setting measured at the 8B shape on 16 cores)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class StreamOptions:
    """How to write: see :func:`merge_chat_vector` for each field."""

    overwrite: bool = False
    max_shard_bytes: int = 5 * 2**30
    chunk_elements: int = 1 << 20
    workers: int = 2
    progress: bool = False
    hash_files: bool = True

    def check(self) -> None:
        if self.chunk_elements <= 0 or self.workers <= 0 or self.max_shard_bytes <= 0:
            raise ValueError(f"chunk_elements, workers and max_shard_bytes must be positive, got "
                             f"{self.chunk_elements}, {self.workers}, {self.max_shard_bytes}")


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream_to(
    out: Path, *, cks: dict[str, Checkpoint], plans: list[TensorPlan], operation: str,
    ratio: float, opts: StreamOptions, shard_metadata: dict[str, str], finish,
) -> ChatVectorResult:
    """Streams every plan into shards under ``out`` (atomically); ``finish(tmp)`` writes the
    metadata files and returns the manifest, which is written last. Input files are hashed
    from the bytes the merge reads and output files from the bytes it writes."""
    started = time.perf_counter()
    shards = plan_shards([(p.name, p.dtype, p.shape) for p in plans],
                         max_shard_bytes=opts.max_shard_bytes, metadata=shard_metadata)
    bar = _progress_bar(_bytes_to_read(cks, plans, operation), opts.progress, operation)
    streamer = _Streamer(target=cks.get("target"), base=cks.get("base"), instruct=cks.get("instruct"),
                         vector=cks.get("vector"), ratio=ratio, chunk_elements=opts.chunk_elements,
                         workers=opts.workers, progress=bar, hash_files=opts.hash_files)
    try:
        with atomic_output_dir(out, overwrite=opts.overwrite) as tmp, _single_threaded_ops():
            paths, out_hashes = _write_shards(tmp, shards, plans, streamer, operation)
            manifest = finish(tmp)
            manifest["inputs"] = {role: describe_input(ck, hashes=streamer.hashers) for role, ck in cks.items()}
            manifest["outputs"] = [{"file": p.name, "bytes": p.stat().st_size,
                                    **({"sha256": out_hashes[p.name]} if opts.hash_files else {})}
                                   for p in paths]
            manifest["seconds"] = round(time.perf_counter() - started, 3)
            manifest["versions"] = _versions()
            write_json(tmp / MANIFEST_NAME, manifest)  # last: its presence says the output is whole
    finally:
        streamer.close()
        if bar is not None:
            bar.close()
    return ChatVectorResult(out=Path(out), operation=operation, tensors=len(plans),
                            output_bytes=sum(s.data_bytes for s in shards),
                            input_bytes_read=streamer.bytes_read, seconds=manifest["seconds"],
                            manifest=manifest)


def _write_shards(tmp: Path, shards: list, plans: list[TensorPlan], streamer: _Streamer,
                  operation: str) -> tuple[list[Path], dict[str, str]]:
    """Returns the shard paths and their sha256 (computed as they were written)."""
    by_name = {p.name: p for p in plans}
    writer = StreamingSafetensorsWriter(tmp, shards)
    try:
        for name in writer.order:
            streamer.run(by_name[name], writer, operation=operation)
        return writer.close(), writer.sha256
    except BaseException:
        writer.abort()
        raise


def _bytes_to_read(cks: dict[str, Checkpoint], plans: list[TensorPlan], operation: str) -> int:
    total = 0
    vector_roles = ["vector"] if "vector" in cks else ["base", "instruct"]
    for p in plans:
        for seg in p.segments:
            n = seg.end - seg.start
            roles = (["target"] if operation != "extract" else []) + (vector_roles if seg.mode == "merge" else [])
            total += sum(n * cks[r].tensors[p.name].dtype.itemsize for r in roles)
    return total


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or ratio != ratio or abs(ratio) == float("inf"):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")


def _close_all(cks: dict[str, Checkpoint]) -> None:
    for ck in cks.values():
        ck.close()


def merge_chat_vector(
    *, base: Path, instruct: Path, target: Path, out: Path, ratio: float = 1.0,
    embeddings: EmbeddingPolicy = "error", dtype: OutDtype = "auto", overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30, chunk_elements: int = 1 << 20, workers: int | None = None,
    progress: bool = False, hash_files: bool = True,
) -> ChatVectorResult:
    """Writes ``target + ratio * (instruct - base)`` to ``out`` as HF sharded safetensors.

    Args:
        base (Path): the model the instruct model was tuned from (e.g. Meta-Llama-3-8B).
        instruct (Path): the chat model (e.g. Meta-Llama-3-8B-Instruct).
        target (Path): the model to give the chat ability (e.g. the Korean-trained base).
        out (Path): output directory, built in a temporary sibling and renamed when whole.
        ratio (float): scale of the vector (0 gives the target's values back).
        embeddings (EmbeddingPolicy): when the target's vocabulary rows differ: ``error``,
            ``skip`` (keep the target's embedding/lm_head) or ``overlap`` (shared rows only).
        dtype (OutDtype): output dtype; ``auto`` keeps each target tensor's dtype.
        overwrite (bool): replace an existing ``out``.
        max_shard_bytes (int): output shard size.
        chunk_elements (int): elements per streamed slice; memory is about
            ``(workers + 1) x 30 bytes x chunk_elements`` (1M: ~100 MB with 2 workers).
        workers (int | None): threads reading, computing and hashing slices (each torch op
            single-threaded); None: :func:`default_workers`.
        progress (bool): show a progress bar (bytes read, GB/s) on stderr.
        hash_files (bool): record sha256 of every input and output file in the manifest.

    Returns:
        ChatVectorResult: counts, timing, the embedding notes and the manifest.

    Raises:
        FileNotFoundError: an input is missing or holds no weights.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: any check in the module docstring fails; nothing is left at ``out``.
    """
    _check_ratio(ratio)
    opts = StreamOptions(overwrite, max_shard_bytes, chunk_elements,
                         default_workers() if workers is None else workers, progress, hash_files)
    opts.check()
    cks = _open_all({"base": Path(base), "instruct": Path(instruct), "target": Path(target)})
    try:
        notes = check_same_architecture(cks)
        check_same_tensors(cks["base"], "base", cks["instruct"], "instruct")
        check_same_tensors(cks["instruct"], "instruct", cks["target"], "target")
        check_vector_shapes(cks["base"], cks["instruct"])
        vshapes = {n: i.shape for n, i in cks["base"].tensors.items()}
        return _merge_into(out, cks=cks, vshapes=vshapes, chat_dir=Path(instruct), notes=notes,
                           operation="merge", ratio=ratio, embeddings=embeddings, dtype=dtype, opts=opts)
    finally:
        _close_all(cks)


def _merge_into(out: Path, *, cks: dict[str, Checkpoint], vshapes: dict[str, tuple[int, ...]],
                chat_dir: Path, notes: list[str], operation: str, ratio: float,
                embeddings: EmbeddingPolicy, dtype: OutDtype, opts: StreamOptions) -> ChatVectorResult:
    plans, emb_notes = plan_tensors(cks["target"], vshapes, embeddings=embeddings, dtype=dtype)
    check_output_path(out, [ck.path for ck in cks.values()], overwrite=opts.overwrite,
                      needed_bytes=sum(_nbytes(p) for p in plans))
    out_dtypes = sorted({_DTYPE_NAMES[p.dtype] for p in plans})
    embed = cks["target"].tensors.get(VOCAB_TENSORS[0])

    def finish(tmp: Path) -> dict:
        files = copy_model_files(tmp, target=cks["target"].path, chat=chat_dir,
                                 out_dtype=out_dtypes[0] if len(out_dtypes) == 1 else None,
                                 vocab_rows=embed.shape[0] if embed is not None else None)
        # The result is a chat model whatever the instruct checkpoint's eos said: Meta's stop settings.
        for rel in write_chat_stop_tokens(tmp):
            files[rel] = files.get(rel, "target") + " (eos set to <|eot_id|>, kobllla.chat_format)"
        return {"tool": "kobllla.chat_vector", "operation": operation, "formula": FORMULA,
                "ratio": ratio, "dtype": dtype, "output_dtypes": out_dtypes,
                "embeddings": {"policy": embeddings, "tensors": emb_notes},
                "files_from": files, "notes": notes}

    meta = {"kobllla.operation": operation, "kobllla.ratio": repr(float(ratio)), "kobllla.embeddings": embeddings}
    result = _stream_to(out, cks=cks, plans=plans, operation=operation, ratio=ratio, opts=opts,
                        shard_metadata=meta, finish=finish)
    result.embeddings = emb_notes
    return result


def _nbytes(plan: TensorPlan) -> int:
    return plan.segments[-1].end * plan.dtype.itemsize


def extract_chat_vector(
    *, base: Path, instruct: Path, out: Path, dtype: VectorDtype = "float32",
    overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, chunk_elements: int = 1 << 20,
    workers: int | None = None, progress: bool = False, hash_files: bool = True,
) -> ChatVectorResult:
    """Saves ``fp32(instruct) - fp32(base)`` to ``out``, with the instruct model's config and
    tokenizer files, for :func:`apply_chat_vector` to add to one target or many.

    ``dtype="float32"`` (default) stores the difference exactly as the one-shot merge computes
    it, so apply gives the same bits as :func:`merge_chat_vector` (8B: 32 GB on disk);
    ``bfloat16`` halves that but rounds the difference once more, so results differ slightly.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: as :func:`merge_chat_vector`.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown vector dtype {dtype!r}; choose 'float32' or 'bfloat16'")
    opts = StreamOptions(overwrite, max_shard_bytes, chunk_elements,
                         default_workers() if workers is None else workers, progress, hash_files)
    opts.check()
    cks = _open_all({"base": Path(base), "instruct": Path(instruct)})
    try:
        notes = check_same_architecture(cks)
        check_same_tensors(cks["base"], "base", cks["instruct"], "instruct")
        check_vector_shapes(cks["base"], cks["instruct"])
        plans = [TensorPlan(n, OUT_DTYPES[dtype], i.shape, (Segment(0, i.numel, "merge"),))
                 for n, i in cks["instruct"].tensors.items()]
        check_output_path(out, [ck.path for ck in cks.values()], overwrite=overwrite,
                          needed_bytes=sum(_nbytes(p) for p in plans))

        def finish(tmp: Path) -> dict:
            return {"tool": "kobllla.chat_vector", "operation": "extract",
                    "formula": "vector = dtype(fp32(instruct) - fp32(base))", "dtype": dtype,
                    "files_from": _copy_chat_files(tmp, Path(instruct)), "notes": notes}

        return _stream_to(out, cks=cks, plans=plans, operation="extract", ratio=1.0, opts=opts,
                          shard_metadata={"kobllla.operation": "extract"}, finish=finish)
    finally:
        _close_all(cks)


def _copy_chat_files(out: Path, instruct: Path) -> dict[str, str]:
    copied = {}
    for rel in ("config.json", "params.json", "generation_config.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja") + _TOKENIZER_FILES:
        if (instruct / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(instruct / rel, out / rel)
            copied[rel] = "instruct"
    return copied


def open_vector(path: Path) -> Checkpoint:
    """Opens a vector saved by :func:`extract_chat_vector` (refuses a plain model dir)."""
    if not _is_saved_vector(path):
        raise ValueError(f"{path} is not a chat vector saved by --save-vector (no {MANIFEST_NAME} "
                         "with operation 'extract'); pass --base and --instruct instead, or save one first")
    return open_checkpoint(Path(path))


def apply_chat_vector(
    *, vector: Path, target: Path, out: Path, ratio: float = 1.0,
    embeddings: EmbeddingPolicy = "error", dtype: OutDtype = "auto", overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30, chunk_elements: int = 1 << 20, workers: int | None = None,
    progress: bool = False, hash_files: bool = True,
) -> ChatVectorResult:
    """Writes ``target + ratio * vector`` for a vector from :func:`extract_chat_vector`.

    With a float32 vector the output is bit-identical to :func:`merge_chat_vector` on the
    same inputs. Args, returns and raises as :func:`merge_chat_vector`.
    """
    _check_ratio(ratio)
    opts = StreamOptions(overwrite, max_shard_bytes, chunk_elements,
                         default_workers() if workers is None else workers, progress, hash_files)
    opts.check()
    vec = open_vector(Path(vector))
    try:
        cks = {"vector": vec, **_open_all({"target": Path(target)})}
    except BaseException:
        vec.close()
        raise
    try:
        notes = check_same_architecture(cks)
        check_same_tensors(vec, "vector", cks["target"], "target")
        vshapes = {n: i.shape for n, i in vec.tensors.items()}
        return _merge_into(out, cks=cks, vshapes=vshapes, chat_dir=Path(vector), notes=notes,
                           operation="apply", ratio=ratio, embeddings=embeddings, dtype=dtype, opts=opts)
    finally:
        _close_all(cks)
