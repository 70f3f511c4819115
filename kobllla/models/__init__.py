"""Model builders for the stage configs: torchtune's Llama 3 LoRA models with two speed options.

- ``output="hidden"``: the model returns its final-norm hidden states and the output weight
  (:class:`kobllla.losses.ProjectionInput`) instead of logits, for
  :class:`kobllla.losses.FusedLinearCrossEntropyLoss`, which computes the 128,256-way projection,
  the loss and its gradient chunk by chunk. The two go together in a config.
- ``fp8=True``: the frozen base linears (q/k/v/o and the MLP; not the output projection, not the
  LoRA adapters) run their matmuls in float8 with rowwise scales (``kobllla.models._fp8``). Needs
  a GPU with float8 tensor cores (H100/H200, compute capability >= 8.9) for speed; on CPU it runs
  (slowly) through the same ``torch._scaled_mm``. ``fp8_output=True`` (with ``output="logits"``)
  also runs the 128,256-way output projection in float8.
- ``fuse_projections=True``: q/k/v as one frozen matmul, gate/up as one (``kobllla.models._fast``).
- ``attention="cudnn"``: cuDNN's fused attention over the packs' documents as ragged offsets, the k/v
  heads without copies (``kobllla.models._cudnn_attention``); batches from
  ``collate_fn: kobllla.datasets.packed_varlen_collate``. On the CPU, torchtune's attention on the same
  (dense) mask.
- ``persistent_norms=True``: when the model is compiled, inductor compiles the RMSNorms' row reductions
  (rows of the model's width) as one pass over each row instead of two (``kobllla.models._persistent``; a
  process-wide inductor heuristic, set when the model is built). Seen on a GPU for the forward; whether
  the backward's reductions follow is not yet checked there (docs/benchmarks.md, "eleventh session").
- ``freeze_gc=True``: the Python objects alive after the first forward passes (model, optimizer,
  compiled graphs) are frozen out of the cyclic collector's full passes, which otherwise stall the
  GPU's launches now and then: 0.40 s once in 30 stage-1 steps on an H100
  (``kobllla.gcpause.FreezeWhileWarming``; the collector stays on for later garbage).
- ``fused_rope=True``: the rotary position embedding of q and k as one vectorized Triton kernel each
  (forward and backward), with q's adapter output added inside it (``kobllla.models._rope``); torchtune's
  RoPE compiles to kernels that move their bytes at half the rate of the step's other elementwise ones.
  The same arithmetic as torchtune's (fp32, one rounding); on the CPU it runs in torch. Not yet run on a
  GPU (docs/benchmarks.md, "twelfth session"), so no config sets it.
- ``attention="flex_inline"``: flex attention traced into each compiled layer's graph instead of
  torchtune's separately compiled call (one graph per layer, not three; ``kobllla.models._fast``).

Weights, state-dict keys and checkpoints are torchtune's: a checkpoint saved by a run with
either option loads into the stock builder and vice versa.

Config::

    model:
      _component_: kobllla.models.lora_llama3_8b
      lora_attn_modules: ['q_proj', 'v_proj']
      lora_rank: 8
      lora_alpha: 16
      output: hidden          # with loss._component_: kobllla.losses.FusedLinearCrossEntropyLoss
      fp8: False
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from torchtune.modules import TransformerDecoder

from kobllla.losses import ProjectionInput

Output = Literal["logits", "hidden"]


class HiddenStateDecoder(TransformerDecoder):
    """A ``TransformerDecoder`` that leaves the output projection to the loss."""

    def unembed(self, h):  # noqa: ANN001, ANN201 - torchtune's signature
        return ProjectionInput(self.norm(h), self.output.weight)

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        raise ValueError(
            "this model was built with output: hidden, which needs loss._component_: "
            "kobllla.losses.FusedLinearCrossEntropyLoss (the config names CEWithChunkedOutputLoss); "
            "set both or neither"
        )


def _adapt(model: TransformerDecoder, *, output: Output, fp8: bool, fp8_output: bool = False,
           fuse_projections: bool = False, attention: str = "flex",
           persistent_norms: bool = False, freeze_gc: bool = False, fused_rope: bool = False) -> TransformerDecoder:
    switches = {"fp8": fp8, "fp8_output": fp8_output, "fuse_projections": fuse_projections,
                "persistent_norms": persistent_norms, "freeze_gc": freeze_gc, "fused_rope": fused_rope}
    for name, value in switches.items():  # a YAML `maybe` or `1` would otherwise switch it on unnoticed
        if not isinstance(value, bool):
            raise ValueError(f"model.{name} must be True or False, got {value!r}")
    if output not in ("logits", "hidden"):
        raise ValueError(f"model.output must be 'logits' or 'hidden', got {output!r}")
    if fp8_output and not fp8:
        raise ValueError("model.fp8_output needs model.fp8: True")
    if fp8_output and output == "hidden":
        raise ValueError("model.fp8_output needs output: logits (with output: hidden the loss does the projection "
                         "in bf16): add model.output=logits "
                         "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss")
    if output == "hidden":
        if type(model.output) is not nn.Linear:
            raise ValueError(
                f"output: hidden needs a plain untied output projection, got {type(model.output).__name__} "
                "(apply_lora_to_output and tied embeddings are not supported with it)"
            )
        model.__class__ = HiddenStateDecoder
    if fp8:
        from kobllla.models._fp8 import convert_frozen_linears_to_fp8

        convert_frozen_linears_to_fp8(model, skip=() if fp8_output else ("output",))
    if fuse_projections or attention != "flex" or fused_rope:
        from kobllla.models._fast import apply_fast_layers

        apply_fast_layers(model, fuse_projections=fuse_projections, attention=attention, fp8=fp8,
                          fused_rope=fused_rope)
    if persistent_norms:
        from kobllla.models._persistent import use_persistent_rows

        use_persistent_rows(model.tok_embeddings.embedding_dim)
    if freeze_gc:
        from kobllla.gcpause import freeze_while_warming

        freeze_while_warming(model)
    return model


def lora_llama3_8b(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    *,
    output: Output = "logits",
    fp8: bool = False,
    fp8_output: bool = False,
    fuse_projections: bool = False,
    attention: str = "flex",
    persistent_norms: bool = False,
    freeze_gc: bool = False,
    fused_rope: bool = False,
) -> TransformerDecoder:
    """torchtune's ``lora_llama3_8b`` with the speed options (see the module docstring).

    Raises:
        ValueError: an unknown ``output`` or ``attention``, ``output="hidden"`` with LoRA on the output
            projection, ``fp8_output`` without ``fp8`` or with ``output="hidden"``.
    """
    from torchtune.models.llama3 import lora_llama3_8b as build

    model = build(lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
                  lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return _adapt(model, output=output, fp8=fp8, fp8_output=fp8_output, fuse_projections=fuse_projections,
                  attention=attention, persistent_norms=persistent_norms, freeze_gc=freeze_gc,
                  fused_rope=fused_rope)


def lora_llama3(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: int | None = None,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    output: Output = "logits",
    fp8: bool = False,
    fp8_output: bool = False,
    fuse_projections: bool = False,
    attention: str = "flex",
    persistent_norms: bool = False,
    freeze_gc: bool = False,
    fused_rope: bool = False,
) -> TransformerDecoder:
    """torchtune's ``lora_llama3`` (any shape: the tiny test models) with the speed options."""
    from torchtune.models.llama3 import lora_llama3 as build

    model = build(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, vocab_size=vocab_size,
                  num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                  max_seq_len=max_seq_len, intermediate_dim=intermediate_dim, norm_eps=norm_eps, rope_base=rope_base,
                  lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return _adapt(model, output=output, fp8=fp8, fp8_output=fp8_output, fuse_projections=fuse_projections,
                  attention=attention, persistent_norms=persistent_norms, freeze_gc=freeze_gc,
                  fused_rope=fused_rope)
