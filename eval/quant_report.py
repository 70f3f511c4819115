"""What each GGUF quant costs in Korean and in English: perplexity, KL divergence and top-1 agreement vs the HF model.

    python -m tools.export_gguf --model ./checkpoints/Llama-3-KoBLLa-ChatVec --out ./gguf/kobllla \\
        --quant f16,q8_0,q5_k_m,q4_k_m
    python -m eval.quant_report --model ./checkpoints/Llama-3-KoBLLa-ChatVec --gguf ./gguf/kobllla \\
        --heldout ko=data/heldout/ko.txt --heldout en=data/heldout/en.txt --out reports/quant
    # tiny CPU example (random weights: the report says what that means)
    python -m eval.quant_report --model runs/tiny/instruct --gguf runs/tiny/gguf \\
        --heldout ko=tests/assets/eval/heldout/ko.txt --heldout en=tests/assets/eval/heldout/en.txt \\
        --out runs/tiny/quant-report

Held-out text: .txt (documents separated by blank lines) or .jsonl (field "text"). The reference is
transformers in float32 on --model; every GGUF is run by llama.cpp (llama-cpp-python) on the same
token ids. Writes OUT/report.md, report.png and report.json (built aside, renamed when whole).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import cap, make_parser, run


def parse_heldout(values: list[str]) -> dict[str, Path]:
    """``["ko=FILE", "en=FILE"]`` -> ``{"ko": FILE, "en": FILE}``."""
    out = {}
    for v in values:
        lang, sep, path = v.partition("=")
        if not sep or not lang or not path:
            raise ValueError(f"--heldout {cap(v)}: expected LANG=FILE, e.g. --heldout ko=data/heldout/ko.txt")
        if lang in out:
            raise ValueError(f"--heldout {lang} given twice")
        out[lang] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.quant_report")
    parser.add_argument("--model", type=Path, required=True, help="the HF dir the GGUFs were exported from")
    parser.add_argument("--gguf", type=Path, action="append", required=True,
                        help="an export directory (tools.export_gguf --out) or a .gguf file; repeat for more")
    parser.add_argument("--heldout", action="append", default=[], metavar="LANG=FILE",
                        help="held-out text per language; repeat (ko=..., en=...)")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="scored tokens per language (default 2048)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="device of the transformers reference (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


def _work(args) -> int:
    from kobllla.gguf.report import quant_report

    result = quant_report(model=args.model, gguf=args.gguf, heldout=parse_heldout(args.heldout), out=args.out,
                          ctx=args.ctx, max_tokens=args.max_tokens, threads=args.threads, device=args.device,
                          overwrite=args.overwrite)
    for r in result["rows"]:
        print(f"{r['quant']:>8} {r['lang']}: ppl {r['perplexity']:,.3f} ({100 * r['perplexity_change']:+.2f} %), "
              f"KL {r['mean_kl']:.5f}, top-1 {100 * r['top1_agreement']:.1f} %")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
