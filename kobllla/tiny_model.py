"""Random-init Llama-3-architecture checkpoints in Hugging Face format, offline.

The files are laid out as on the hub (``config.json``, safetensors with HF key names,
``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` with the Llama 3
chat template, ``original/tokenizer.model``), so the same code path that loads
Meta-Llama-3-8B loads them: torchtune's ``FullModelHFCheckpointer`` (model_type LLAMA3) and
``transformers.AutoModelForCausalLM``.

Presets:
    tiny: 2 layers, hidden 256, 4 heads (2 KV), MLP 512, real 128,256 vocabulary. Every
        linear weight has a multiple of 16,384 elements so QLoRA's NF4 quantizes it.
    mini: hidden 64, 2 heads (1 KV), MLP 256: the offline demo's model (fast on 2 CPU cores).
    llama3.2-1b-untied: the Llama-3.2-1B shape with an untied lm_head (1.24B params).
    llama3-8b: Meta-Llama-3-8B's exact shape (8.03B params), for GPU benchmarks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from kobllla.assets import llama3_tokenizer_json_path, llama3_tokenizer_model_path
from kobllla.atomic import atomic_output_dir, write_json
from kobllla.chat_format import BOS_ID, END_OF_TEXT_ID, EOT_ID, LLAMA3_CHAT_TEMPLATE
from kobllla.checkpoint_io import ShardedSafetensorsWriter

Flavor = Literal["base", "instruct"]


@dataclass(frozen=True)
class ModelShape:
    """Architecture fields of a Llama 3 model (HF ``config.json`` names in comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    intermediate: int  # intermediate_size
    vocab: int = 128256  # vocab_size
    max_seq_len: int = 8192  # max_position_embeddings
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, max_seq_len=2048),
    # The offline demo's model: the output layer over 128,256 tokens dominates a tiny model's
    # compute, so hidden 64 trains ~4x faster than "tiny" on 2 CPU cores (not NF4-compatible).
    "mini": ModelShape(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=256, max_seq_len=2048),
    "llama3.2-1b-untied": ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
    "llama3-8b": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
}

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def hf_config(shape: ModelShape, *, flavor: Flavor, dtype: str) -> dict:
    """The ``config.json`` Meta-Llama-3-8B ships, with this shape's numbers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOT_ID if flavor == "instruct" else END_OF_TEXT_ID,
        "torch_dtype": dtype,
    }


def hf_tensor_shapes(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in the order the hub files list them."""
    d, hd = shape.hidden, shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, d))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (shape.heads * hd, d)),
            (f"{p}.self_attn.k_proj.weight", (shape.kv_heads * hd, d)),
            (f"{p}.self_attn.v_proj.weight", (shape.kv_heads * hd, d)),
            (f"{p}.self_attn.o_proj.weight", (d, shape.heads * hd)),
            (f"{p}.mlp.gate_proj.weight", (shape.intermediate, d)),
            (f"{p}.mlp.up_proj.weight", (shape.intermediate, d)),
            (f"{p}.mlp.down_proj.weight", (d, shape.intermediate)),
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
        ]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (shape.vocab, d))]
    return out


def _init_tensor(name: str, size: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(size, dtype=dtype)
    return torch.empty(size, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)


def write_tokenizer_files(out_dir: Path, *, flavor: Flavor, max_len: int) -> None:
    """Writes the Llama 3 tokenizer files the hub repos carry (HF and Meta's original)."""
    (out_dir / "original").mkdir(exist_ok=True)
    shutil.copyfile(llama3_tokenizer_model_path(), out_dir / "original" / "tokenizer.model")
    tok = json.loads(llama3_tokenizer_json_path().read_text(encoding="utf-8"))
    # Meta's hub tokenizer.json prepends <|begin_of_text|> (TemplateProcessing); the packaged
    # file has only ByteLevel, so HF tokenizers would silently drop BOS.
    bos = "<|begin_of_text|>"
    tok["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": bos, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": bos, "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
            },
        ],
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    eos = "<|eot_id|>" if flavor == "instruct" else "<|end_of_text|>"
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    })
    write_json(out_dir / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})


def make_model(
    out_dir: Path,
    *,
    preset: str = "tiny",
    flavor: Flavor = "base",
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Writes a random-init Llama 3 checkpoint in Hugging Face format.

    Args:
        out_dir (Path): where the checkpoint goes (written atomically).
        preset (str): one of ``PRESETS``.
        flavor (Flavor): ``base`` (eos ``<|end_of_text|>``) or ``instruct`` (eos ``<|eot_id|>``).
        seed (int): seed of the weights; the same seed gives bit-identical files.
        dtype (str): ``bfloat16`` (as Meta ships), ``float32`` or ``float16``.
        max_shard_bytes (int): shard size; smaller than the model gives an index + shards.
        overwrite (bool): replace an existing ``out_dir``.

    Returns:
        Path: ``out_dir``.

    Raises:
        ValueError: unknown preset, flavor or dtype.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if flavor not in ("base", "instruct"):
        raise ValueError(f"unknown flavor {flavor!r}; choose 'base' or 'instruct'")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    shape = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
        for name, size in hf_tensor_shapes(shape):
            writer.add(name, _init_tensor(name, size, gen, _DTYPES[dtype]))
        writer.close()
        write_json(tmp / "config.json", hf_config(shape, flavor=flavor, dtype=dtype))
        eos_ids = [END_OF_TEXT_ID, EOT_ID] if flavor == "instruct" else END_OF_TEXT_ID
        write_json(tmp / "generation_config.json", {
            "bos_token_id": BOS_ID, "eos_token_id": eos_ids, "do_sample": True,
            "temperature": 0.6, "top_p": 0.9, "max_length": shape.max_seq_len,
        })
        write_tokenizer_files(tmp, flavor=flavor, max_len=shape.max_seq_len)
        write_json(tmp / "kobllla_model.json", {
            "made_by": "kobllla.tiny_model.make_model", "preset": preset, "flavor": flavor,
            "seed": seed, "dtype": dtype, "shape": asdict(shape), "num_params": shape.num_params(),
        })
    return Path(out_dir)
