"""`tune run` for machines without CUDA: the stock torchtune 0.6.1 recipes, bridged for CPU.

    python -m tools.tune_cpu --nproc_per_node 2 lora_finetune_distributed \\
        --config configs/tiny/stage1_kowiki_lora.yaml
    python -m tools.tune_cpu lora_finetune_single_device --config configs/tiny/stage1_kowiki_qlora_single_device.yaml
    # check a GPU run's config, checkpoint files and data here first, then start it with `tune run`
    python -m tools.tune_cpu --check-only lora_finetune_distributed \\
        --config configs/llama3_8b/stage3_kolima_bilima_lora.yaml
    # key=value overrides after the config, as with `tune run` (~key removes a key)
    python -m tools.tune_cpu --nproc_per_node 2 lora_finetune_distributed \\
        --config configs/tiny/stage3_kolima_bilima_lora.yaml epochs=1 output_dir=runs/tiny/try

Arguments as `tune run`: a recipe name (or a .py path), --config FILE, then key=value overrides.
Before any worker starts, the config is read with the overrides and its tokenizer and datasets
are built once, so a bad row or path is one `error:` line (--skip-data-check skips this). If
the run fails later, its last line is `error: ...` with the first exception a worker printed.
The recipe files are torchtune's own; kobllla.cpu_bridge only swaps NCCL for gloo and bridges
CUDA memory calls (see its docstring). With CUDA present it changes nothing: on a GPU box use
`tune run` directly.
"""

from __future__ import annotations

import sys

from kobllla.cli import make_parser, run
from kobllla.cpu_bridge import check_run, launch


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.tune_cpu")
    parser.add_argument("--nproc_per_node", type=int, default=None,
                        help="processes (ranks) on this machine (default: 1 for a distributed recipe)")
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the recipe's YAML config, e.g. configs/tiny/stage1_kowiki_lora.yaml")
    parser.add_argument("--skip-data-check", action="store_true",
                        help="start the workers without building the datasets first")
    parser.add_argument("--check-only", action="store_true",
                        help="check the config, checkpoint files and datasets, print what was checked, start nothing")
    parser.add_argument("recipe", help="torchtune recipe name (e.g. lora_finetune_distributed) or a .py path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as with tune run (e.g. epochs=1 dataset.data_files=x.jsonl)")
    args, unknown = parser.parse_known_args(argv)
    recipe_args = ["--config", args.config, *args.overrides, *unknown]
    if args.check_only:
        return run(lambda: _check(args.recipe, recipe_args))
    return run(lambda: launch(args.recipe, recipe_args, nproc_per_node=args.nproc_per_node,
                              check_data=not args.skip_data_check))


def _check(recipe: str, recipe_args: list[str]) -> int:
    config, datasets = check_run(recipe, recipe_args)
    print(f"ok: {config}: recipe {recipe}, checkpoint files present, {datasets} dataset(s) built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
