"""The three entry points (merge, extract, apply) and the one options object they share."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kobllla.atomic import atomic_output_dir, write_json
from kobllla.chat_format import write_chat_stop_tokens
from kobllla.chat_vector.checks import (
    DTYPE_NAMES,
    OUT_DTYPES,
    VOCAB_TENSORS,
    EmbeddingPolicy,
    OutDtype,
    Segment,
    TensorPlan,
    VectorDtype,
    check_floating,
    check_output_path,
    check_same_architecture,
    check_same_tensors,
    check_vector_shapes,
    plan_tensors,
)
from kobllla.chat_vector.files import (
    MANIFEST_NAME,
    copy_chat_files,
    copy_model_files,
    describe_input,
    is_saved_vector,
    versions,
)
from kobllla.chat_vector.streaming import Streamer
from kobllla.checkpoint_io import Checkpoint, StreamingSafetensorsWriter, open_checkpoint, plan_shards

FORMULA = "out = dtype(fp32(target) + ratio * (fp32(instruct) - fp32(base)))"


def default_workers() -> int:
    """One worker per usable core, at most 8 (the setting measured at the 8B shape on 16 cores)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class ChatVectorOptions:
    """How to merge and write: one object for all three entry points (mergekit's ``MergeOptions``
    pattern); ``tools.chat_vector``'s flags map onto these fields one to one.

    Attributes:
        ratio (float): scale of the vector (0 gives the target's values back). Merge and apply.
        embeddings (EmbeddingPolicy): when the target's vocabulary rows differ: ``error``,
            ``skip`` (keep the target's embedding/lm_head) or ``overlap`` (shared rows only).
            Merge and apply.
        dtype (OutDtype): output dtype; ``auto`` keeps each target tensor's dtype. Merge and apply.
        vector_dtype (VectorDtype): dtype of a saved vector. Extract: ``float32`` stores the
            difference exactly as the one-shot merge computes it, so apply gives the same bits as
            merge (8B: 32 GB on disk); ``bfloat16`` halves that but rounds the difference once more.
        overwrite (bool): replace an existing ``out``.
        max_shard_bytes (int): output shard size.
        chunk_elements (int): elements per streamed slice; memory is about
            ``(workers + 1) x 42 bytes x chunk_elements`` (1M: ~0.4 GB with 8 workers).
        workers (int | None): threads reading, computing and hashing slices (each numpy op
            single-threaded); None: :func:`default_workers`.
        progress (bool): show a progress bar (bytes read, GB/s) on stderr.
        hash_files (bool): record sha256 of every input and output file in the manifest (inputs
            are hashed from the bytes the merge reads, by the workers, so nothing is read twice).
    """

    ratio: float = 1.0
    embeddings: EmbeddingPolicy = "error"
    dtype: OutDtype = "auto"
    vector_dtype: VectorDtype = "float32"
    overwrite: bool = False
    max_shard_bytes: int = 5 * 2**30
    chunk_elements: int = 1 << 20
    workers: int | None = None
    progress: bool = False
    hash_files: bool = True

    def check(self) -> None:
        """Raises ``ValueError`` naming the first field out of range."""
        r = self.ratio
        if not isinstance(r, (int, float)) or r != r or abs(r) == float("inf"):
            raise ValueError(f"ratio must be a finite number, got {r!r}")
        if self.vector_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unknown vector dtype {self.vector_dtype!r}; choose 'float32' or 'bfloat16'")
        for name, value, flag in (("workers", self.thread_count, "--workers"),
                                  ("max_shard_bytes", self.max_shard_bytes, "--max-shard-gb"),
                                  ("chunk_elements", self.chunk_elements, None)):
            if value <= 0:
                raise ValueError(f"{name}{f' ({flag})' if flag else ''} must be positive, got {value}")

    @property
    def thread_count(self) -> int:
        return default_workers() if self.workers is None else self.workers


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


def merge_chat_vector(*, base: Path, instruct: Path, target: Path, out: Path,
                      options: ChatVectorOptions | None = None) -> ChatVectorResult:
    """Writes ``target + ratio * (instruct - base)`` to ``out`` as HF sharded safetensors.

    Args:
        base (Path): the model the instruct model was tuned from (e.g. Meta-Llama-3-8B).
        instruct (Path): the chat model (e.g. Meta-Llama-3-8B-Instruct).
        target (Path): the model to give the chat ability (e.g. the Korean-trained base).
        out (Path): output directory, built in a temporary sibling and renamed when whole.
        options (ChatVectorOptions | None): ratio, vocabulary policy, dtype and how to write
            (None: the defaults).

    Returns:
        ChatVectorResult: counts, timing, the embedding notes and the manifest.

    Raises:
        FileNotFoundError: an input is missing or holds no weights.
        FileExistsError: ``out`` exists and ``options.overwrite`` is False.
        ValueError: any check in the package docstring fails; nothing is left at ``out``.
    """
    options = _checked(options)
    cks = _open_all({"base": Path(base), "instruct": Path(instruct), "target": Path(target)})
    try:
        notes = check_same_architecture(cks)
        check_same_tensors(cks["base"], "base", cks["instruct"], "instruct")
        check_same_tensors(cks["instruct"], "instruct", cks["target"], "target")
        check_vector_shapes(cks["base"], cks["instruct"])
        vshapes = {n: i.shape for n, i in cks["base"].tensors.items()}
        return _merge_into(out, cks=cks, vshapes=vshapes, chat_dir=Path(instruct), notes=notes,
                           operation="merge", opts=options)
    finally:
        _close_all(cks)


def extract_chat_vector(*, base: Path, instruct: Path, out: Path,
                        options: ChatVectorOptions | None = None) -> ChatVectorResult:
    """Saves ``fp32(instruct) - fp32(base)`` to ``out`` in ``options.vector_dtype``, with the
    instruct model's config and tokenizer files, for :func:`apply_chat_vector` to add to one
    target or many (``ratio``, ``embeddings`` and ``dtype`` apply there, not here).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: as :func:`merge_chat_vector`.
    """
    options = _checked(options)
    cks = _open_all({"base": Path(base), "instruct": Path(instruct)})
    try:
        notes = check_same_architecture(cks)
        check_same_tensors(cks["base"], "base", cks["instruct"], "instruct")
        check_vector_shapes(cks["base"], cks["instruct"])
        plans = [TensorPlan(n, OUT_DTYPES[options.vector_dtype], i.shape, (Segment(0, i.numel, "merge"),))
                 for n, i in cks["instruct"].tensors.items()]
        check_output_path(out, [ck.path for ck in cks.values()], overwrite=options.overwrite,
                          needed_bytes=sum(_nbytes(p) for p in plans))

        def finish(tmp: Path) -> dict:
            return {"tool": "kobllla.chat_vector", "operation": "extract",
                    "formula": "vector = dtype(fp32(instruct) - fp32(base))", "dtype": options.vector_dtype,
                    "files_from": copy_chat_files(tmp, Path(instruct)), "notes": notes}

        return _stream_to(out, cks=cks, plans=plans, operation="extract", ratio=1.0, opts=options,
                          shard_metadata={"kobllla.operation": "extract"}, finish=finish)
    finally:
        _close_all(cks)


def apply_chat_vector(*, vector: Path, target: Path, out: Path,
                      options: ChatVectorOptions | None = None) -> ChatVectorResult:
    """Writes ``target + ratio * vector`` for a vector from :func:`extract_chat_vector`.

    With a float32 vector the output is bit-identical to :func:`merge_chat_vector` on the
    same inputs. Args, returns and raises as :func:`merge_chat_vector`.
    """
    options = _checked(options)
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
                           operation="apply", opts=options)
    finally:
        _close_all(cks)


def _checked(options: ChatVectorOptions | None) -> ChatVectorOptions:
    options = ChatVectorOptions() if options is None else options
    options.check()
    return options


def open_vector(path: Path) -> Checkpoint:
    """Opens a vector saved by :func:`extract_chat_vector` (refuses a plain model dir)."""
    if not is_saved_vector(path):
        raise ValueError(f"{path} is not a chat vector saved by --save-vector (no {MANIFEST_NAME} "
                         "with operation 'extract'); pass --base and --instruct instead, or save one first")
    return open_checkpoint(Path(path))


def _open_all(paths: dict[str, Path]) -> dict[str, Checkpoint]:
    """Opens model checkpoints (refusing a saved vector passed as a model) and checks dtypes."""
    for role, p in paths.items():
        if is_saved_vector(p):
            raise ValueError(f"--{role} {p} is a chat vector saved by --save-vector, not a model; "
                             "pass it as --vector")
    opened: dict[str, Checkpoint] = {}
    try:
        for role, p in paths.items():
            opened[role] = open_checkpoint(p)
        for role, ck in opened.items():
            check_floating(ck, role)
    except BaseException:
        _close_all(opened)
        raise
    return opened


def _close_all(cks: dict[str, Checkpoint]) -> None:
    for ck in cks.values():
        ck.close()


def _merge_into(out: Path, *, cks: dict[str, Checkpoint], vshapes: dict[str, tuple[int, ...]],
                chat_dir: Path, notes: list[str], operation: str, opts: ChatVectorOptions) -> ChatVectorResult:
    plans, emb_notes = plan_tensors(cks["target"], vshapes, embeddings=opts.embeddings, dtype=opts.dtype)
    check_output_path(out, [ck.path for ck in cks.values()], overwrite=opts.overwrite,
                      needed_bytes=sum(_nbytes(p) for p in plans))
    out_dtypes = sorted({DTYPE_NAMES[p.dtype] for p in plans})
    embed = cks["target"].tensors.get(VOCAB_TENSORS[0])

    def finish(tmp: Path) -> dict:
        files = copy_model_files(tmp, target=cks["target"].path, chat=chat_dir,
                                 out_dtype=out_dtypes[0] if len(out_dtypes) == 1 else None,
                                 vocab_rows=embed.shape[0] if embed is not None else None)
        # The result is a chat model whatever the instruct checkpoint's eos said: Meta's stop settings.
        for rel in write_chat_stop_tokens(tmp):
            files[rel] = files.get(rel, "target") + " (eos set to <|eot_id|>, kobllla.chat_format)"
        return {"tool": "kobllla.chat_vector", "operation": operation, "formula": FORMULA,
                "ratio": opts.ratio, "dtype": opts.dtype, "output_dtypes": out_dtypes,
                "embeddings": {"policy": opts.embeddings, "tensors": emb_notes},
                "files_from": files, "notes": notes}

    meta = {"kobllla.operation": operation, "kobllla.ratio": repr(float(opts.ratio)),
            "kobllla.embeddings": opts.embeddings}
    result = _stream_to(out, cks=cks, plans=plans, operation=operation, ratio=opts.ratio, opts=opts,
                        shard_metadata=meta, finish=finish)
    result.embeddings = emb_notes
    return result


def _nbytes(plan: TensorPlan) -> int:
    return plan.segments[-1].end * plan.dtype.itemsize


def _stream_to(
    out: Path, *, cks: dict[str, Checkpoint], plans: list[TensorPlan], operation: str,
    ratio: float, opts: ChatVectorOptions, shard_metadata: dict[str, str], finish: Callable[[Path], dict],
) -> ChatVectorResult:
    """Streams every plan into shards under ``out`` (atomically); ``finish(tmp)`` writes the
    metadata files and returns the manifest, which is written last. Input files are hashed
    from the bytes the merge reads and output files from the bytes it writes."""
    started = time.perf_counter()
    shards = plan_shards([(p.name, p.dtype, p.shape) for p in plans],
                         max_shard_bytes=opts.max_shard_bytes, metadata=shard_metadata)
    bar = _progress_bar(_bytes_to_read(cks, plans, operation), opts.progress, operation)
    streamer = Streamer(target=cks.get("target"), base=cks.get("base"), instruct=cks.get("instruct"),
                        vector=cks.get("vector"), ratio=ratio, chunk_elements=opts.chunk_elements,
                        workers=opts.thread_count, progress=bar, hash_files=opts.hash_files)
    try:
        with atomic_output_dir(out, overwrite=opts.overwrite) as tmp, _single_threaded_ops():
            paths, out_hashes = _write_shards(tmp, shards, plans, streamer, operation)
            manifest = finish(tmp)
            manifest["inputs"] = {role: describe_input(ck, hashes=streamer.hashers) for role, ck in cks.items()}
            manifest["outputs"] = [{"file": p.name, "bytes": p.stat().st_size,
                                    **({"sha256": out_hashes[p.name]} if opts.hash_files else {})}
                                   for p in paths]
            manifest["seconds"] = round(time.perf_counter() - started, 3)
            manifest["versions"] = versions()
            write_json(tmp / MANIFEST_NAME, manifest)  # last: its presence says the output is whole
    finally:
        streamer.close()
        if bar is not None:
            bar.close()
    return ChatVectorResult(out=Path(out), operation=operation, tensors=len(plans),
                            output_bytes=sum(s.data_bytes for s in shards),
                            input_bytes_read=streamer.bytes_read, seconds=manifest["seconds"],
                            manifest=manifest)


def _write_shards(tmp: Path, shards: list, plans: list[TensorPlan], streamer: Streamer,
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


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                file=sys.stderr, mininterval=0.5)


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """torch ops (q/k reordering of a Meta pickle) on one thread, if torch is loaded at all
    (safetensors inputs never load it; the arithmetic is numpy's, one thread per worker)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
