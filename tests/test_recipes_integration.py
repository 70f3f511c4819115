"""The stock torchtune recipes, for real: 2 CPU processes over gloo on the tiny model.

Stage 1 runs through ``lora_finetune_distributed`` on a repeated Korean corpus, is killed
(SIGKILL) after its first saved epoch and resumed; stage 3 runs from stage 1's output on the
KoLIMA/BiLIMA mix; QLoRA runs through ``lora_finetune_single_device``. Each output is a HF
checkpoint that transformers loads with logits equal to torchtune's model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kobllla.corpora import constitution_articles, write_text_csv
from kobllla.demo._pipeline import logged_losses as demo_logged_losses
from tests.conftest import REPO

pytestmark = pytest.mark.integration

STEPS_PER_EPOCH = 8
TINY_DIMS = dict(
    vocab_size=128256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256,
    max_seq_len=2048, intermediate_dim=512, norm_eps=1e-5, rope_base=500000.0,
)


def tune_cpu(args: list[str], log: Path, *, nproc: int | None = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tools.tune_cpu"]
    if nproc:
        cmd += ["--nproc_per_node", str(nproc)]
    handle = open(log, "w")
    return subprocess.Popen(cmd + args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ok(proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"recipe failed (exit {rc}):\n{log.read_text()[-4000:]}"


def logged_losses(output_dir: Path) -> dict[int, float]:
    """Step -> loss from torchtune's DiskLogger files (a resumed run appends a new file)."""
    return dict(demo_logged_losses(output_dir))


def torchtune_logits(ckpt_dir: Path, files: list[str], tokens: torch.Tensor) -> torch.Tensor:
    from torchtune.models.llama3 import llama3
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir), checkpoint_files=files, model_type="LLAMA3",
        output_dir=str(ckpt_dir.parent / "unused-out"),
    )
    model = llama3(**TINY_DIMS)
    model.load_state_dict({k: v.float() for k, v in ckpt.load_checkpoint()["model"].items()})
    with torch.no_grad():
        return model.eval()(tokens)


def hf_logits(ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def assert_hf_matches_torchtune(ckpt_dir: Path, tokenizer_model: Path) -> None:
    from torchtune.models.llama3 import llama3_tokenizer

    tok = llama3_tokenizer(str(tokenizer_model))
    tokens = torch.tensor([tok.encode("대한민국의 주권은 국민에게 있다. The capital is Seoul.")])
    files = sorted(p.name for p in ckpt_dir.glob("model-*.safetensors"))
    a, b = torchtune_logits(ckpt_dir, files, tokens), hf_logits(ckpt_dir, tokens)
    assert a.shape == b.shape == (1, tokens.shape[1], 128256)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    # A repeated tiny Korean corpus: the Constitution's first 12 articles, 6 times over.
    corpus = write_text_csv(root / "ko.csv", constitution_articles()[:12], repeat=6)
    return {"root": root, "base": tiny_base, "corpus": corpus}


@pytest.fixture(scope="module")
def stage1(work) -> Path:
    """Stage 1 for 3 epochs: SIGKILLed after epoch 0 is saved, then resumed to the end."""
    out = work["root"] / "stage1"
    args = [
        "lora_finetune_distributed", "--config", "configs/tiny/stage1_kowiki_lora.yaml",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={work['base']}",
        f"tokenizer.path={work['base']}/original/tokenizer.model", f"dataset.data_files={work['corpus']}",
        "epochs=3", f"max_steps_per_epoch={STEPS_PER_EPOCH}",
    ]
    log = work["root"] / "stage1-killed.log"
    proc = tune_cpu(args, log)
    deadline = time.time() + 420
    while "Recipe checkpoint of size" not in log.read_text():
        assert proc.poll() is None, f"stage 1 ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "stage 1 saved no epoch in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "epoch_2").exists()
    resumed_log = work["root"] / "stage1-resumed.log"
    wait_ok(tune_cpu([*args, "resume_from_checkpoint=True"], resumed_log), resumed_log)
    return out


def test_stage1_resumes_after_a_kill_and_finishes_every_epoch(stage1, work):
    assert (stage1 / "epoch_0").is_dir() and (stage1 / "epoch_2").is_dir()
    resumed = (work["root"] / "stage1-resumed.log").read_text()
    assert re.search(
        r"Loading the recipe state using: \s*checkpoint_paths: .*\s*recipe_checkpoint: .*recipe_state\.pt"
        r"\s*adapter_checkpoint: .*epoch_0/adapter_model\.pt",
        resumed,
    )
    losses = logged_losses(stage1)
    # the resumed run continues the step count where epoch 0 ended
    assert sorted(losses)[-1] == 3 * STEPS_PER_EPOCH
    assert set(range(STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH + 1)) <= set(losses)


def test_stage1_lowers_the_loss_on_a_repeated_korean_corpus(stage1):
    losses = logged_losses(stage1)
    first = [losses[s] for s in range(1, 5)]
    last = [losses[s] for s in range(3 * STEPS_PER_EPOCH - 3, 3 * STEPS_PER_EPOCH + 1)]
    assert sum(last) / 4 < sum(first) / 4 - 0.3, f"loss did not fall: first {first}, last {last}"


def test_stage1_output_is_a_hf_checkpoint_with_torchtunes_logits(stage1, work):
    final = stage1 / "epoch_2"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert_hf_matches_torchtune(final, work["base"] / "original" / "tokenizer.model")
    # and training changed the weights
    from safetensors.torch import load_file

    trained = load_file(str(next(final.glob("model-*.safetensors"))))
    base = load_file(str(work["base"] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[name].float(), base[name].float())


def test_stage3_runs_from_stage1_output_on_the_kolima_bilima_mix(stage1, work):
    src = stage1 / "epoch_2"
    out = work["root"] / "stage3"
    files = sorted(p.name for p in src.glob("model-*.safetensors"))
    log = work["root"] / "stage3.log"
    proc = tune_cpu([
        "lora_finetune_distributed", "--config", "configs/tiny/stage3_kolima_bilima_lora.yaml",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={src}", f"checkpointer.checkpoint_files=[{','.join(files)}]",
        f"tokenizer.path={src}/original/tokenizer.model",
    ], log)
    wait_ok(proc, log)
    assert logged_losses(out), "stage 3 logged no training step"
    assert_hf_matches_torchtune(out / "epoch_0", src / "original" / "tokenizer.model")


def test_qlora_single_device_trains_and_saves_a_loadable_checkpoint(work):
    out = work["root"] / "qlora"
    log = work["root"] / "qlora.log"
    proc = tune_cpu([
        "lora_finetune_single_device", "--config", "configs/tiny/stage1_kowiki_qlora_single_device.yaml",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={work['base']}",
        f"tokenizer.path={work['base']}/original/tokenizer.model", f"dataset.data_files={work['corpus']}",
        "max_steps_per_epoch=2",
    ], log, nproc=None)
    wait_ok(proc, log)
    assert sorted(logged_losses(out)) == [1, 2]
    assert_hf_matches_torchtune(out / "epoch_0", work["base"] / "original" / "tokenizer.model")


def test_single_device_lora_saves_each_epoch_without_merging_into_the_live_model(work):
    """torchtune 0.6.1's single-device recipe merges ``W + alpha/rank * B A`` in place into
    ``{k: v.cpu()}``, which on a CPU is the live model: without kobllla.cpu_bridge's copy, every
    later epoch trained and saved on top of the adapter counted twice. Reference: the saved
    adapter and the input checkpoint, merged here by hand."""
    from safetensors.torch import load_file

    out = work["root"] / "single-2ep"
    log = work["root"] / "single-2ep.log"
    wait_ok(tune_cpu([
        "lora_finetune_single_device", "--config", "configs/tiny/stage1_kowiki_lora.yaml",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={work['base']}",
        f"tokenizer.path={work['base']}/original/tokenizer.model", f"dataset.data_files={work['corpus']}",
        "epochs=2", "max_steps_per_epoch=2", "batch_size=2",
    ], log, nproc=None), log)
    base = {k: v.float() for f in work["base"].glob("*.safetensors") for k, v in load_file(f).items()}
    for epoch in ("epoch_0", "epoch_1"):
        adapter = load_file(out / epoch / "adapter_model.safetensors")
        merged = {k: v.float() for f in (out / epoch).glob("model-*.safetensors") for k, v in load_file(f).items()}
        modules = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in adapter if "lora_A" in k)
        assert modules, adapter.keys()
        for m in modules:
            a = adapter[f"base_model.model.{m}.lora_A.weight"].float()
            b = adapter[f"base_model.model.{m}.lora_B.weight"].float()
            want = base[f"{m}.weight"] + (32 / 16) * b @ a  # the config's lora_alpha / lora_rank
            assert (b != 0).any(), f"{epoch} {m}: the adapter did not train"
            assert torch.allclose(merged[f"{m}.weight"], want, atol=1e-6), (
                f"{epoch} {m}: max diff {(merged[f'{m}.weight'] - want).abs().max().item():.3g}")
