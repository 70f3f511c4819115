"""The CPU bridge patches exactly the four CUDA-only spots and finds the stock recipes;
``tools.tune_cpu`` reports a bad config, checkpoint or dataset row in one line before any
worker starts, and a worker's failure as its last line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kobllla import cpu_bridge
from kobllla.assets import llama3_tokenizer_model_path
from tests.conftest import REPO


def test_bridge_makes_the_cuda_only_calls_work_on_cpu():
    from torchtune import training

    assert cpu_bridge.apply() is (not torch.cuda.is_available())
    stats = training.get_memory_stats(device=torch.device("cpu"))
    assert set(stats) == {"peak_memory_active", "peak_memory_alloc", "peak_memory_reserved"}
    assert 0.05 < stats["peak_memory_alloc"] < 64  # this process's peak RSS in GiB
    training.cleanup_before_training()  # calls torch.cpu.empty_cache / reset_peak_memory_stats


def test_stock_recipes_are_found_by_name():
    path = cpu_bridge.stock_recipe_path("lora_finetune_distributed")
    assert path.name == "lora_finetune_distributed.py" and path.is_file()


def test_unknown_recipe_lists_the_known_ones():
    known = r"unknown recipe 'lora_finetune'; choose one of \[.*'lora_finetune_distributed'"
    with pytest.raises(ValueError, match=known):
        cpu_bridge.stock_recipe_path("lora_finetune")
    with pytest.raises(FileNotFoundError, match=r"nope\.py: no such recipe file"):
        cpu_bridge.stock_recipe_path("nope.py")


# ------------------------------------------------------------------ tools.tune_cpu as a user runs it

STAGE3 = REPO / "configs" / "tiny" / "stage3_kolima_bilima_lora.yaml"


def tune_cpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.tune_cpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def bad_kolima_config(tmp_path: Path, checkpoint: Path | None = None) -> tuple[Path, Path]:
    """Stage 3's tiny config on one KoLIMA file whose line 2 has one turn (an odd count)."""
    good = (REPO / "tests" / "assets" / "kolima_tiny.jsonl").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "kolima_bad.jsonl"
    bad.write_text("\n".join([good[0], '{"conversations": ["질문만 있고 답이 없다"]}', *good[1:]]) + "\n",
                   encoding="utf-8")
    cfg = OmegaConf.load(STAGE3)
    cfg.dataset = {"_component_": "kobllla.datasets.kolima_dataset", "source": "json", "data_files": str(bad),
                   "packed": True}
    cfg.tokenizer.path = str(llama3_tokenizer_model_path())
    cfg.output_dir = str(tmp_path / "out")
    if checkpoint is not None:
        cfg.checkpointer.checkpoint_dir = str(checkpoint)
    path = tmp_path / "stage3_bad.yaml"
    OmegaConf.save(cfg, path)
    return path, bad


def test_tune_cpu_help_names_the_config_and_key_value_overrides():
    proc = subprocess.run([sys.executable, "-m", "tools.tune_cpu", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--config FILE" in proc.stdout and "key=value" in proc.stdout and "epochs=1" in proc.stdout


def test_tune_cpu_missing_config_file_is_one_line_not_a_traceback(tmp_path: Path):
    proc = tune_cpu("--nproc_per_node", "2", "lora_finetune_distributed", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert last_line(proc) == (f"error: --config {tmp_path / 'nope.yaml'}: no such file; the shipped configs are "
                               "under configs/tiny/ (CPU) and configs/llama3_8b/ (GPU)")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_tune_cpu_refuses_an_override_that_is_not_key_value():
    proc = tune_cpu("lora_finetune_distributed", "--config", str(STAGE3), "epochs")
    assert proc.returncode == 2
    assert last_line(proc).startswith("error: unknown argument 'epochs': after the recipe pass --config FILE and "
                                      "key=value overrides")
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_dir_is_reported_in_one_line_before_any_worker_starts(tmp_path: Path):
    config, _ = bad_kolima_config(tmp_path, checkpoint=tmp_path / "no-model")
    proc = tune_cpu("--nproc_per_node", "2", "lora_finetune_distributed", "--config", str(config))
    assert proc.returncode == 2
    assert last_line(proc) == (f"error: {config}: checkpointer.checkpoint_dir {tmp_path / 'no-model'} does not "
                               "exist; pass checkpointer.checkpoint_dir=DIR (the model to train from)")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_dataset_row_is_reported_in_one_line_before_any_worker_starts(tmp_path: Path, tiny_base: Path):
    config, bad = bad_kolima_config(tmp_path, checkpoint=tiny_base)
    before = bad.read_bytes()
    proc = tune_cpu("--nproc_per_node", "2", "lora_finetune_distributed", "--config", str(config))
    assert proc.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(str(config))}: dataset \(kobllla\.datasets\.kolima_dataset\): "
                        rf"{bad.name} line 2: field 'conversations' has 1 turns; expected user/assistant pairs .*",
                        last_line(proc)), last_line(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "torch.distributed" not in proc.stderr and "[rank" not in proc.stderr  # torchrun never started
    assert bad.read_bytes() == before and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_worker_failure_ends_with_its_one_line_cause(tmp_path: Path, tiny_base: Path):
    config, bad = bad_kolima_config(tmp_path, checkpoint=tiny_base)
    proc = tune_cpu("--nproc_per_node", "2", "--skip-data-check", "lora_finetune_distributed", "--config", str(config))
    assert proc.returncode == 1
    assert "[rank" in proc.stderr  # the workers ran and failed, with torchrun's summary after them
    want = rf"error: the recipe failed \(exit 1\): ValueError: {bad.name} line 2: field 'conversations' .*"
    assert re.fullmatch(want, last_line(proc)), last_line(proc)


def test_check_only_builds_the_datasets_and_starts_nothing(tmp_path: Path, tiny_base: Path):
    proc = tune_cpu("--check-only", "lora_finetune_distributed", "--config", str(STAGE3),
                    f"checkpointer.checkpoint_dir={tiny_base}", f"tokenizer.path={llama3_tokenizer_model_path()}",
                    f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (f"ok: {STAGE3}: recipe lora_finetune_distributed, checkpoint "
                                                    "files present, 1 dataset(s) built")
    assert not (tmp_path / "out").exists() and "[rank" not in proc.stderr
