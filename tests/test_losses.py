"""The fused output projection + cross-entropy and the float8 base linears, against torchtune.

Reference: torchtune 0.6.1's own path (``lora_llama3`` with ``set_num_output_chunks`` and
``CEWithChunkedOutputLoss``, as the stock recipe runs it), same weights, same batch; and a
float64 matmul for the float8 layers. The recipe test runs the stock ``tune run
lora_finetune_single_device`` on a tiny model with each config and compares the logged losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchtune.models.llama3 import lora_llama3
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from kobllla import models
from kobllla.losses import FusedLinearCrossEntropyLoss, ProjectionInput
from kobllla.models._fp8 import Fp8FrozenLinear, convert_frozen_linears_to_fp8, quantize_rows

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=1000, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128,
             intermediate_dim=128, lora_rank=4, lora_alpha=8)


def _pair(dtype: torch.dtype, **ours):
    """torchtune's model and ours with the same weights; LoRA B made nonzero so every adapter gets a gradient."""
    torch.manual_seed(0)
    ref = lora_llama3(["q_proj", "v_proj"], **SHAPE).to(dtype)
    for name, p in ref.named_parameters():
        if "lora_b" in name:
            p.data.normal_(0, 0.02)
    mine = models.lora_llama3(["q_proj", "v_proj"], **SHAPE, **ours).to(dtype)
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        set_trainable_params(m, get_adapter_params(m))
    return ref, mine


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 48), generator=g)
    labels = tokens.clone()
    labels[0, :7] = -100  # a prompt-like stretch and padding: ignored positions inside chunks
    labels[1, 40:] = -100
    return tokens, torch.hstack((labels[:, 1:], torch.full((2, 1), -100)))  # shifted as the recipe does


def _loss_and_grads(model, loss_fn, tokens, labels):
    if isinstance(loss_fn, CEWithChunkedOutputLoss):
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    loss = loss_fn(model(tokens), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_fused_loss_equals_torchtune_chunked_ce_in_value_and_every_adapter_gradient(chunk_size):
    ref, mine = _pair(torch.float32, output="hidden")
    tokens, labels = _batch()
    want, want_grads = _loss_and_grads(ref, CEWithChunkedOutputLoss(), tokens, labels)
    got, got_grads = _loss_and_grads(mine, FusedLinearCrossEntropyLoss(chunk_size=chunk_size), tokens, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(got_grads) == set(want_grads) and len(want_grads) == 8
    for name, g in want_grads.items():
        assert g.abs().sum() > 0, name
        assert _rel(got_grads[name], g) < 1e-5, name


def test_fused_loss_in_bf16_matches_torchtune_within_bf16_rounding():
    ref, mine = _pair(torch.bfloat16, output="hidden")
    tokens, labels = _batch()
    want, want_grads = _loss_and_grads(ref, CEWithChunkedOutputLoss(), tokens, labels)
    got, got_grads = _loss_and_grads(mine, FusedLinearCrossEntropyLoss(chunk_size=16), tokens, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 2e-2, name


def test_fused_loss_computes_the_output_weight_gradient_when_the_output_is_trained():
    ref, mine = _pair(torch.float32, output="hidden")
    for m in (ref, mine):
        m.output.weight.requires_grad_(True)
    tokens, labels = _batch()
    _, want = _loss_and_grads(ref, CEWithChunkedOutputLoss(), tokens, labels)
    _, got = _loss_and_grads(mine, FusedLinearCrossEntropyLoss(chunk_size=5), tokens, labels)
    assert _rel(got["output.weight"], want["output.weight"]) < 1e-5


def test_compiled_loss_module_runs_its_chunk_loop_eagerly():
    """The recipe wraps a non-chunked loss in torch.compile: the result must not change."""
    _, mine = _pair(torch.float32, output="hidden")
    tokens, labels = _batch()
    loss_fn = FusedLinearCrossEntropyLoss(chunk_size=8)
    with torch.no_grad():
        out = mine(tokens)
        assert torch.compile(loss_fn, backend="eager")(out, labels) == loss_fn(out, labels)


def test_hidden_output_model_keeps_torchtunes_state_dict_and_returns_hidden_states():
    ref, mine = _pair(torch.float32, output="hidden")
    assert list(mine.state_dict()) == list(ref.state_dict())
    out = mine(_batch()[0])
    assert isinstance(out, ProjectionInput) and out.hidden.shape == (2, 48, 64) and out.weight is mine.output.weight


def test_mismatched_model_and_loss_are_refused_with_the_fix():
    ref, mine = _pair(torch.float32, output="hidden")
    tokens, labels = _batch()
    with pytest.raises(TypeError, match="built with output='hidden'.*got Tensor: use torchtune.modules.loss.CEWith"):
        FusedLinearCrossEntropyLoss()(ref(tokens), labels)
    with pytest.raises(ValueError, match="needs loss._component_: kobllla.losses.FusedLinearCrossEntropyLoss"):
        mine.set_num_output_chunks(8)
    with pytest.raises(ValueError, match="model.output must be 'logits' or 'hidden', got 'logit'"):
        models.lora_llama3(["q_proj"], **SHAPE, output="logit")
    with pytest.raises(ValueError, match="output: hidden needs a plain untied output projection, got LoRALinear"):
        models.lora_llama3(["q_proj"], True, True, **SHAPE, output="hidden")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        FusedLinearCrossEntropyLoss(chunk_size=0)


# ---------------------------------------------------------------------------------------------
# float8
# ---------------------------------------------------------------------------------------------


def test_rowwise_quantization_uses_power_of_two_scales_and_stays_in_e4m3_range():
    x = torch.randn(32, 64) * torch.logspace(-3, 3, 32)[:, None]
    q, inv = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and inv.shape == (32, 1)
    assert torch.equal(torch.log2(inv), torch.log2(inv).round())
    assert (q.float().abs().amax(dim=1) > 224).all()  # each row uses the top octave of e4m3
    assert _rel(q.float() * inv, x) < 0.04


def test_fp8_linear_output_and_input_gradient_match_float64_within_fp8_error():
    torch.manual_seed(3)
    lin = nn.Linear(128, 96, bias=False).to(torch.bfloat16)
    lin.weight.requires_grad_(False)
    ref_w = lin.weight.detach().double()
    assert convert_frozen_linears_to_fp8(lin) == [""]
    assert isinstance(lin, Fp8FrozenLinear)
    x = torch.randn(4, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4, 16, 96, dtype=torch.bfloat16)
    y = lin(x)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert 1e-3 < _rel(y, x.detach().double() @ ref_w.t()) < 0.06  # not bf16-exact: it did run in fp8
    assert 1e-3 < _rel(x.grad, dy.double() @ ref_w) < 0.06


def test_fp8_weights_follow_load_state_dict_and_trained_weights_stay_exact():
    torch.manual_seed(4)
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.requires_grad_(False)
    convert_frozen_linears_to_fp8(lin)
    new = torch.randn(32, 64) * 5
    lin.load_state_dict({"weight": new})
    assert list(lin.state_dict()) == ["weight"]  # the float8 copies are not saved
    x = torch.randn(8, 64)
    assert _rel(lin(x), x.double() @ new.double().t()) < 0.06
    lin.weight.requires_grad_(True)
    assert torch.equal(lin(x), x @ lin.weight.t())


def test_fp8_model_converts_frozen_base_linears_only_and_tracks_bf16_loss():
    ref, mine = _pair(torch.bfloat16, output="hidden", fp8=True)
    names = {n for n, m in mine.named_modules() if hasattr(m, "refresh_fp8")}
    per_layer = {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3"}
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in per_layer}
    tokens, labels = _batch()
    want, want_grads = _loss_and_grads(ref, CEWithChunkedOutputLoss(), tokens, labels)
    got, got_grads = _loss_and_grads(mine, FusedLinearCrossEntropyLoss(), tokens, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-2)
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 0.15, name
    with pytest.raises(ValueError, match=r"fp8: layers.0.attn.k_proj is 8 x 64; float8 matmuls need multiples of 16"):
        models.lora_llama3(["q_proj"], **{**SHAPE, "num_kv_heads": 1, "num_heads": 8}, fp8=True)


# ---------------------------------------------------------------------------------------------
# The stock recipe with these components
# ---------------------------------------------------------------------------------------------


def _recipe_losses(tmp_path: Path, tiny_base: Path, variant: str) -> list[float]:
    """Losses logged by the stock recipe on the bench's config for ``variant`` (tiny model, CPU, fp32)."""
    sys.path.insert(0, str(REPO))
    from bench.train_gpu import write_recipe_config

    run_dir = tmp_path / variant
    cfg_path = run_dir / "config.yaml"
    files = sorted(p.name for p in tiny_base.glob("*.safetensors"))
    csv_path = REPO / "tests/assets/kowiki_tiny.csv"
    cfg = write_recipe_config(cfg_path, model_dir=tiny_base, files=files, csv_path=csv_path, run_dir=run_dir,
                              preset="tiny", seq_len=64, batch_size=2, steps=3, compile_model=False, device="cpu",
                              dtype="fp32", variant=variant)
    cfg["metric_logger"] = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                            "log_dir": str(run_dir / "logs")}
    cfg_path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "lora_finetune_single_device", "--config", str(cfg_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = next((run_dir / "logs").glob("log_*.txt")).read_text()
    return [float(item.split(":")[1]) for line in log.splitlines() for item in line.split() if item.startswith("loss:")]


@pytest.mark.integration  # five real `tune run`s (~60 CPU-s)
def test_stock_recipe_trains_with_the_fused_loss_and_fp8_to_the_same_losses(tmp_path, tiny_base):
    stock = _recipe_losses(tmp_path, tiny_base, "stock")
    fused = _recipe_losses(tmp_path, tiny_base, "fused")
    fast = _recipe_losses(tmp_path, tiny_base, "fast")  # fused q/k/v + gate/up, GQA attention
    fp8 = _recipe_losses(tmp_path, tiny_base, "fp8")
    fp8all = _recipe_losses(tmp_path, tiny_base, "fp8all")  # + float8 output projection
    assert len(stock) == len(fused) == len(fast) == len(fp8) == len(fp8all) >= 2
    assert fused == pytest.approx(stock, rel=1e-5)
    assert fast == pytest.approx(stock, rel=1e-5)
    assert fp8 == pytest.approx(stock, rel=1e-2) and fp8 != pytest.approx(stock, rel=1e-7)
    assert fp8all == pytest.approx(stock, rel=1e-2) and fp8all != pytest.approx(fp8, rel=1e-7)
    assert stock[0] != stock[-1]  # it trained
