"""Write a random-init Llama-3-architecture checkpoint in Hugging Face format.

    python -m tools.make_tiny_model --out runs/tiny/base                      # 2 layers, 65M params
    python -m tools.make_tiny_model --out runs/tiny/instruct --flavor instruct --seed 1
    python -m tools.make_tiny_model --out /data/8b --preset llama3-8b         # 8.03B params, 16 GB bf16

The output loads in torchtune's FullModelHFCheckpointer (model_type LLAMA3) and in
transformers.AutoModelForCausalLM, with the real Llama 3 tokenizer beside the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.tiny_model import PRESETS, make_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--flavor", default="base", choices=["base", "instruct"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size in GiB (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = make_model(
            args.out, preset=args.preset, flavor=args.flavor, seed=args.seed, dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = PRESETS[args.preset]
    print(f"wrote {out} ({args.preset}, {args.flavor}, {shape.num_params() / 1e6:.1f}M params, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
