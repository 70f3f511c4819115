"""Fused q/k/v and gate/up projections and in-graph flex attention, against torchtune's own layers.

Reference: torchtune 0.6.1's ``lora_llama3`` with the same weights and batch (fp32: same values to
rounding; the fused matmul sums in another order). Packed batches go through flex attention with
torchtune's own document mask; unpacked ones through SDPA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune.models.llama3 import lora_llama3
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params

from kobllla import models
from kobllla.models._fast import FastAttention, FusedFeedForward

SHAPE = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128,
             intermediate_dim=128, lora_rank=4, lora_alpha=8)
TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _pair(**ours):
    torch.manual_seed(0)
    ref = lora_llama3(TARGETS, apply_lora_to_mlp=True, **SHAPE)
    for name, p in ref.named_parameters():
        if "lora_b" in name:
            p.data.normal_(0, 0.02)
    mine = models.lora_llama3(TARGETS, apply_lora_to_mlp=True, **SHAPE, **ours)
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        set_trainable_params(m, get_adapter_params(m))
    return ref, mine


def _step(model, tokens, **kw):
    out = model(tokens, **kw)
    loss = out.float().pow(2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _packed_batch():
    """Two packs of 32 tokens, three documents each: torchtune's collate gives input_pos and the mask."""
    from torchtune.data import padded_collate_packed

    g = torch.Generator().manual_seed(1)
    packs = []
    for lens in ([10, 15, 7], [20, 4, 8]):
        tokens = torch.randint(0, SHAPE["vocab_size"], (32,), generator=g)
        packs.append({"tokens": tokens, "labels": tokens.clone(), "seq_lens": torch.tensor(lens),
                      "input_pos": torch.cat([torch.arange(n) for n in lens])})
    return padded_collate_packed(packs)


@pytest.mark.parametrize("ours", [dict(fuse_projections=True), dict(attention="flex_inline"),
                                  dict(fuse_projections=True, attention="flex_inline")])
def test_fast_layers_match_torchtune_in_output_and_every_adapter_gradient(ours):
    ref, mine = _pair(**ours)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    want, want_grads = _step(ref, tokens)
    got, got_grads = _step(mine, tokens)
    assert _rel(got, want) < 1e-5
    assert set(got_grads) == set(want_grads) and len(want_grads) == 2 * 2 * (len(TARGETS) + 3)
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 1e-4, name


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _attention_matmuls(attn, x, **kw) -> int:
    with _CountMatmuls() as c:
        attn(x, x, **kw)
    return c.n


@pytest.mark.parametrize("alpha", [8.0, 3.0])  # alpha / rank 2 (exact when moved onto A x) and 0.75
def test_adapters_sharing_an_input_run_their_a_matmuls_as_one(alpha):
    """LoRA on q and v (the stage configs'): one matmul for both A's, the same outputs and gradients as
    torchtune's; an adapter with dropout or a disabled one keeps torchtune's own forward."""
    shape = {**SHAPE, "lora_alpha": alpha}
    torch.manual_seed(0)
    ref = lora_llama3(["q_proj", "v_proj"], **shape)
    for name, p in ref.named_parameters():
        if "lora_b" in name:
            p.data.normal_(0, 0.02)
    mine = models.lora_llama3(["q_proj", "v_proj"], **shape, attention="flex_inline")
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        set_trainable_params(m, get_adapter_params(m))
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    want, want_grads = _step(ref, tokens)
    got, got_grads = _step(mine, tokens)
    assert _rel(got, want) < 1e-5
    assert len(want_grads) == 2 * 2 * 2
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 1e-5, name
    x = torch.randn(1, 8, SHAPE["embed_dim"])
    attn_ref, attn = ref.layers[0].attn, mine.layers[0].attn
    # q, k, v, output: 4 base matmuls; torchtune: A and B per adapter (4); grouped: one A, two B's
    assert (_attention_matmuls(attn_ref, x), _attention_matmuls(attn, x)) == (8, 7)
    attn.v_proj.disabled = True
    assert _attention_matmuls(attn, x) == 6  # q's adapter alone: torchtune's forward
    attn.v_proj.disabled = False
    attn.v_proj.dropout = torch.nn.Dropout(0.1)
    assert _attention_matmuls(attn, x) == 8


def test_packed_batch_uses_torchtunes_document_mask():
    batch = _packed_batch()
    ref, mine = _pair(fuse_projections=True, attention="flex_inline")
    kw = dict(mask=batch["mask"], input_pos=batch["input_pos"])
    want, want_grads = _step(ref, batch["tokens"], **kw)
    got, got_grads = _step(mine, batch["tokens"], **kw)
    assert _rel(got, want) < 1e-5
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 1e-4, name
    # the mask matters: without it the second document would see the first
    unmasked, _ = _step(mine, batch["tokens"], input_pos=batch["input_pos"])
    assert _rel(unmasked, want) > 1e-2


def test_fused_weights_are_views_that_follow_loads_and_keep_torchtunes_keys_and_merge():
    ref, mine = _pair(fuse_projections=True)
    attn, mlp = mine.layers[0].attn, mine.layers[0].mlp
    assert isinstance(attn, FastAttention) and isinstance(mlp, FusedFeedForward)
    assert list(mine.state_dict()) == list(ref.state_dict())  # no fused key is saved
    assert attn.q_proj.weight.data_ptr() == attn._w_fused.data_ptr()  # a view: no second copy
    new = {k: torch.randn_like(v) if k.endswith("k_proj.weight") or k.endswith("mlp.w3.weight") else v
           for k, v in ref.state_dict().items()}
    ref.load_state_dict(new)
    mine.load_state_dict(new)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, 24))
    assert _rel(mine(tokens), ref(tokens)) < 1e-5
    merged_ref = get_merged_lora_ckpt({k: v.clone() for k, v in ref.state_dict().items()}, rank=4, alpha=8)
    merged = get_merged_lora_ckpt({k: v.clone() for k, v in mine.state_dict().items()}, rank=4, alpha=8)
    assert merged.keys() == merged_ref.keys()
    for k, v in merged_ref.items():
        assert torch.equal(merged[k], v), k


def test_trained_base_weights_fall_back_to_torchtunes_forward():
    _, mine = _pair(fuse_projections=True)
    for p in mine.parameters():
        p.requires_grad_(True)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    mine(tokens).sum().backward()
    assert mine.layers[0].attn.k_proj.weight.grad is not None  # trained through its own matmul


def test_fp8_fused_groups_quantize_once_and_track_bf16():
    torch.manual_seed(0)
    shape = {**SHAPE, "embed_dim": 128, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 256}
    ref = models.lora_llama3(["q_proj", "v_proj"], **shape).to(torch.bfloat16)
    mine = models.lora_llama3(["q_proj", "v_proj"], **shape, fp8=True, fuse_projections=True,
                              attention="flex_inline").to(torch.bfloat16)
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        set_trainable_params(m, get_adapter_params(m))
    attn = mine.layers[0].attn
    assert attn._w_q.dtype == torch.float8_e4m3fn and attn._w_q.shape == (128 + 2 * 64, 128)
    assert "_w_q" not in attn.q_proj._buffers  # the member's own float8 copy was freed
    tokens = torch.randint(0, shape["vocab_size"], (2, 32))
    want, got = ref(tokens).float(), mine(tokens).float()
    assert 1e-4 < _rel(got, want) < 0.08


def test_bad_fast_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"model.attention must be one of flex, flex_inline, cudnn, got 'sdpa'"):
        models.lora_llama3(["q_proj"], **SHAPE, attention="sdpa")
    with pytest.raises(ValueError, match=r"model.fp8_output needs model.fp8: True"):
        models.lora_llama3(["q_proj"], **SHAPE, fp8_output=True)
    with pytest.raises(ValueError, match=r"^model.persistent_norms must be True or False, got 'maybe'$"):
        models.lora_llama3(["q_proj"], **SHAPE, persistent_norms="maybe")
    with pytest.raises(ValueError, match=r"^model.freeze_gc must be True or False, got 'yes'$"):
        models.lora_llama3(["q_proj"], **SHAPE, freeze_gc="yes")
    with pytest.raises(ValueError, match=r"^model.fp8 must be True or False, got 1$"):
        models.lora_llama3(["q_proj"], **SHAPE, fp8=1)
    with pytest.raises(ValueError, match=r"model.fp8_output needs output: logits"):
        models.lora_llama3(["q_proj"], **SHAPE, fp8=True, fp8_output=True, output="hidden")
    from kobllla.models._fast import apply_fast_layers

    qlora = lora_llama3(["q_proj"], **{**SHAPE, "embed_dim": 256, "intermediate_dim": 512}, quantize_base=True)
    with pytest.raises(ValueError, match=r"fuse_projections: layers.0.attn has a bias or an NF4 base; only plain "
                                         r"bias-free linears fuse \(set fuse_projections: False\)"):
        apply_fast_layers(qlora, fuse_projections=True, attention="flex", fp8=False)


def test_inline_flex_on_a_block_mask_equals_torchtune_on_the_same_dense_mask(monkeypatch):
    """CPU torchtune builds a dense mask for packs (its BlockMask path is CUDA-only); the same
    document mask as a flex ``BlockMask`` through ``attention="flex_inline"``'s in-graph call (taken
    when compiling; here forced, eager) gives the same outputs."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch = _packed_batch()
    dense = batch["mask"]
    assert dense.dtype == torch.bool  # torchtune's CPU fallback
    docs = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
                        for lens in ([10, 15, 7], [20, 4, 8])])

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv])

    block = create_block_mask(mask_mod, 2, None, 32, 32, device="cpu")
    ref, mine = _pair(fuse_projections=True, attention="flex_inline")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():  # flex attention has no CPU backward (torch 2.13); the GPU benchmark trains through it
        want = ref(batch["tokens"], mask=dense, input_pos=batch["input_pos"])
        got = mine(batch["tokens"], mask=block, input_pos=batch["input_pos"])
        monkeypatch.undo()
        unmasked = mine(batch["tokens"], input_pos=batch["input_pos"])
    assert _rel(got, want) < 1e-5
    assert _rel(unmasked, want) > 1e-2


@pytest.mark.integration  # two real `tune run`s through tools.tune_cpu (~25 CPU-s)
def test_recipe_with_fused_groups_and_checkpointing_saves_the_same_merged_model(tmp_path, tiny_base):
    """The stock single-device recipe, activation checkpointing on, full merged save: torchtune's model
    and the fused one (views of the fused weights in the state dict) train and save the same model."""
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from bench.train_gpu import write_recipe_config

    files = sorted(p.name for p in tiny_base.glob("*.safetensors"))
    out = {}
    for variant in ("stock", "fast"):
        run = tmp_path / variant
        cfg = write_recipe_config(run / "c.yaml", model_dir=tiny_base, files=files,
                                  csv_path=repo / "tests/assets/kowiki_tiny.csv", run_dir=run, preset="tiny",
                                  seq_len=64, batch_size=2, steps=3, compile_model=False, device="cpu", dtype="fp32",
                                  variant=variant)
        cfg.update(enable_activation_checkpointing=True, save_adapter_weights_only=False,
                   metric_logger={"_component_": "torchtune.training.metric_logging.DiskLogger",
                                  "log_dir": str(run / "logs")})
        (run / "c.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "tools.tune_cpu", "lora_finetune_single_device", "--config",
                               str(run / "c.yaml")], cwd=repo, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shard = next((run / "out" / "epoch_0").glob("model-*.safetensors"))
        out[variant] = load_file(shard)
    assert out["stock"].keys() == out["fast"].keys()
    for k, v in out["stock"].items():
        torch.testing.assert_close(out["fast"][k], v, rtol=1e-5, atol=1e-6, msg=k)
