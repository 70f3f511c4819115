"""``fused_rope``: the rotary embedding as one kernel per tensor, against torchtune's own RoPE.

References: torchtune 0.6.1's ``RotaryPositionalEmbeddings`` (the rotation and its autograd) and its
``lora_llama3`` layers with the same weights and batch. The Triton kernel runs on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess: the variable is read at import) and on a
GPU in the ``gpu`` test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchtune.modules import RotaryPositionalEmbeddings

from kobllla import models
from kobllla.models._rope import rope
from tests.test_fast_layers import SHAPE, _packed_batch, _pair, _rel, _step

ROOT = Path(__file__).resolve().parents[1]


def _rotation_case(dtype=torch.float32, heads=4, dim=16, seq=24, max_seq=64):
    g = torch.Generator().manual_seed(0)
    rp = RotaryPositionalEmbeddings(dim, max_seq_len=max_seq, base=500_000)
    x = torch.randn(2, seq, heads, dim, generator=g).to(dtype)
    delta = torch.randn(2, seq, heads, dim, generator=g).to(dtype)
    pos = torch.cat([torch.arange(10), torch.arange(seq - 10)]).expand(2, seq)  # two documents a row
    return rp, x, delta, pos


@pytest.mark.parametrize("packed", [True, False])
def test_rotation_and_its_gradients_equal_torchtunes(packed):
    rp, x, delta, pos = _rotation_case()
    pos = pos if packed else None
    g = torch.randn_like(x)
    a, d = x.clone().requires_grad_(), delta.clone().requires_grad_()
    (rope(a, rp.cache, pos, d) * g).sum().backward()
    a2, d2 = x.clone().requires_grad_(), delta.clone().requires_grad_()
    want = rp(a2 + d2, input_pos=pos)
    (want * g).sum().backward()
    assert torch.equal(rope(x, rp.cache, pos, delta), want.detach())
    assert torch.equal(a.grad, a2.grad) and torch.equal(d.grad, d2.grad)
    assert torch.equal(rope(x, rp.cache, pos), rp(x, input_pos=pos))  # no delta


def test_rotation_rounds_once_to_bf16_and_compiles_as_one_op():
    rp, x, delta, pos = _rotation_case(torch.bfloat16)
    want = rp((x.float() + delta.float()), input_pos=pos).to(torch.bfloat16)
    assert torch.equal(rope(x, rp.cache, pos, delta), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: rope(a, rp.cache, pos, b), fullgraph=True)
    assert torch.equal(compiled(x, delta), want)
    torch.library.opcheck(torch.ops.kobllla.rope.default, (x, delta, pos, rp.cache, False))


def test_a_sequence_longer_than_the_cache_is_refused():
    rp, x, delta, pos = _rotation_case(seq=80, max_seq=64)
    with pytest.raises(ValueError, match=r"fused_rope: sequence of 80 tokens, longer than the RoPE cache's 64 "):
        rope(x, rp.cache, None)


_PLAIN, _FUSED, _CUDNN = dict(fused_rope=True), dict(fused_rope=True, fuse_projections=True), \
    dict(fused_rope=True, attention="cudnn")


@pytest.mark.parametrize(("ours", "packed"), [(_PLAIN, True), (_PLAIN, False), (_FUSED, True), (_FUSED, False),
                                              (_CUDNN, True)])  # attention: cudnn takes packed batches only
def test_layers_with_fused_rope_match_torchtune_in_output_and_every_adapter_gradient(ours, packed):
    """LoRA on q, k, v and the output projection: q's and k's adapter outputs go through the rotation."""
    ref, mine = _pair(**ours)
    if packed:
        batch = _packed_batch()
        kw = dict(mask=batch["mask"], input_pos=batch["input_pos"])
        if ours.get("attention") == "cudnn":  # packed_varlen_collate's documents (the CPU runs torchtune's mask)
            from kobllla.packed_documents import packed_documents

            kw["mask"] = packed_documents([[10, 15, 7], [20, 4, 8]], 32)
        tokens = batch["tokens"]
    else:
        kw, tokens = {}, torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    want, want_grads = _step(ref, tokens, **(dict(mask=batch["mask"], input_pos=batch["input_pos"]) if packed else {}))
    got, got_grads = _step(mine, tokens, **kw)
    assert all(type(m.attn).__name__ == "FastAttention" and m.attn._fused_rope for m in mine.layers)
    assert _rel(got, want) < 1e-5
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 1e-4, name


def test_fused_rope_option_is_checked():
    with pytest.raises(ValueError, match=r"^model.fused_rope must be True or False, got 'yes'$"):
        models.lora_llama3(["q_proj"], **SHAPE, fused_rope="yes")
    from torchtune.models.llama3 import lora_llama3

    from kobllla.models._fast import apply_fast_layers

    model = lora_llama3(["q_proj"], **SHAPE)
    model.layers[1].attn.pos_embeddings = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"^model.fused_rope: layers.1.attn: its position embedding is Identity, "
                                         r"not torchtune's RoPE; set fused_rope: False$"):
        apply_fast_layers(model, fuse_projections=False, attention="flex", fp8=False, fused_rope=True)


_INTERPRETED = textwrap.dedent("""
    import torch
    from torchtune.modules import RotaryPositionalEmbeddings
    from kobllla.models._rope import _rope_torch, _rope_triton
    torch.manual_seed(0)
    worst = 0.0
    cases = [(4, 16, True, False), (3, 8, False, True), (8, 128, True, True), (32, 128, True, False)]
    for heads, dim, delta, inverse in cases:
        rp = RotaryPositionalEmbeddings(dim, max_seq_len=64, base=500_000)
        x = torch.randn(2, 24, heads, dim)
        d = torch.randn_like(x) if delta else None
        pos = torch.randint(0, 24, (2, 24))
        worst = max(worst, (_rope_triton(x, d, pos, rp.cache, inverse) - _rope_torch(x, d, pos, rp.cache, inverse))
                    .abs().max().item())
    print("WORST", worst)
""")


def test_triton_kernel_in_the_interpreter_equals_the_torch_arithmetic():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORST 0.0" in proc.stdout, proc.stdout  # fp32: the same products and sums, exactly


@pytest.mark.gpu
def test_triton_kernel_on_the_gpu_equals_the_torch_arithmetic_in_bf16():
    from kobllla.models._rope import _rope_torch, _rope_triton

    torch.manual_seed(0)
    rp = RotaryPositionalEmbeddings(128, max_seq_len=8192, base=500_000).cuda()
    for heads in (32, 8):
        x = torch.randn(2, 4096, heads, 128, device="cuda", dtype=torch.bfloat16)
        d = torch.randn_like(x)
        pos = torch.cat([torch.arange(1000), torch.arange(3096)]).expand(2, 4096).cuda()
        for inverse in (False, True):
            got = _rope_triton(x, d, pos, rp.cache, inverse)
            want = _rope_torch(x, d, pos, rp.cache, inverse)
            mismatch = (got != want).float().mean().item()
            assert (got.float() - want.float()).abs().max().item() <= 2 ** -6 * want.float().abs().max().item()
            assert mismatch < 1e-3, mismatch  # fused multiply-adds may round a product pair differently


@pytest.mark.integration  # two real `tune run`s of the shipped stage-1 config at the tiny shape (~30 CPU-s)
def test_fused_rope_through_the_stock_recipe_trains_the_same(tmp_path, tiny_base):
    from tests._tiny_recipe import tiny_stage1_losses

    shipped, fused = tiny_stage1_losses(tmp_path / "fused", tiny_base, model={"fused_rope": True})
    _, plain = tiny_stage1_losses(tmp_path / "plain", tiny_base, model={"fused_rope": False})
    assert shipped["model"]["fused_rope"] is False  # the shipped config's, until a GPU has run it
    assert len(fused) >= 2
    assert fused == pytest.approx(plain, rel=1e-6, abs=0)
