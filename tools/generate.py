"""Batch generation from any stage's output: one answer per prompt row, resumable.

    python -m tools.generate --model runs/demo/stage3/epoch_0 --prompts eval/prompts/ko_banmal.jsonl \\
        --out runs/answers.jsonl
    python -m tools.generate --model ./checkpoints/Llama-3-KoBLLa-ChatVec --prompts prompts.jsonl \\
        --out answers.jsonl --device cuda --batch-size 32 --max-new-tokens 512
    # an adapter-only torchtune epoch (save_adapter_weights_only: True) and the model it was trained from:
    python -m tools.generate --model out/stage3/epoch_2 --base ./checkpoints/Llama-3-KoBLLa-ChatVec \\
        --prompts prompts.jsonl --out answers.jsonl
    # sampling (reproducible: each row's sampler is seeded from --seed and the row id)
    python -m tools.generate --model M --prompts P --out O --temperature 0.7 --top-p 0.9 --seed 1

A prompt row is {"id": ..., "messages": [{"role": "user", "content": ...}]} (optional system message
first; the model's chat template is applied) or {"id": ..., "prompt": "raw text"}. An output row is
{"id", "text", "token_ids", "stop_reason": "eos"|"max_new_tokens", "new_tokens", "seconds"}; the rows
of a batch decode together, so "seconds" is the row's share of its batch's wall time (batch time / rows).
Generation stops at <|eot_id|> and <|end_of_text|> whatever the checkpoint's eos says. A rerun
skips the ids already in --out and appends the rest, one whole line per row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.generation import add_generation_flags


def _work(args: argparse.Namespace) -> int:
    from kobllla.generation import generate_file, options_from_args

    options = options_from_args(args)
    summary = generate_file(model=args.model, prompts=args.prompts, out=args.out, options=options, base=args.base)
    print(f"wrote {summary.generated} rows to {summary.out} ({summary.skipped} already there, "
          f"{summary.rows} in {args.prompts}); {summary.stopped}/{summary.generated} stopped at a stop token; "
          f"{summary.new_tokens} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.generate")
    parser.add_argument("--model", type=Path, required=True,
                        help="HF dir, torchtune epoch_N/, chat-vector output (adapter-only epoch_N/: add --base)")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON Lines prompt rows")
    parser.add_argument("--out", type=Path, required=True, help="JSON Lines answers (appended; a rerun resumes)")
    add_generation_flags(parser)
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
