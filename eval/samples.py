"""Side-by-side samples: every model answers the same prompts; language, speech level, length and stop per answer.

    python -m eval.samples --model chatvec=runs/chatvec --model stage3=runs/stage3/epoch_2 --out reports/samples
    python -m eval.samples --model instruct=checkpoints/Meta-Llama-3-8B-Instruct --model stage3=out/stage3/epoch_2 \\
        --base runs/chatvec --prompts eval/prompts/ko.jsonl --out reports/samples-ko --device cuda --batch-size 32
    # tiny CPU run (random weights: the answers are noise, the files and rates are real):
    python -m tools.make_tiny_model --out runs/tiny-a --preset mini --flavor instruct --dtype float32
    python -m tools.make_tiny_model --out runs/tiny-b --preset mini --flavor instruct --seed 1 --dtype float32
    python -m eval.samples --model a=runs/tiny-a --model b=runs/tiny-b --max-new-tokens 8 --out runs/samples-tiny

Writes OUT/samples.md and OUT/samples.html (one table per prompt, a column per model), OUT/samples.jsonl
(every answer with its metrics and token ids) and OUT/summary.json. Per model: the rate of answers in the
language the prompt expects (Korean vs Latin words, below), of Korean answers in jondaetmal (Kiwi's final
endings; plain -다 counts as banmal), and of answers that stopped at <|eot_id|>/<|end_of_text|>.
A prompt row is a tools.generate row plus "expect_lang": "ko"|"en" (or a "kind" ko/en/en_ko/ko_en it is
taken from); --prompts defaults to the shipped eval/prompts/ (Korean banmal, English, en_ko, ko_en).
--base is the one base model of every adapter-only epoch_N/ among the --model dirs (full-weight models
do not use it; it is refused when no model is adapter-only). Adapters trained from different bases:
merge each first (python -m tools.check_model EPOCH --base BASE --fix-stop-tokens --out DIR) and pass DIR.
Answer language: Korean when its Korean words (eojeols, "request를" included) are at least as many as
its Latin words; speech level: of every answer with Hangul (see kobllla/korean.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.generation import add_generation_flags

DEFAULT_PROMPTS = Path(__file__).parent / "prompts"


def _work(args: argparse.Namespace) -> int:
    from kobllla.evaluation import parse_named_dirs, read_sample_prompts, write_samples
    from kobllla.generation import options_from_args

    models = parse_named_dirs(args.model)
    options = options_from_args(args)
    rows = read_sample_prompts(args.prompts)
    summary = write_samples(models, rows, options, args.out, base=args.base, overwrite=args.overwrite,
                            prompts=args.prompts)
    for name, s in summary["models"].items():
        print(f"{name}: expected language {s['expected_lang']}/{s['answers']}, jondaetmal "
              f"{s['jondaetmal']}/{s['korean_answers']} Korean answers, stopped {s['stopped']}/{s['answers']}")
    print(f"wrote {args.out / 'samples.md'} and samples.html ({len(rows)} prompts x {len(models)} models)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.samples")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a model to sample, repeatable; NAME labels its column (letters, digits, ._+-)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="a .jsonl prompt file or a directory of them (default: the shipped eval/prompts/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (written when complete)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_generation_flags(parser)
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
