r"""Evaluate checkpoints on named lm_eval suites (and held-out perplexity); store one run record each.

    python -m eval.run --model base=meta-llama/Meta-Llama-3-8B --model stage1=runs/stage1/epoch_0 \
        --suite english_retention --suite korean --results-dir runs/eval
    # offline, local copies of the datasets (layout: kobllla/evaluation/_tasks.py) + held-out text:
    python -m eval.run --model stage1=runs/stage1/epoch_0 --suite english_retention \
        --data-dir data/eval --heldout ko=heldout/ko.txt --heldout en=heldout/en.txt --results-dir runs/eval
    # tiny CPU smoke run on the repo's fixtures (~30 s):
    python -m tools.make_tiny_model --out runs/eval-smoke/models/base --dtype float32
    python -m eval.run --model tiny=runs/eval-smoke/models/base --suite english_retention \
        --data-dir tests/assets/eval/data --device cpu --results-dir runs/eval-smoke
    # translation (chrF++ and BLEU, both directions) on held-out pairs DIR/test.ko + DIR/test.zh:
    python -m eval.run --model mt=runs/translation/epoch_0 --task kobllla_translation \
        --translation-data data/literary --results-dir runs/eval

Suites: english_retention (truthfulqa_mc2 = the gate, truthfulqa_mc1), korean (kobest x5, haerae x5,
a KMMLU subset), kobest, haerae, kmmlu (45 subjects),
translation (kobllla_translation_ko_zh, kobllla_translation_zh_ko; needs --translation-data).
Then: python -m eval.report runs/eval ...
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kobllla import gcpause
from kobllla.cli import exit_fast, make_parser, run

# Run as a command the process is ours: what torch's import builds lives until exit (kobllla.gcpause).
with gcpause.paused_gc(freeze=__name__ == "__main__"):
    from kobllla.evaluation import SUITES, evaluate_model


def _model_arg(text: str) -> tuple[str, str]:
    label, sep, spec = text.partition("=")
    if not sep:
        spec = text
        label = Path(text.rstrip("/")).name
    return label, spec


def _heldout_arg(text: str) -> tuple[str, Path]:
    lang, sep, path = text.partition("=")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"--heldout takes LANG=FILE (e.g. ko=heldout/ko.txt), got {text!r}")
    return lang, Path(path)


def _batch_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes an integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be >= 1 (or 'auto'), got {text!r}")
    return value


def _limit_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a number of samples or a fraction < 1, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0 (samples per task, or a fraction < 1), got {text!r}")
    return int(value) if value >= 1 else value


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.run")
    parser.add_argument("--model", action="append", type=_model_arg, required=True, metavar="[LABEL=]PATH_OR_HUB_ID",
                        help="checkpoint to evaluate (repeatable); LABEL names it in reports (default: dir name)")
    parser.add_argument("--suite", action="append", default=[], help=f"suite to run (repeatable): {', '.join(SUITES)}")
    parser.add_argument("--task", action="append", default=[],
                        help="extra lm_eval task (repeatable), e.g. kobest_boolq")
    parser.add_argument("--data-dir", type=Path, help="local copies of the datasets instead of the hub")
    parser.add_argument("--translation-data", type=Path, metavar="DIR",
                        help="held-out pairs of the kobllla_translation tasks: DIR/test.ko + DIR/test.zh or test.jsonl")
    parser.add_argument("--max-gen-toks", type=int, metavar="N",
                        help="new tokens per translation hypothesis (default 256; another value: another task version)")
    parser.add_argument("--heldout", action="append", type=_heldout_arg, default=[], metavar="LANG=FILE",
                        help="held-out text (.txt or .jsonl) scored for perplexity (repeatable)")
    parser.add_argument("--results-dir", type=Path, required=True, help="run records + history.jsonl go here")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--batch-size", type=_batch_arg, default="auto", help="integer or auto (default)")
    parser.add_argument("--limit", type=_limit_arg, help="samples per task (or a fraction < 1) for smoke runs")
    parser.add_argument("--num-fewshot", type=int, help="override every task's n-shot")
    parser.add_argument("--max-length", type=int, help="context length (default: the model config's)")
    parser.add_argument("--scorer", default="hf", choices=["hf", "shared_prefix"],
                        help="hf: lm_eval's HF model; shared_prefix: answers of a question share one context pass")
    parser.add_argument("--fingerprint", default="sampled", choices=["sampled", "full"],
                        help="checkpoint hash: sampled (1 MiB per 64 MiB block, default) or full (every byte)")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


def _work(args) -> None:
    for label, spec in args.model:
        record = evaluate_model(
            spec, label=label, suites=args.suite, tasks=args.task, data_dir=args.data_dir,
            translation_data=args.translation_data, max_gen_toks=args.max_gen_toks,
            heldout=dict(args.heldout), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            limit=args.limit, num_fewshot=args.num_fewshot, max_length=args.max_length,
            scorer=args.scorer, fingerprint=args.fingerprint, results_dir=args.results_dir,
        )
        print(f"{label}: wrote {record['path']}")
        for task, entry in record["tasks"].items():
            scores = ", ".join(f"{m} {e['value']:.4f}" for m, e in entry["metrics"].items() if e["value"] is not None)
            print(f"  {task} (version {entry['version']}, {entry['n_shot']}-shot, "
                  f"n={entry['n_samples']['effective']}): {scores}")

if __name__ == "__main__":
    gcpause.FREEZE_IMPORTS = True  # and lm_eval's and transformers' too, once, before any model loads
    exit_fast(main())
