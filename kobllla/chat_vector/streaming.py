"""The streaming core: tensor plans run through the formula slice by slice, computed and
hashed by worker threads, written in order by the caller's thread."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from kobllla.chat_vector.checks import DTYPE_NAMES, TensorPlan
from kobllla.checkpoint_io import Checkpoint, SequentialHasher, StreamingSafetensorsWriter


class _Buffers:
    """One worker's slice buffers: raw bytes per input, two float32 slices, output slices."""

    def __init__(self, chunk: int) -> None:
        self.raw = {role: torch.empty(chunk * 8, dtype=torch.uint8)
                    for role in ("target", "base", "instruct", "vector")}
        self.a = torch.empty(chunk, dtype=torch.float32)
        self.b = torch.empty(chunk, dtype=torch.float32)
        self.outs: dict[torch.dtype, torch.Tensor] = {}


class Streamer:
    """Runs tensor plans through the formula, slice by slice, in order.

    Slices are computed by ``workers`` threads, each with its own buffers, while the caller's
    thread writes finished slices in order; at most ``workers + 1`` slices are in flight, so
    memory is bounded by that many buffer sets (~42 bytes x ``chunk_elements`` each). Each
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


def _check_finite(a: torch.Tensor, out: torch.Tensor, diagnose) -> None:
    """One reduction per slice: NaN fails both comparisons, Inf or an out-of-range value
    fails one; only then the slow path looks for the culprit (and may find none when a
    value just above the dtype's max rounded down to it)."""
    lo, hi = torch.aminmax(a)
    limit = torch.finfo(out.dtype).max
    if -limit <= float(lo) and float(hi) <= limit:
        return
    diagnose()
