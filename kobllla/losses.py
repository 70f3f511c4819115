"""Fused output projection + cross-entropy for torchtune 0.6.1's stock LoRA recipes.

torchtune 0.6.1's ``CEWithChunkedOutputLoss`` takes the model's logits in 8 chunks: each chunk
of the 128,256-way output is written in bf16, read again, upcast to fp32 inside the loss, kept
for the backward pass and read a third time there. Here the loss owns the projection: the model
(``kobllla.models.lora_llama3_8b(output="hidden")``) returns its final-norm hidden states and the
output weight, and for each chunk of positions the loss computes the logits, the loss and the
gradient of the hidden states at once (forward and backward of the chunk in one pass), so no
logits outlive their chunk and the backward pass only scales the stored gradient.

The arithmetic is torchtune's: logits in the model dtype (``h @ W^T``), upcast to fp32,
``F.cross_entropy(reduction="sum")`` over trained positions divided by their count, the
gradient ``softmax - one_hot`` cast back to the model dtype before ``grad @ W``. On CUDA the
per-chunk softmax math is one compiled kernel; on CPU the same code runs eagerly.

Config (the recipe runs unmodified; the model block and the loss go together)::

    model:
      _component_: kobllla.models.lora_llama3_8b
      output: hidden
      ...
    loss:
      _component_: kobllla.losses.FusedLinearCrossEntropyLoss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CROSS_ENTROPY_IGNORE_IDX = -100  # torchtune's and transformers' ignore index


class ProjectionInput(list):
    """What a model built with ``output="hidden"`` returns instead of logits.

    A one-element list ``[hidden]`` (final-norm hidden states ``[b, s, d]``) with the output
    projection's ``weight`` (``[vocab, d]``) attached. It is a list so that the stock recipes hand
    it to the loss as is (they reshape tensors, not lists).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__([hidden])
        self.weight = weight

    @property
    def hidden(self) -> torch.Tensor:
        return self[0]


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Sum of token losses over one chunk and d(sum)/d(logits) in the logits' dtype."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    target_z = z.gather(1, safe[:, None])
    loss = ((lse - target_z)[:, 0] * valid).sum()
    one_hot = F.one_hot(safe, z.shape[-1]).to(z.dtype)
    grad = (torch.exp(z - lse) - one_hot) * valid[:, None]
    return loss, grad.to(logits.dtype)


_compiled_chunk_fn = None


def _chunk_fn(device: torch.device):
    """The per-chunk math: compiled into one kernel pair on CUDA, eager elsewhere."""
    global _compiled_chunk_fn
    if device.type != "cuda":
        return _chunk_loss_and_grad
    if _compiled_chunk_fn is None:
        _compiled_chunk_fn = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk_fn


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight^T, target_i)``; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int):  # noqa: ANN001, ANN205
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        fn = _chunk_fn(hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            logits = h @ weight.t()
            loss, grad = fn(logits, targets[start : start + chunk_size], ignore_index)
            total += loss
            if need_h:
                torch.mm(grad, weight, out=grad_h[start : start + chunk_size])
            if need_w:
                grad_w.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.need, ctx.weight_dtype = (need_h, need_w), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.need
        dh = grad_h * grad_total.to(grad_h.dtype) if need_h else None
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if need_w else None
        return dh, dw, None, None, None


class FusedLinearCrossEntropyLoss(nn.Module):
    """Cross-entropy over the output projection of a model built with ``output="hidden"``.

    Args:
        chunk_size: positions per chunk (``chunk_size x vocab`` logits exist at a time; 1,024 x
            128,256 bf16 is 0.26 GB).
        ignore_index: label of untrained positions (torchtune's ``CROSS_ENTROPY_IGNORE_IDX``).

    Called by the recipe as ``loss(model_output, labels)`` with ``labels`` ``[b, s]`` already
    shifted; returns the mean loss over trained positions (0 when there are none).

    Raises:
        TypeError: the model returned logits (it was not built with ``output="hidden"``).
    """

    def __init__(self, chunk_size: int = 1024, ignore_index: int = CROSS_ENTROPY_IGNORE_IDX) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index

    @torch.compiler.disable  # the recipe's compile_loss wraps the whole module: the chunk loop stays eager
    def forward(self, outputs: ProjectionInput, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, ProjectionInput):
            raise TypeError(
                f"FusedLinearCrossEntropyLoss needs the hidden states and output weight of a model built with "
                f"output='hidden' (e.g. model._component_: kobllla.models.lora_llama3_8b, output: hidden); "
                f"got {type(outputs).__name__}: use torchtune.modules.loss.CEWithChunkedOutputLoss for logits"
            )
        hidden = outputs.hidden
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        if targets.shape[0] != hidden.shape[0]:
            raise ValueError(f"labels hold {targets.shape[0]} positions, hidden states {hidden.shape[0]}")
        total = _FusedLinearCrossEntropy.apply(hidden, outputs.weight, targets, self.ignore_index, self.chunk_size)
        return total / (targets != self.ignore_index).sum().clamp(min=1)
