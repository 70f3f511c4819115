"""Run torchtune 0.6.1's stock recipes on a CPU-only torch (tests, the demo, laptops).

The stock ``lora_finetune_distributed`` recipe is CUDA-only in exactly four places; this
module bridges those, works around one CPU-only bug (5.) and nothing else, then runs the
unmodified recipe file:

1. ``init_process_group("cuda:nccl,cpu:gloo")``: without CUDA, NCCL is not built in, so
   the backend becomes ``gloo``.
2. ``training.get_memory_stats`` raises on a CPU device: on CPU it reports the process's
   peak resident set size (GiB) under the three keys the recipe logs.
3. ``torch.cpu.empty_cache`` and 4. ``torch.cpu.reset_peak_memory_stats`` do not exist
   (``training.cleanup_before_training`` calls them): no-ops on CPU.

5. ``lora_finetune_single_device`` saves each epoch with ``get_merged_lora_ckpt({k: v.cpu() ...})``,
   which adds ``alpha/rank * B @ A`` to the weights *in place*; on a GPU ``.cpu()`` copies, on a CPU
   it returns the model's own tensors, so every save merged the adapter into the live frozen
   weights and each later epoch trained (and saved) on top of the adapter counted twice (the demo's
   stage 3, 2 epochs: merged ``lm_head`` off by up to 0.075 from ``W + 2 B A``). The merge now gets
   copies (``tests/test_recipes_integration.py``).

With CUDA available, :func:`apply` changes nothing, so the same command works on a GPU box.

Before any worker starts, :func:`launch` reads the config as ``tune run`` does (YAML plus
``key=value`` overrides) and builds its tokenizer and every dataset it names
(:func:`check_datasets`): a bad row is reported in one line before torchrun prints anything.
If a worker fails anyway, the launcher's last line repeats the first exception line a worker
printed, so the cause is not buried under torchrun's summary.

Worker entry point (what ``tools.tune_cpu`` starts under torchrun)::

    python -m kobllla.cpu_bridge <recipe.py> --config <config.yaml> [key=value ...]
"""

from __future__ import annotations

import os
import re
import resource
import runpy
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist


def _cpu_memory_stats(device: torch.device, reset_stats: bool = True) -> dict[str, float]:
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {"peak_memory_active": peak_rss_gib, "peak_memory_alloc": peak_rss_gib, "peak_memory_reserved": peak_rss_gib}


def apply() -> bool:
    """Installs the five CPU bridges when CUDA is unavailable; returns whether it did."""
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
    _merge_on_copies()
    return True


def _merge_on_copies() -> None:
    """``get_merged_lora_ckpt`` on copies of the tensors, so that a save never edits the live model."""
    from torchtune.modules import peft
    from torchtune.modules.peft import _utils

    real = _utils.get_merged_lora_ckpt
    if getattr(real, "_kobllla_bridge", False):
        return

    def get_merged_lora_ckpt(state_dict: dict, rank: int, alpha: float) -> dict:
        return real({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}, rank, alpha)

    get_merged_lora_ckpt._kobllla_bridge = True
    _utils.get_merged_lora_ckpt = peft.get_merged_lora_ckpt = get_merged_lora_ckpt


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


def load_config(config: Path, overrides: list[str]):
    """The ``DictConfig`` a recipe sees: the YAML merged with ``key=value`` / ``~key`` overrides
    by torchtune's own ``_merge_yaml_and_cli_args`` (as ``tune run`` does).

    Raises:
        FileNotFoundError: no such config file.
        ValueError: the YAML does not parse, or an override is not ``key=value``.
    """
    path = Path(config)
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"--config {path}: {what}; the shipped configs are under configs/tiny/ "
                                "(CPU) and configs/llama3_8b/ (GPU)")
    from argparse import Namespace

    from omegaconf import OmegaConf
    from torchtune.config._utils import _merge_yaml_and_cli_args

    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml's and omegaconf's parse errors share no base class
        raise ValueError(f"--config {path}: not valid YAML ({_first_line(exc)}); fix the file") from None
    if not isinstance(loaded, dict) and not OmegaConf.is_dict(loaded):
        raise ValueError(f"--config {path}: expected a mapping of recipe settings, got {type(loaded).__name__}")
    bad = [o for o in overrides if not re.match(r"^(~[^=~]+|[^=~]+=.*)$", o)]
    if bad:
        raise ValueError(f"unknown argument {bad[0]!r}: after the recipe pass --config FILE and key=value "
                         "overrides (e.g. epochs=1 dataset.data_files=my.jsonl)")
    return _merge_yaml_and_cli_args(Namespace(**OmegaConf.to_container(loaded, resolve=False)), list(overrides))


def check_checkpoint(cfg, *, config: Path) -> None:
    """The ``checkpointer``'s directory and listed weight files exist (the recipe loads them first).

    Raises:
        FileNotFoundError: naming the config key to fix.
    """
    from omegaconf import ListConfig

    ck = cfg.get("checkpointer")
    if ck is None or ck.get("checkpoint_dir") is None:
        return
    where = Path(str(ck.checkpoint_dir))
    if not where.is_dir():
        raise FileNotFoundError(f"{config}: checkpointer.checkpoint_dir {where} does not exist; pass "
                                "checkpointer.checkpoint_dir=DIR (the model to train from)")
    files = ck.get("checkpoint_files")
    missing = [str(f) for f in files if not (where / str(f)).is_file()] if isinstance(files, ListConfig) else []
    if missing:
        raise FileNotFoundError(f"{config}: checkpointer.checkpoint_files: {missing[0]} is not in {where} "
                                f"({len(missing)} missing); pass checkpointer.checkpoint_files=[...] naming its files")


def check_datasets(cfg, *, config: Path) -> int:
    """Builds the config's tokenizer and each ``dataset`` component the way the recipe will
    (``instantiate(cfg_dataset, tokenizer)``), so bad data fails here, once, in one line.
    Returns how many datasets were built (0 when the config names no tokenizer or dataset).

    Raises:
        ValueError: building the tokenizer or a dataset failed with a user error; the message
            names the config, the component and the builder's own one-line message.
    """
    if "dataset" not in cfg or "tokenizer" not in cfg:
        return 0
    from omegaconf import ListConfig
    from torchtune import config as tt_config

    parts = list(cfg.dataset) if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
    check_packed_collate(cfg, parts, config=config)
    tokenizer = _built(lambda: tt_config.instantiate(cfg.tokenizer), f"{config}: tokenizer")
    for i, part in enumerate(parts):
        where = f"dataset[{i}]" if isinstance(cfg.dataset, ListConfig) else "dataset"
        _built(lambda part=part: tt_config.instantiate(part, tokenizer),
               f"{config}: {where} ({part.get('_component_', '?')})")
    return len(parts)


def check_packed_collate(cfg, parts: list, *, config: Path) -> None:
    """``dataset.pack`` and ``collate_fn: kobllla.datasets.packed_collate`` go together.

    torchtune's recipes use the config's ``collate_fn`` only when ``dataset.packed`` is unset, so
    ``pack: True`` without it would collate packs with ``padded_collate_sft`` (no document masks).

    Raises:
        ValueError: one without the other, naming the config and the fix.
    """
    from kobllla.datasets._collate import COLLATE_PATH as PACKED_COLLATE
    from kobllla.datasets._collate import COLLATE_PATHS, VARLEN_COLLATE_PATH

    collate = cfg.get("collate_fn")
    packs = [bool(part.get("pack", False)) for part in parts]
    if any(packs) and collate not in COLLATE_PATHS:
        raise ValueError(f"{config}: dataset.pack: True needs `collate_fn: {PACKED_COLLATE}` at the config's top "
                         f"level (got {collate or 'none'}); torchtune's collate would drop the document masks")
    if collate in COLLATE_PATHS and not all(packs):
        raise ValueError(f"{config}: collate_fn: {collate} needs every dataset built with pack: True "
                         "(set dataset.pack=True and drop dataset.packed)")
    attention = cfg.get("model", {}).get("attention")
    if attention is not None:
        from kobllla.models._fast import ATTENTIONS

        if attention not in ATTENTIONS:
            raise ValueError(f"{config}: model.attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    cudnn = attention == "cudnn"
    if cudnn and collate != VARLEN_COLLATE_PATH:
        raise ValueError(f"{config}: model.attention: cudnn needs packs collated by `collate_fn: "
                         f"{VARLEN_COLLATE_PATH}` with dataset.pack: True (got {collate or 'none'})")
    if collate == VARLEN_COLLATE_PATH and not cudnn:
        raise ValueError(f"{config}: collate_fn: {VARLEN_COLLATE_PATH} gives document offsets that only a model "
                         f"built with `attention: cudnn` reads (model._component_: kobllla.models.lora_llama3_8b); "
                         f"set model.attention=cudnn or collate_fn={PACKED_COLLATE}")


def _built(build, where: str):
    from kobllla.cli import one_line

    try:
        return build()
    except (ValueError, OSError, KeyError, TypeError) as exc:  # bad path, row, field or argument
        raise ValueError(f"{where}: {one_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_run(recipe: str, recipe_args: list[str]) -> tuple[Path, int]:
    """Everything :func:`launch` checks before starting workers; returns the config path and how
    many datasets were built. For ``tune run`` on GPUs, where no launcher of ours runs first."""
    stock_recipe_path(recipe)
    config, overrides = _split_config(recipe_args)
    cfg = load_config(config, overrides)
    check_checkpoint(cfg, config=config)
    return config, check_datasets(cfg, config=config)


def launch(recipe: str, recipe_args: list[str], *, nproc_per_node: int | None = None,
           check_data: bool = True) -> int:
    """Runs a stock recipe with the CPU bridges, like ``tune run``; returns its exit code.

    ``recipe_args`` are ``--config FILE`` and ``key=value`` overrides. The config is read and
    (``check_data``) its checkpoint files checked and its datasets built first
    (:func:`check_checkpoint`, :func:`check_datasets`). Distributed recipes (or
    any ``nproc_per_node``) start under ``torch.distributed.run`` (``--standalone``), one process
    per rank; single-device recipes run in a child process.

    Raises:
        FileNotFoundError, ValueError: unknown recipe, missing config, bad override or bad data.
    """
    if check_data:
        check_run(recipe, recipe_args)
    else:
        stock_recipe_path(recipe)  # fail fast on an unknown name
        load_config(*_split_config(recipe_args))
    worker = ["-m", "kobllla.cpu_bridge", recipe, *recipe_args]
    if nproc_per_node is None and "distributed" in Path(recipe).stem:
        nproc_per_node = 1
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               *worker]
    else:
        cmd = [sys.executable, *worker]
    return run_reporting_cause(cmd)


def _split_config(recipe_args: list[str]) -> tuple[Path, list[str]]:
    args = list(recipe_args)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1]), args[:i] + args[i + 2:]
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]), args[:i] + args[i + 1:]
    raise ValueError("missing --config FILE: the recipe's YAML config, "
                     "e.g. --config configs/tiny/stage1_kowiki_lora.yaml")


# An exception's last line as a worker prints it (torchrun prefixes "[rankN]: "); torchrun's own
# ChildFailedError summary is not a cause.
_CAUSE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*(?:Error|Exception)|error): .+)$")


def run_reporting_cause(cmd: list[str]) -> int:
    """Runs ``cmd``, passing its output through; if it fails, prints ``error: ...`` with the first
    exception line it printed as the last line, and returns its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    causes: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(src, dst, causes), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in pumps:
        t.start()
    rc = proc.wait()
    for t in pumps:
        t.join()
    if rc != 0:
        from kobllla.cli import one_line

        cause = causes[0] if causes else "no exception line in its output; see above"
        print(f"error: the recipe failed (exit {rc}): {one_line(cause)}", file=sys.stderr, flush=True)
    return rc


def _pump(src: IO[bytes], dst: IO[str], causes: list[str]) -> None:
    """Copies ``src`` to ``dst`` as it arrives (progress bars too) and notes exception lines."""
    partial = b""
    while chunk := os.read(src.fileno(), 1 << 16):
        dst.buffer.write(chunk)
        dst.flush()
        *lines, partial = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            match = _CAUSE.match(line.decode("utf-8", "replace").strip())
            if match and "ChildFailedError" not in match.group(1):
                causes.append(match.group(1))


def main(argv: list[str] | None = None) -> int:
    """Applies the bridges, then runs the recipe file as ``__main__`` with the rest of argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m kobllla.cpu_bridge <recipe name or .py> --config <yaml> [key=value ...]",
              file=sys.stderr)
        return 2
    recipe = stock_recipe_path(argv[0])
    apply()
    sys.argv = [str(recipe), *argv[1:]]
    runpy.run_path(str(recipe), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
