"""Write a random-init Llama-3-architecture checkpoint in Hugging Face format.

    python -m tools.make_tiny_model --out runs/tiny/base                      # 2 layers, 65M params
    python -m tools.make_tiny_model --out runs/tiny/instruct --flavor instruct --seed 1
    python -m tools.make_tiny_model --out /data/8b --preset llama3-8b         # 8.03B params, 16 GB bf16

The output loads in torchtune's FullModelHFCheckpointer (model_type LLAMA3) and in
transformers.AutoModelForCausalLM, with the real Llama 3 tokenizer beside the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.tiny_model import PRESETS, make_model


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.make_tiny_model")
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint goes (written atomically)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default tiny)")
    parser.add_argument("--flavor", default="base", choices=["base", "instruct"],
                        help="base: eos <|end_of_text|>; instruct: eos <|eot_id|> (default base)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights; the same seed gives bit-identical files (default 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="weight dtype (default bfloat16, as Meta ships)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="shard size in GiB; smaller than the model gives an index + shards (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


def _work(args) -> None:
    shard_bytes = int(args.max_shard_gb * 2**30)
    if shard_bytes < 1:
        raise ValueError(f"--max-shard-gb must be above 0, got {args.max_shard_gb}")
    out = make_model(
        args.out, preset=args.preset, flavor=args.flavor, seed=args.seed, dtype=args.dtype,
        max_shard_bytes=shard_bytes, overwrite=args.overwrite,
    )
    shape = PRESETS[args.preset]
    print(f"wrote {out} ({args.preset}, {args.flavor}, {shape.num_params() / 1e6:.1f}M params, {args.dtype})")


if __name__ == "__main__":
    sys.exit(main())
