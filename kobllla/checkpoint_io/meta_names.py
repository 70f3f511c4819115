"""Meta's Llama tensor names (``consolidated.00.pth``, torchtune's Meta-format output) and
q/k row order, mapped to Hugging Face's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Meta (consolidated.*.pth / torchtune's Meta output) names -> Hugging Face names.
_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
}


def meta_to_hf_name(name: str, *, source: Path) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    key = f"layers.{{}}.{match.group(2)}" if match else name
    if key not in _META_TO_HF:
        raise ValueError(f"{source}: tensor {name} is not a Llama tensor in Meta's naming "
                         f"(known: {sorted(_META_TO_HF)})")
    return _META_TO_HF[key].format(match.group(1)) if match else _META_TO_HF[key]


def permute_meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (rotary pairs interleaved) -> HF's (halves), as torchtune's tune_to_hf."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)
