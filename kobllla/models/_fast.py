"""Fused frozen-base projections and in-graph flex attention for torchtune's Llama 3 layers.

Two options of :func:`kobllla.models.lora_llama3_8b`, both for a frozen base (LoRA), both leaving
weights, state-dict keys and checkpoints exactly torchtune's:

- ``fuse_projections=True``: q/k/v share their input, and so do the MLP's gate and up
  projections. Their frozen weights are concatenated once after loading (``[q; k; v]`` of
  ``[6144, 4096]`` and ``[w1; w3]`` of ``[28672, 4096]`` at 8B), so each group is one matmul
  forward and one input-gradient matmul backward, instead of three (two) narrower ones and the
  sums of their input gradients. The separate weights become views of the fused one (no second
  copy); the LoRA adapters stay separate modules and add their deltas after the split. With
  ``fp8=True`` the fused weight is the one quantized, and the shared input is quantized once per
  group instead of once per projection.
- ``attention="cudnn"``: cuDNN's fused attention on packs as they lie in memory (``[tokens, heads,
  dim]``), the documents as ragged offsets and the 8 k/v heads without copies
  (``kobllla.models._cudnn_attention``); batches come from ``kobllla.datasets.packed_varlen_collate``.
- ``attention="flex_inline"``: torchtune calls flex attention through a separately compiled
  function behind ``torch.compiler.disable``, so a compiled layer is three graphs forward and three
  backward, each with its own guards and launch overhead on the CPU. Here, inside a compiled layer,
  ``flex_attention`` is traced into the layer's own graph (same math, same k/v layout); outside
  one it is torchtune's call. Measured on one H200 (docs/benchmarks.md): the 8B step is bound by
  the CPU launching the layers' kernels, not by the GPU running them.
  (Flex attention on the 8 kv heads as they are, ``enable_gqa=True``, was measured too: its
  backward kernel took 812 us against 597 us on torchtune's per-query-head copies, so it is not
  offered.)

In these layers, LoRA adapters on projections that read the same input (q and v in the stage
configs) run their ``A`` matmuls as one (:func:`_lora_deltas`); an adapter with dropout, a disabled one,
or a float8 / NF4 base in an unfused layer keeps torchtune's own forward.

A layer falls back to torchtune's own forward whenever the fast path does not apply: a trained
base weight (full fine-tuning, LoRA with ``fuse`` on a trained k), a KV cache in use, q/k norms,
cross-attention.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, MultiHeadAttention
from torchtune.modules.peft import LoRALinear

from kobllla.models._cudnn_attention import VarlenMask, varlen_mask
from kobllla.models._cudnn_attention import attention as cudnn_attention
from kobllla.models._rope import rope, rope_supported
from kobllla.packed_documents import PackedDocuments

Attention = Literal["flex", "flex_inline", "cudnn"]
ATTENTIONS = ("flex", "flex_inline", "cudnn")


def _is_block_mask(mask: object) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return isinstance(mask, BlockMask)


def _lora_delta(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A ``LoRALinear``'s adapter output ``alpha / rank * B A x`` (None for a plain linear or a disabled adapter)."""
    if not isinstance(module, LoRALinear) or module.disabled:
        return None
    return (module.alpha / module.rank) * module.lora_b(module.lora_a(module.dropout(x)))


def _groupable(module: nn.Module) -> bool:
    """A ``LoRALinear`` (any base) whose adapter can share its first matmul with its siblings': enabled,
    no dropout (each adapter would draw its own mask), plain bias-free ``nn.Linear`` adapter layers."""
    return (isinstance(module, LoRALinear) and not module.disabled and isinstance(module.dropout, nn.Identity)
            and type(module.lora_a) is nn.Linear and type(module.lora_b) is nn.Linear
            and module.lora_a.bias is None and module.lora_b.bias is None)


def _lora_deltas(modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor | None]:
    """The adapter outputs ``alpha / rank * B A x`` of ``modules``, which all read ``x``.

    Where two or more adapters can be grouped, their ``A`` matrices run as one matmul (x is read once
    forward; backward, one matmul for all of their ``A`` gradients and one for their input gradient,
    instead of one each), and the scale multiplies the rank-wide ``A x`` instead of the wide output,
    so the backward scales no ``[tokens, out]`` gradient. The same products as torchtune's
    ``LoRALinear``, in another order of rounding (none at all for a power-of-two ``alpha / rank``).
    """
    grouped = [i for i, m in enumerate(modules) if _groupable(m)]
    if len(grouped) < 2:
        return [_lora_delta(m, x) for m in modules]
    deltas: list[torch.Tensor | None] = [None if i in grouped else _lora_delta(m, x) for i, m in enumerate(modules)]
    a = F.linear(x, torch.cat([modules[i].lora_a.weight for i in grouped]))
    for i, a_i in zip(grouped, a.split([modules[i].lora_a.out_features for i in grouped], dim=-1), strict=True):
        m = modules[i]
        deltas[i] = F.linear(a_i * (m.alpha / m.rank), m.lora_b.weight)
    return deltas


def _with_deltas(bases: list[torch.Tensor], modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``bases`` (the frozen outputs of ``modules`` on ``x``) plus each module's adapter output, if any."""
    return _add(bases, _lora_deltas(modules, x))


def _add(bases: list[torch.Tensor], deltas: list[torch.Tensor | None]) -> list[torch.Tensor]:
    return [base if delta is None else base + delta for base, delta in zip(bases, deltas, strict=True)]


def _plain_base(module: nn.Module) -> bool:
    """A bf16/fp32 ``nn.Linear`` or ``LoRALinear`` base (not NF4, not float8): ``F.linear`` computes it."""
    return type(module) is nn.Linear or (type(module) is LoRALinear and not module._quantize_base)


def _frozen(*modules: nn.Module) -> bool:
    return all(not m.weight.requires_grad for m in modules)


class _FusedGroup:
    """Mixin for a module whose ``_fused_members()`` linears share an input: their weights fused."""

    _fp8 = False

    def _fused_members(self) -> list[nn.Module]:
        raise NotImplementedError

    def _init_fused(self, *, fp8: bool) -> None:
        self._fp8 = fp8
        self._fused_hook = self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_fused())
        self.refresh_fused()

    @torch.no_grad()
    def refresh_fused(self) -> None:
        """Concatenates the members' weights into ``_w_fused`` and points each member's weight at its rows."""
        members = self._fused_members()
        fused = torch.cat([m.weight.detach() for m in members], dim=0)
        start = 0
        for m in members:
            rows = m.weight.shape[0]
            m.weight.data = fused[start:start + rows]
            start += rows
        self.register_buffer("_w_fused", fused, persistent=False)
        if self._fp8:
            from kobllla.models._fp8 import FP8_BUFFERS, set_fp8_copies

            set_fp8_copies(self, fused)
            for m in members:  # their own float8 copies are not used any more: free them
                for name in FP8_BUFFERS:
                    m._buffers.pop(name, None)
                if hasattr(m, "_fp8_hook"):
                    m._fp8_hook.remove()
                    del m._fp8_hook

    def _fused_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._fp8:
            from kobllla.models._fp8 import fp8_matmul

            return fp8_matmul(self, x)
        return F.linear(x, self._w_fused)


class FastAttention(_FusedGroup, MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` with fused q/k/v and/or in-graph flex attention (module docstring)."""

    _fuse = False
    _fused_rope = False
    _attention: Attention = "flex"

    def _fused_members(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def _fast_path(self, x: torch.Tensor, y: torch.Tensor | None) -> bool:
        return (y is x and self.q_norm is None and self.k_norm is None
                and (self.kv_cache is None or not self.cache_enabled))

    def forward(self, x, y=None, *, mask=None, input_pos=None):  # noqa: ANN001, ANN201 - torchtune's signature
        if not self._fast_path(x, y):
            return super().forward(x, y, mask=mask, input_pos=input_pos)
        b, s, _ = x.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        projs = [self.q_proj, self.k_proj, self.v_proj]
        if self._fuse and _frozen(*projs):
            bases = list(self._fused_matmul(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1))
            deltas = _lora_deltas(projs, x)
        elif all(map(_plain_base, projs)) and sum(map(_groupable, projs)) >= 2:
            bases, deltas = [F.linear(x, p.weight, p.bias) for p in projs], _lora_deltas(projs, x)
        else:
            bases, deltas = [p(x) for p in projs], [None] * 3
        shapes = [(b, s, nh, hd), (b, s, nkv, hd), (b, s, nkv, hd)]
        bases, deltas = ([None if t is None else t.reshape(shp) for t, shp in zip(ts, shapes, strict=True)]
                         for ts in (bases, deltas))
        if self._fused_rope and self.pos_embeddings is not None:  # the adapters' outputs added inside the rotation
            cache = self.pos_embeddings.cache
            q, k = (rope(base, cache, input_pos, delta) for base, delta in zip(bases[:2], deltas[:2], strict=True))
            v = _add(bases[2:], deltas[2:])[0]
        else:
            q, k, v = _add(bases, deltas)
            if self.pos_embeddings is not None:
                q = self.pos_embeddings(q, input_pos=input_pos)
                k = self.pos_embeddings(k, input_pos=input_pos)
        if isinstance(mask, VarlenMask):  # attention: cudnn, packs as [tokens, heads, dim], GQA as it is
            if self.training and self.attn_dropout > 0.0:
                raise ValueError("attention: cudnn does not support dropout; set attn_dropout to 0.0")
            out = cudnn_attention(q.reshape(b * s, nh, hd), k.reshape(b * s, nkv, hd), v.reshape(b * s, nkv, hd),
                                  mask)
            return self.output_proj(out.view(b, s, nh * hd))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if nh != nkv:  # torchtune's layout: every query head gets its own copy of k and v
            shape = (b, nkv, nh // nkv, -1, hd)
            k = k.unsqueeze(2).expand(shape).flatten(1, 2)
            v = v.unsqueeze(2).expand(shape).flatten(1, 2)
        if self._attention == "flex_inline" and _is_block_mask(mask) and torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import flex_attention

            if self.training and self.attn_dropout > 0.0:
                raise ValueError("flex attention does not support dropout; set attn_dropout to 0.0")
            out = flex_attention(q, k, v, block_mask=mask)
        else:
            out = self._attention_call(q, k, v, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                                       is_causal=self.kv_cache is None and mask is None and self.is_causal)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FusedFeedForward(_FusedGroup, FeedForward):
    """torchtune's ``FeedForward`` with the gate and up projections as one matmul (module docstring)."""

    def _fused_members(self) -> list[nn.Module]:
        return [self.w1, self.w3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _frozen(self.w1, self.w3):
            return super().forward(x)
        gate, up = _with_deltas(list(self._fused_matmul(x).chunk(2, dim=-1)), [self.w1, self.w3], x)
        return self.w2(self.activation(gate) * up)


def apply_fast_layers(model: nn.Module, *, fuse_projections: bool, attention: Attention, fp8: bool,
                      fused_rope: bool = False) -> None:
    """Swaps the model's attention and MLP modules for the classes above, in place.

    Raises:
        ValueError: an unknown ``attention``; ``fuse_projections`` on an MLP without an up projection
            or with biases or NF4 bases; ``fused_rope`` on a layer whose position embedding is not
            torchtune's RoPE.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "cudnn":
        _check_cudnn()
        attn = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
        heads = dict(num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim)
        model.register_forward_pre_hook(functools.partial(_documents_to_mask, heads=heads), with_kwargs=True)
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and (fuse_projections or attention != "flex" or fused_rope):
            if fused_rope and module.pos_embeddings is not None and (why := rope_supported(module.pos_embeddings)):
                raise ValueError(f"model.fused_rope: {name}: {why}; set fused_rope: False")
            module.__class__ = FastAttention
            module._attention = attention
            module._fused_rope = fused_rope
            if fuse_projections:
                _check_fusable(name, module._fused_members())
                module._fuse = True
                module._init_fused(fp8=fp8)
        elif isinstance(module, FeedForward) and fuse_projections:
            if module.w3 is None:
                raise ValueError(f"fuse_projections: {name} has no up projection (w3) to fuse with its gate")
            _check_fusable(name, [module.w1, module.w3])
            module.__class__ = FusedFeedForward
            module._init_fused(fp8=fp8)


COLLATE_HINT = ("model.attention: cudnn takes packs collated by `collate_fn: kobllla.datasets.packed_varlen_collate` "
                "(with dataset.pack: True)")


def _check_cudnn() -> None:
    """On a GPU machine, ``attention: cudnn`` needs the cudnn-frontend package and an sm80+ GPU."""
    if not torch.cuda.is_available():
        return  # the CPU runs the same masks through torchtune's attention (_documents_to_mask)
    if torch.cuda.get_device_capability() < (8, 0):
        raise ValueError(f"model.attention: cudnn needs an Ampere or newer GPU (compute capability >= 8.0), got "
                         f"{torch.cuda.get_device_name()}; use attention: flex_inline")
    try:
        import cudnn  # noqa: F401
    except ImportError:
        raise ValueError("model.attention: cudnn needs the cudnn-frontend package (a kobllla dependency): pip "
                         "install 'nvidia-cudnn-frontend==1.16.0', or use attention: flex_inline") from None


def _documents_to_mask(model: nn.Module, args: tuple, kwargs: dict, *, heads: dict) -> tuple[tuple, dict]:
    """Decoder pre-hook of ``attention: cudnn``: a batch's :class:`PackedDocuments` -> the layers' mask.

    On a GPU, a :class:`VarlenMask` (the cuDNN graphs' offsets, built once per batch for every layer);
    on the CPU, torchtune's dense block-causal mask, so the same config runs there through torchtune's
    attention with the same numbers.
    """
    mask = kwargs.get("mask")
    if isinstance(mask, PackedDocuments):
        tokens = args[0] if args else kwargs.get("tokens")
        if tokens is None:
            tokens = kwargs["input_embeds"]
        if tokens.is_cuda:
            kwargs["mask"] = varlen_mask(mask.cu_seqlens, mask.max_seqlen, **heads)
        else:
            kwargs["mask"] = mask.block_causal_mask(tokens.shape[0], tokens.shape[1]).to(tokens.device)
    elif _is_block_mask(mask):
        raise ValueError(f"{COLLATE_HINT}, got a flex BlockMask (from kobllla.datasets.packed_collate or "
                         "dataset.packed)")
    return args, kwargs


def _check_fusable(name: str, members: list[nn.Module]) -> None:
    for m in members:
        if getattr(m, "bias", None) is not None or getattr(m, "_quantize_base", False):
            raise ValueError(f"fuse_projections: {name} has a bias or an NF4 base; only plain bias-free linears fuse "
                             "(set fuse_projections: False)")
