"""The streaming core: tensor plans run through the formula slice by slice, computed and
hashed by worker threads, written in order by the caller's thread.

The arithmetic is numpy's float32, the same IEEE operations in the same order as the torch
code it replaced (``a = i; a -= b; a *= f32(ratio); a += t``; each op rounded once, no fused
multiply-add), so the output bits are the same. numpy has no bfloat16: its bits are held as
``uint16``, widened by a 16-bit shift and rounded to nearest even with integer ops (torch's
rule). No torch is imported for safetensors inputs.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from kobllla.chat_vector.checks import DTYPE_NAMES, TensorPlan
from kobllla.checkpoint_io import Checkpoint, DType, SequentialHasher, StreamingSafetensorsWriter

_LIMITS = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max),
           "float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38}

_SIXTEEN, _ONE, _BIAS = np.uint32(16), np.uint32(1), np.uint32(0x7FFF)


class _Buffers:
    """One worker's slice buffers: raw bytes per input, two float32 slices, output slices."""

    def __init__(self, chunk: int) -> None:
        self.raw = {role: np.empty(chunk * 8, dtype=np.uint8) for role in ("target", "base", "instruct", "vector")}
        self.a = np.empty(chunk, dtype=np.float32)
        self.b = np.empty(chunk, dtype=np.float32)
        self.outs: dict[DType, np.ndarray] = {}


def widen(x: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
    """``out[:] = float32(x)`` for stored bits ``x`` of ``dtype`` (float64 rounds to nearest even,
    as torch's ``copy_``; the others are exact); returns ``out``."""
    if dtype.name == "bfloat16":  # two plain passes beat one shift with a cast (measured: 0.13 vs 0.18 ms/M)
        wide = out.view(np.uint32)
        np.copyto(wide, x)
        np.left_shift(wide, _SIXTEEN, out=wide)
    else:
        np.copyto(out, x, casting="same_kind")
    return out


def to_bfloat16(a: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """bfloat16 bits (``uint16`` ``out``) of float32 ``a``, rounded to nearest even as torch does
    (``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``; overflow carries into the exponent: inf);
    ``scratch`` is a float32 or uint32 array of ``a``'s size, overwritten. NaN is not kept
    (the caller refuses any non-finite result)."""
    u, s = a.view(np.uint32), scratch.view(np.uint32)
    np.right_shift(u, _SIXTEEN, out=s)
    np.bitwise_and(s, _ONE, out=s)
    np.add(s, _BIAS, out=s)
    np.add(s, u, out=s)
    np.right_shift(s, _SIXTEEN, out=s)
    np.copyto(out, s, casting="same_kind")  # faster than a shift that casts on output (measured)
    return out


class Streamer:
    """Runs tensor plans through the formula, slice by slice, in order.

    Slices are computed by ``workers`` threads, each with its own buffers, while the caller's
    thread writes finished slices in order; at most ``workers + 1`` slices are in flight, so
    memory is bounded by that many buffer sets (~42 bytes x ``chunk_elements`` each). Each
    numpy op runs on its worker's thread alone (numpy releases the GIL in them, and in preadv and
    sha256): no op waits on a pool of threads that other jobs may have descheduled (measured
    with torch's OpenMP ops: 8x slower at load 9 on 2 cores).
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
            for job, _ in pending:
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
            self.hashers[file].feed_in_turn(offset, bufs.raw[role][:nbytes].data)

    def _read(self, role: str, name: str, start: int, n: int, bufs: _Buffers) -> np.ndarray:
        return getattr(self, role).read_array(name, start, n, bufs.raw[role])

    def _read_f32(self, role: str, name: str, start: int, n: int, bufs: _Buffers, out: np.ndarray) -> np.ndarray:
        """The slice as float32: a view of the read bytes when stored as float32 (``out`` is
        then untouched), else widened into ``out``."""
        dtype = getattr(self, role).tensors[name].dtype
        raw = self._read(role, name, start, n, bufs)
        return raw if dtype.name == "float32" else widen(raw, dtype, out)

    def _load_f32(self, role: str, name: str, start: int, n: int, bufs: _Buffers, out: np.ndarray) -> np.ndarray:
        """The slice as float32 in ``out`` (a copy: the read bytes stay intact for hashing)."""
        dtype = getattr(self, role).tensors[name].dtype
        return widen(self._read(role, name, start, n, bufs), dtype, out)

    def _slice(self, plan: TensorPlan, start: int, n: int, mode: str, operation: str,
               bufs: _Buffers, claims: list[tuple[str, int, int]]) -> tuple[np.ndarray, int]:
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
                 bufs: _Buffers) -> tuple[np.ndarray, int]:
        """``a = f32(i) - f32(b)`` (or ``f32(vector)``), ``a *= f32(ratio)`` unless ratio is 1,
        ``a += f32(t)``, rounded once to the plan's dtype; the raw input bytes stay intact
        for hashing. numpy's overflow warnings are silenced: the range check below refuses."""
        a, b = bufs.a[:n], bufs.b[:n]
        name, roles = plan.name, self._roles(mode, operation)
        with np.errstate(all="ignore"):
            if mode == "keep":
                self._load_f32("target", name, start, n, bufs, a)
            else:
                first = "vector" if self.vector is not None else "instruct"
                self._load_f32(first, name, start, n, bufs, a)
                if self.vector is None:
                    np.subtract(a, self._read_f32("base", name, start, n, bufs, b), out=a)
                if operation != "extract":
                    if self.ratio != 1.0:  # x * 1.0 == x exactly, so skipping it changes no bit
                        np.multiply(a, np.float32(self.ratio), out=a)  # torch's f32 tensor * scalar
                    np.add(a, self._read_f32("target", name, start, n, bufs, b), out=a)
            out = self._round(a, plan.dtype, bufs)
        if not _in_range(a, plan.dtype):
            self._diagnose(plan, start, n, a, out, roles, bufs)
        nread = sum(n * getattr(self, r).tensors[name].dtype.itemsize for r in roles)
        return out, nread

    def _roles(self, mode: str, operation: str) -> tuple[str, ...]:
        roles: tuple[str, ...] = ()
        if mode == "merge":
            roles = ("vector",) if self.vector is not None else ("instruct", "base")
        return roles + (("target",) if operation != "extract" else ())

    def _round(self, a: np.ndarray, dtype: DType, bufs: _Buffers) -> np.ndarray:
        """``a`` in ``dtype``'s stored bits, in this worker's output buffer (``bufs.b`` is
        scratch for bfloat16)."""
        if dtype.name == "float32":
            return a
        if dtype not in bufs.outs:
            bufs.outs[dtype] = np.empty(self.chunk, dtype=dtype.numpy)
        out = bufs.outs[dtype][:a.size]
        if dtype.name == "bfloat16":
            return to_bfloat16(a, out, bufs.b[:a.size])
        np.copyto(out, a, casting="same_kind")
        return out

    def _diagnose(self, plan: TensorPlan, start: int, n: int, a: np.ndarray,
                  out: np.ndarray, roles: tuple[str, ...], bufs: _Buffers) -> None:
        for role in roles:
            ckpt = getattr(self, role)
            part = widen(self._read(role, plan.name, start, n, bufs), ckpt.tensors[plan.name].dtype,
                         np.empty(n, dtype=np.float32))
            bad = np.flatnonzero(~np.isfinite(part))
            if bad.size:
                idx = start + int(bad[0])
                raise ValueError(
                    f"non-finite value in {role}: tensor {plan.name} in {ckpt.tensors[plan.name].file} "
                    f"has {float(part[int(bad[0])])} at flat index {idx}{_row_col(plan.shape, idx)}; "
                    "repair or re-export that checkpoint")
        with np.errstate(all="ignore"):
            wide = widen(out, plan.dtype, np.empty(n, dtype=np.float32)) if plan.dtype.name != "float64" else out
        bad = np.flatnonzero(~np.isfinite(wide))
        if bad.size:
            idx = start + int(bad[0])
            raise ValueError(
                f"result overflows {DTYPE_NAMES[plan.dtype]}: tensor {plan.name} at flat index {idx}"
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


def _in_range(a: np.ndarray, dtype: DType) -> bool:
    """Two reductions per slice: NaN fails both comparisons, Inf or an out-of-range value
    fails one; only then the slow path looks for the culprit (and may find none when a
    value just above the dtype's max rounded down to it)."""
    limit = _LIMITS[dtype.name]
    return -limit <= float(a.min()) and float(a.max()) <= limit
