"""Causal attention over packed documents with cuDNN's fused SDPA kernels (``attention: cudnn``).

torchtune runs a pack's document-causal attention through flex attention on a ``BlockMask``, with
k and v copied to every query head. cuDNN's SDPA takes the pack as it is laid out in memory
(``[tokens, heads, head_dim]``, "THD"), the documents as ragged offsets, and the 8 k/v heads as
they are (grouped-query attention without the copies); its Hopper kernels are faster than flex's
Triton ones on these shapes (docs/benchmarks.md).

The kernels come through the cudnn-frontend Python package (``nvidia-cudnn-frontend``, a kobllla
dependency), which builds a cuDNN graph per shape: one forward and one backward graph (~0.1 s each,
at first use) per ``(documents in the batch, longest document, tokens, heads, head_dim)``.
:class:`kobllla.packed_documents.PackedDocuments` rounds the number of documents up to a power of
two (the extra documents are empty) and the longest document up to a power of two (at least 128), so at
seq 4096 a run builds at most 13 x 6 graph pairs whatever its data (the kernel time does not depend on the
rounding: docs/benchmarks.md).

The two ops are ``torch.library`` custom ops with fake implementations, so a compiled layer traces
them as single nodes, and with an autograd formula, so the backward is cuDNN's too.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

_lock = threading.Lock()
_tls = threading.local()
_GRAPHS: dict[tuple, tuple] = {}


class VarlenMask(NamedTuple):
    """A batch's document bounds in the layout the cuDNN graphs bind (built once per batch).

    ``seq_lens``: ``[n, 1, 1, 1]`` int32 document lengths (``n`` a power of two, trailing documents
    empty); ``max_seqlen``: an upper bound of the longest document (the graphs' sequence dimension);
    ``q_offsets`` / ``kv_offsets`` / ``stats_offsets``: each document's first token over the whole
    batch (packs concatenated) times the element stride of one token in q-shaped, k/v-shaped and
    statistics tensors, as ``[n + 1, 1, 1, 1]`` int64 (cuDNN's ragged offsets).
    """

    seq_lens: torch.Tensor
    max_seqlen: int
    q_offsets: torch.Tensor
    kv_offsets: torch.Tensor
    stats_offsets: torch.Tensor


def varlen_mask(cu_seqlens: torch.Tensor, max_seqlen: int, *, num_heads: int, num_kv_heads: int,
                head_dim: int) -> VarlenMask:
    """The :class:`VarlenMask` of ``cu_seqlens`` (``[n + 1]`` token offsets, any int dtype, on the GPU)."""
    cu = cu_seqlens.to(torch.int64)
    col = cu.view(-1, 1, 1, 1)
    return VarlenMask(seq_lens=(cu[1:] - cu[:-1]).to(torch.int32).view(-1, 1, 1, 1), max_seqlen=max_seqlen,
                      q_offsets=col * (num_heads * head_dim), kv_offsets=col * (num_kv_heads * head_dim),
                      stats_offsets=col * num_heads)


def _cudnn():
    try:
        import cudnn
    except ImportError as e:  # pragma: no cover - GPU environments only
        raise ImportError("model.attention: cudnn needs the cudnn-frontend package: pip install "
                          "'nvidia-cudnn-frontend==1.16.0'") from e
    return cudnn


def _handle(device: torch.device):
    cudnn = _cudnn()
    handles = getattr(_tls, "handles", None)
    if handles is None:
        handles = _tls.handles = {}
    if device not in handles:
        with torch.cuda.device(device):
            handles[device] = cudnn.create_handle()
    cudnn.set_stream(handle=handles[device], stream=torch.cuda.current_stream(device).cuda_stream)
    return handles[device]


def _io_type(dtype: torch.dtype):
    cudnn = _cudnn()
    if dtype == torch.bfloat16:
        return cudnn.data_type.BFLOAT16
    if dtype == torch.float16:
        return cudnn.data_type.HALF
    raise TypeError(f"model.attention: cudnn runs in bf16 or fp16, got {dtype} (set dtype: bf16)")


def _thd(g, name: str, b: int, h: int, s: int, d: int, dtype, offsets):
    t = g.tensor(name=name, dim=[b, h, s, d], stride=[s * h * d, d, h * d, 1], data_type=dtype)
    t.set_ragged_offset(offsets)
    return t


def _col(g, name: str, n: int, dtype):
    return g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dtype)


def _define(key: tuple, handle):  # noqa: ANN001, ANN202
    """The cuDNN graph of ``key`` and its named tensors, validated, before any execution plan is made
    (:func:`_build` makes cuDNN's first plan; bench/varlen_probe_gpu.py times every plan)."""
    cudnn = _cudnn()
    kind, torch_dtype, b, hq, hkv, s, d, scale, total = key[:9]
    io = _io_type(torch_dtype)
    f32, i32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT32, cudnn.data_type.INT64
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    seq = _col(g, "seq_lens", b, i32)
    off_q, off_kv, off_st = _col(g, "off_q", b + 1, i64), _col(g, "off_kv", b + 1, i64), _col(g, "off_st", b + 1, i64)
    q = _thd(g, "q", b, hq, s, d, io, off_q)
    k = _thd(g, "k", b, hkv, s, d, io, off_kv)
    v = _thd(g, "v", b, hkv, s, d, io, off_kv)
    common = dict(attn_scale=scale, use_padding_mask=True, seq_len_q=seq, seq_len_kv=seq, use_causal_mask=True)
    if kind == "fwd":
        o, stats = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, **common)
        o.set_output(True).set_dim([b, hq, s, d]).set_stride([s * hq * d, d, hq * d, 1]).set_data_type(io)
        o.set_ragged_offset(off_q)
        stats.set_output(True).set_dim([b, hq, s, 1]).set_stride([s * hq, 1, hq, 1]).set_data_type(f32)
        stats.set_ragged_offset(off_st)
        tensors = {"q": q, "k": k, "v": v, "o": o, "stats": stats}
    else:
        o = _thd(g, "o", b, hq, s, d, io, off_q)
        do = _thd(g, "do", b, hq, s, d, io, off_q)
        stats = g.tensor(name="stats", dim=[b, hq, s, 1], stride=[s * hq, 1, hq, 1], data_type=f32)
        stats.set_ragged_offset(off_st)
        dq, dk, dv = g.sdpa_backward(name="sdpa_bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats,
                                     max_total_seq_len_q=total, max_total_seq_len_kv=total, **common)
        for t, h in ((dq, hq), (dk, hkv), (dv, hkv)):
            t.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_data_type(io)
        dq.set_ragged_offset(off_q)
        dk.set_ragged_offset(off_kv)
        dv.set_ragged_offset(off_kv)
        tensors = {"q": q, "k": k, "v": v, "o": o, "do": do, "stats": stats, "dq": dq, "dk": dk, "dv": dv}
    tensors.update(seq=seq, off_q=off_q, off_kv=off_kv, off_st=off_st)
    g.validate()
    g.build_operation_graph()
    return g, tensors


def _build(key: tuple, handle):  # noqa: ANN001, ANN202
    cudnn = _cudnn()
    g, tensors = _define(key, handle)
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, tensors, g.get_workspace_size()


def _build_or_explain(key: tuple, handle):
    try:
        return _build(key, handle)
    except TypeError:
        raise
    except Exception as e:  # cuDNN's own errors: name the shape, the cuDNN and the way out
        kind, _, b, hq, hkv, s, d = key[:7]
        raise RuntimeError(
            f"model.attention: cudnn: cuDNN {_cudnn().backend_version()} cannot build the {kind} graph for "
            f"{b} documents x {hq} query / {hkv} kv heads x head dim {d}, longest document {s} "
            f"({type(e).__name__}: {e}); use model.attention=flex_inline "
            "collate_fn=kobllla.datasets.packed_collate") from e


def _graph(kind: str, q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor, max_seqlen: int, scale: float):
    t, hq, d = q.shape
    key = (kind, q.dtype, seq_lens.shape[0], hq, k.shape[1], max_seqlen, d, scale, -(-t // 64) * 64, q.device)
    handle = _handle(q.device)
    hit = _GRAPHS.get(key)
    if hit is None:
        with _lock:
            hit = _GRAPHS.get(key)
            if hit is None:
                hit = _GRAPHS[key] = _build_or_explain(key, handle)
    return hit, handle


def _run(kind, q, k, seq_lens, max_seqlen, scale, buffers: dict) -> None:  # noqa: ANN001
    (g, tensors, ws), handle = _graph(kind, q, k, seq_lens, max_seqlen, scale)
    workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=q.device)
    g.execute({tensors[name]: buf for name, buf in buffers.items()}, workspace, handle=handle)


@torch.library.custom_op("kobllla::cudnn_thd_attention", mutates_args=())
def thd_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, max_seqlen: int,
                  q_offsets: torch.Tensor, kv_offsets: torch.Tensor, stats_offsets: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-causal attention of packed ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``: ``(out, logsumexp)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    stats = torch.empty(q.shape[0], q.shape[1], 1, dtype=torch.float32, device=q.device)
    _run("fwd", q, k, seq_lens, max_seqlen, scale,
         {"q": q, "k": k, "v": v, "o": out, "stats": stats, "seq": seq_lens, "off_q": q_offsets,
          "off_kv": kv_offsets, "off_st": stats_offsets})
    return out, stats


@thd_attention.register_fake
def _(q, k, v, seq_lens, max_seqlen, q_offsets, kv_offsets, stats_offsets, scale):  # noqa: ANN001, ANN202
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[0], q.shape[1], 1,
                                                                                   dtype=torch.float32)


@torch.library.custom_op("kobllla::cudnn_thd_attention_backward", mutates_args=())
def thd_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           stats: torch.Tensor, seq_lens: torch.Tensor, max_seqlen: int, q_offsets: torch.Tensor,
                           kv_offsets: torch.Tensor, stats_offsets: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`thd_attention` for q, k and v."""
    dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _run("bwd", q, k, seq_lens, max_seqlen, scale,
         {"q": q, "k": k, "v": v, "o": out, "do": dout, "stats": stats, "dq": dq, "dk": dk, "dv": dv,
          "seq": seq_lens, "off_q": q_offsets, "off_kv": kv_offsets, "off_st": stats_offsets})
    return dq, dk, dv


@thd_attention_backward.register_fake
def _(dout, q, k, v, out, stats, seq_lens, max_seqlen, q_offsets, kv_offsets, stats_offsets,  # noqa: ANN001, ANN202
      scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, seq_lens, max_seqlen, q_offsets, kv_offsets, stats_offsets, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, seq_lens, q_offsets, kv_offsets, stats_offsets)
    ctx.scale, ctx.max_seqlen = scale, max_seqlen
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, _dstats):  # noqa: ANN001, ANN202
    q, k, v, out, stats, seq_lens, q_offsets, kv_offsets, stats_offsets = ctx.saved_tensors
    dq, dk, dv = thd_attention_backward(dout, q, k, v, out, stats, seq_lens, ctx.max_seqlen, q_offsets, kv_offsets,
                                        stats_offsets, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


thd_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: VarlenMask,
              scale: float | None = None) -> torch.Tensor:
    """``out [T, Hq, D]`` of packed ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` (bf16/fp16, CUDA)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _ = thd_attention(q, k, v, mask.seq_lens, mask.max_seqlen, mask.q_offsets, mask.kv_offsets,
                           mask.stats_offsets, scale)
    return out
