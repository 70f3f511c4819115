"""Rotary position embedding as one vectorized kernel per tensor (``fused_rope``).

torchtune's ``RotaryPositionalEmbeddings`` rotates each head's interleaved pairs ``(x[2i], x[2i + 1])``
through ``x.reshape(..., -1, 2)``, two selects, four products and a ``stack``. Compiled, inductor
turns that into a kernel that loads each element through a parity-dependent index, which keeps its
loads from being vectorized: the eighth session's profile of a stage-1 step (docs/benchmarks.md) put
the four RoPE kernels of each layer (q and k, forward and backward) at 4.6 ms of a 215 ms step, moving
their bytes at ~1.4 TB/s where the step's other elementwise kernels move theirs at ~3.2 TB/s on the
same H100.

:func:`rope` computes the same rotation (in fp32, rounded once to the input's dtype, as torchtune does)
as a ``torch.library`` custom op: on a GPU a Triton kernel that loads each token's heads as one
contiguous tile and splits the pairs in registers; elsewhere the same arithmetic in torch. It also
takes the LoRA adapter's output (``delta``) and adds it before rotating, so the query's base and
adapter outputs are read once and their sum is never written. The backward is the inverse rotation
(the same kernel with the sine negated), whose result is the gradient of both ``x`` and ``delta``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

_TILE = 4096  # elements a program rotates: one token of Llama-3-8B's queries, four of its keys


def rope_supported(module: nn.Module) -> str | None:
    """Why ``module`` (a layer's ``pos_embeddings``) can't take :func:`rope` (None: it can).

    torchtune's ``RotaryPositionalEmbeddings`` and ``Llama3ScaledRoPE`` rotate interleaved pairs with a
    ``[max_seq_len, head_dim / 2, 2]`` (cos, sin) cache; other position embeddings do something else.
    """
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.modules import RotaryPositionalEmbeddings

    if type(module) not in (RotaryPositionalEmbeddings, Llama3ScaledRoPE):
        return f"its position embedding is {type(module).__name__}, not torchtune's RoPE"
    dim = module.dim
    if dim < 2 or dim & (dim - 1):
        return f"its head dim {dim} is not a power of two"
    return None


def rope(x: torch.Tensor, cache: torch.Tensor, input_pos: torch.Tensor | None,
         delta: torch.Tensor | None = None) -> torch.Tensor:
    """``x + delta`` (``[b, s, heads, head_dim]``) rotated as torchtune's RoPE does, in ``x``'s dtype.

    Args:
        x: queries or keys, ``[b, s, heads, head_dim]``.
        cache: the RoPE module's ``cache``, ``[max_seq_len, head_dim / 2, 2]`` fp32 (cos, sin).
        input_pos: ``[b, s]`` positions (packed documents restart at 0), or None for ``0 .. s - 1``.
        delta: an addend of ``x``'s shape (the adapter's output), or None.

    Raises:
        ValueError: ``s`` is longer than the cache (torchtune's module would fail to index it).
    """
    b, s = x.shape[:2]
    if s > cache.shape[0]:
        raise ValueError(f"fused_rope: sequence of {s} tokens, longer than the RoPE cache's {cache.shape[0]} "
                         "positions (the model's max_seq_len): lower tokenizer.max_seq_len to at most that")
    pos = (torch.arange(s, device=x.device).expand(b, s) if input_pos is None else input_pos)
    return _rope(x, delta, pos.reshape(b, s), cache, False)


@torch.library.custom_op("kobllla::rope", mutates_args=())
def _rope(x: torch.Tensor, delta: torch.Tensor | None, pos: torch.Tensor, cache: torch.Tensor,
          inverse: bool) -> torch.Tensor:
    """``(x + delta)`` rotated by ``cache[pos]`` (``inverse``: by the negative angle)."""
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()
    if x.is_cuda and triton is not None:
        return _rope_triton(x, delta, pos, cache, inverse)
    return _rope_torch(x, delta, pos, cache, inverse)


@_rope.register_fake
def _(x, delta, pos, cache, inverse):  # noqa: ANN001, ANN202
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    _x, delta, pos, cache, inverse = inputs
    ctx.save_for_backward(pos, cache)
    ctx.inverse, ctx.has_delta = inverse, delta is not None


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    pos, cache = ctx.saved_tensors
    dx = _rope(grad, None, pos, cache, not ctx.inverse)
    return dx, (dx if ctx.has_delta else None), None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)


def _rope_torch(x: torch.Tensor, delta: torch.Tensor | None, pos: torch.Tensor, cache: torch.Tensor,
                inverse: bool) -> torch.Tensor:
    """torchtune's arithmetic: fp32, interleaved pairs, one rounding at the end."""
    xf = x.float() if delta is None else x.float() + delta.float()
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    cs = cache[pos].unsqueeze(2)  # [b, s, 1, head_dim / 2, 2]
    cos, sin = cs[..., 0], cs[..., 1]
    if inverse:
        sin = -sin
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(3).to(x.dtype)


def _rope_triton(x: torch.Tensor, delta: torch.Tensor | None, pos: torch.Tensor, cache: torch.Tensor,
                 inverse: bool) -> torch.Tensor:
    b, s, heads, dim = x.shape
    tokens = b * s
    out = torch.empty_like(x)
    heads_p2 = triton.next_power_of_2(heads)
    block = max(1, _TILE // (heads_p2 * dim))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # CPU: Triton's interpreter
        _rope_kernel[(triton.cdiv(tokens, block),)](
            x, x if delta is None else delta, pos.reshape(-1).contiguous(), cache.contiguous(), out, tokens,
            HEADS=heads, HEADS_P2=heads_p2, DIM=dim, BLOCK=block, HAS_DELTA=delta is not None, INVERSE=inverse,
            num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, d_ptr, pos_ptr, cache_ptr, out_ptr, tokens, HEADS: tl.constexpr,  # noqa: ANN001, ANN202
                     HEADS_P2: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
                     INVERSE: tl.constexpr):
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t_ok = t < tokens
        pos = tl.load(pos_ptr + t, mask=t_ok, other=0).to(tl.int64)
        j = tl.arange(0, DIM)
        cs = tl.load(cache_ptr + pos[:, None] * DIM + j[None, :], mask=t_ok[:, None], other=0.0)
        cos, sin = tl.split(tl.reshape(cs, (BLOCK, DIM // 2, 2)))
        if INVERSE:
            sin = -sin
        h = tl.arange(0, HEADS_P2)
        offs = t.to(tl.int64)[:, None, None] * (HEADS * DIM) + h[None, :, None] * DIM + j[None, None, :]
        ok = t_ok[:, None, None] & (h < HEADS)[None, :, None]
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            v += tl.load(d_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(v, (BLOCK, HEADS_P2, DIM // 2, 2)))
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        rotated = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK, HEADS_P2, DIM))
        tl.store(out_ptr + offs, rotated.to(out_ptr.dtype.element_ty), mask=ok)
