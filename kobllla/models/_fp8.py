"""float8 matmuls for the frozen base linears of a LoRA model (rowwise scaling, e4m3).

Each frozen base weight ``W [out, in]`` is quantized once, after the checkpoint is loaded, in the
two layouts the matmuls need: per output row over ``in`` for the forward ``y = x W^T`` and per
input column over ``out`` for the backward ``dx = dy W``. Activations and output gradients are
quantized per row (per token) at every call, with power-of-two scales (torchao's "rowwise"
recipe: e4m3 everywhere, ``round_scales_to_power_of_2``). The LoRA weights and their matmuls
stay in bf16, and the forward saves no activation for the base weight's gradient, which a
frozen base does not need.

Why not ``torchao.float8.convert_to_float8_training`` (torchao 0.14.1): its ``Float8Linear``
re-quantizes the weight in both layouts at every step and always computes the weight gradient,
a third matmul that a frozen base throws away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.peft import LoRALinear

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [m, k]`` -> (e4m3 ``[m, k]``, fp32 dequantization scale ``[m, 1]``); power-of-two scales."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    q = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.reciprocal()


def _scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * a_scale) @ (b_t * b_scale)^T`` with a ``[m, k]`` and b_t ``[n, k]`` row-major, both e4m3."""
    return torch._scaled_mm(a, b_t.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)


class _Fp8FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_scale, wt_q, wt_scale):  # noqa: ANN001, ANN205
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_rows(x2)
        y = _scaled_mm(xq, xs, w_q, w_scale, x.dtype)
        ctx.save_for_backward(wt_q, wt_scale)
        return y.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        wt_q, wt_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        gq, gs = quantize_rows(dy2)
        dx = _scaled_mm(gq, gs, wt_q, wt_scale, dy.dtype)
        return dx.reshape(*dy.shape[:-1], wt_q.shape[0]), None, None, None, None


FP8_BUFFERS = ("_w_q", "_w_scale", "_wt_q", "_wt_scale")


@torch.no_grad()
def set_fp8_copies(module: nn.Module, weight: torch.Tensor) -> None:
    """Registers ``weight``'s e4m3 copies (both layouts, with scales) as ``module``'s non-persistent buffers."""
    w_q, w_scale = quantize_rows(weight)
    wt_q, wt_scale = quantize_rows(weight.t().contiguous())
    for name, value in zip(FP8_BUFFERS, (w_q, w_scale, wt_q, wt_scale), strict=True):
        module.register_buffer(name, value, persistent=False)


def fp8_matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` through the float8 copies ``set_fp8_copies`` put on ``module`` (input gradient only)."""
    return _Fp8FrozenMatmul.apply(x, module._w_q, module._w_scale, module._wt_q, module._wt_scale)


class _Fp8Weights:
    """Mixin: e4m3 copies of ``self.weight`` (non-persistent buffers) refreshed after every load."""

    def _init_fp8(self) -> None:
        self._fp8_hook = self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_fp8())
        self.refresh_fp8()

    def refresh_fp8(self) -> None:
        """Re-quantizes the weight (call after changing it other than through ``load_state_dict``)."""
        set_fp8_copies(self, self.weight.detach())

    def _fp8_linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # a trained weight needs its gradient: plain matmul
            return F.linear(x, self.weight)
        if "_w_q" not in self._buffers:  # freed when a fused group took this weight over (kobllla.models._fast)
            self.refresh_fp8()
        return fp8_matmul(self, x)


class Fp8FrozenLinear(_Fp8Weights, nn.Linear):
    """``nn.Linear`` (no bias) whose matmuls run in float8 while its weight is frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp8_linear(x)


class Fp8LoRALinear(_Fp8Weights, LoRALinear):
    """torchtune's ``LoRALinear`` with the frozen base matmul in float8; the adapter stays bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._fp8_linear(x)
        if self.disabled:
            return out
        lora_out = self.lora_a(self.dropout(x))
        return out + (self.alpha / self.rank) * self.lora_b(lora_out)


def convert_frozen_linears_to_fp8(model: nn.Module, *, skip: tuple[str, ...] = ("output",)) -> list[str]:
    """Swaps every bias-free base linear (``nn.Linear`` and ``LoRALinear``, not the adapters'
    ``lora_a``/``lora_b`` nor the names in ``skip``) for its float8 class in place; returns their names.

    Raises:
        ValueError: a layer's dimensions are not multiples of 16 (the float8 matmul's tiles),
            or it has a bias, or its base is NF4-quantized.
    """
    converted = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b") or name in skip or type(module) not in (nn.Linear, LoRALinear):
            continue
        out_dim, in_dim = module.weight.shape
        if out_dim % 16 or in_dim % 16:
            raise ValueError(
                f"fp8: {name} is {out_dim} x {in_dim}; float8 matmuls need multiples of 16 (set fp8: False)")
        if getattr(module, "bias", None) is not None or getattr(module, "_quantize_base", False):
            raise ValueError(f"fp8: {name} has a bias or an NF4 base; only plain bias-free bf16 linears are converted")
        module.__class__ = Fp8LoRALinear if isinstance(module, LoRALinear) else Fp8FrozenLinear
        module._init_fp8()
        converted.append(name)
    return converted
