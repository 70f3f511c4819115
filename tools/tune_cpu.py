"""`tune run` for machines without CUDA: the stock torchtune 0.6.1 recipes, bridged for CPU.

    python -m tools.tune_cpu --nproc_per_node 2 lora_finetune_distributed \
        --config configs/tiny/stage1_kowiki_lora.yaml
    python -m tools.tune_cpu lora_finetune_single_device --config configs/tiny/stage1_kowiki_qlora_single_device.yaml

Same arguments as `tune run` (recipe name or a .py path, --config, key=value overrides). The
recipe files are torchtune's own; kobllla.cpu_bridge only swaps NCCL for gloo and bridges CUDA
memory calls (see its docstring). With CUDA present it changes nothing: on a GPU box use
`tune run` directly.
"""

from __future__ import annotations

import argparse
import sys

from kobllla.cpu_bridge import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc_per_node", type=int, default=None, help="processes (ranks) on this machine")
    parser.add_argument("recipe", help="torchtune recipe name (e.g. lora_finetune_distributed) or a .py path")
    args, recipe_args = parser.parse_known_args(argv)
    try:
        return launch(args.recipe, recipe_args, nproc_per_node=args.nproc_per_node)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
