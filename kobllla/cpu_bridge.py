"""Run torchtune 0.6.1's stock recipes on a CPU-only torch (tests, the demo, laptops).

The stock ``lora_finetune_distributed`` recipe is CUDA-only in exactly four places; this
module bridges those and nothing else, then runs the unmodified recipe file:

1. ``init_process_group("cuda:nccl,cpu:gloo")``: without CUDA, NCCL is not built in, so
   the backend becomes ``gloo``.
2. ``training.get_memory_stats`` raises on a CPU device: on CPU it reports the process's
   peak resident set size (GiB) under the three keys the recipe logs.
3. ``torch.cpu.empty_cache`` and 4. ``torch.cpu.reset_peak_memory_stats`` do not exist
   (``training.cleanup_before_training`` calls them): no-ops on CPU.

With CUDA available, :func:`apply` changes nothing, so the same command works on a GPU box.
Worker entry point (what ``tools.tune_cpu`` starts under torchrun)::

    python -m kobllla.cpu_bridge <recipe.py> --config <config.yaml> [key=value ...]
"""

from __future__ import annotations

import resource
import runpy
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _cpu_memory_stats(device: torch.device, reset_stats: bool = True) -> dict[str, float]:
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {"peak_memory_active": peak_rss_gib, "peak_memory_alloc": peak_rss_gib, "peak_memory_reserved": peak_rss_gib}


def apply() -> bool:
    """Installs the four CPU bridges when CUDA is unavailable; returns whether it did."""
    if torch.cuda.is_available():
        return False
    from torchtune import training
    from torchtune.training import memory

    original_init = dist.init_process_group
    if not getattr(original_init, "_kobllla_bridge", False):

        def init_process_group(backend: str | None = None, *args, **kwargs):
            if backend is not None and "nccl" in backend:
                backend = "gloo"
            return original_init(backend, *args, **kwargs)

        init_process_group._kobllla_bridge = True
        dist.init_process_group = init_process_group

    original_stats = memory.get_memory_stats

    def get_memory_stats(device: torch.device, reset_stats: bool = True) -> dict[str, float]:
        if device.type == "cpu":
            return _cpu_memory_stats(device, reset_stats)
        return original_stats(device, reset_stats)

    training.get_memory_stats = memory.get_memory_stats = get_memory_stats
    for name in ("empty_cache", "reset_peak_memory_stats"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *args, **kwargs: None)
    return True


def stock_recipe_path(recipe: str) -> Path:
    """Path of a torchtune recipe by name (``lora_finetune_distributed``) or a ``.py`` path.

    Raises:
        FileNotFoundError: a ``.py`` path that does not exist.
        ValueError: an unknown recipe name (the message lists the known ones).
    """
    if recipe.endswith(".py"):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"{recipe}: no such recipe file")
        return path
    import torchtune
    from torchtune._recipe_registry import get_all_recipes

    recipes = {r.name: r for r in get_all_recipes()}
    if recipe not in recipes:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(recipes)} or give a .py path")
    return Path(torchtune.__file__).parent.parent / "recipes" / recipes[recipe].file_path


def launch(recipe: str, recipe_args: list[str], *, nproc_per_node: int | None = None) -> int:
    """Runs a stock recipe with the CPU bridges, like ``tune run``; returns its exit code.

    Distributed recipes (or any ``nproc_per_node``) start under ``torch.distributed.run``
    (``--standalone``), one process per rank; single-device recipes run in a child process.
    """
    stock_recipe_path(recipe)  # fail fast on an unknown name
    worker = ["-m", "kobllla.cpu_bridge", recipe, *recipe_args]
    if nproc_per_node is None and "distributed" in Path(recipe).stem:
        nproc_per_node = 1
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}", *worker]
    else:
        cmd = [sys.executable, *worker]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """Applies the bridges, then runs the recipe file as ``__main__`` with the rest of argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m kobllla.cpu_bridge <recipe name or .py> --config <yaml> [key=value ...]", file=sys.stderr)
        return 2
    recipe = stock_recipe_path(argv[0])
    apply()
    sys.argv = [str(recipe), *argv[1:]]
    runpy.run_path(str(recipe), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
