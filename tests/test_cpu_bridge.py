"""The CPU bridge patches exactly the four CUDA-only spots and finds the stock recipes."""

from __future__ import annotations

import pytest
import torch

from kobllla import cpu_bridge


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
    with pytest.raises(ValueError, match=r"unknown recipe 'lora_finetune'; choose one of \[.*'lora_finetune_distributed'"):
        cpu_bridge.stock_recipe_path("lora_finetune")
    with pytest.raises(FileNotFoundError, match=r"nope\.py: no such recipe file"):
        cpu_bridge.stock_recipe_path("nope.py")
