r"""Compare stored runs: Markdown table + PNG chart, and fail (exit 1) when a gated metric drops.

    python -m eval.report runs/eval --pair stage1=base --pair chatvec=instruct --pair stage3=instruct \
        --out reports/eval
    python -m eval.report runs/eval/runs/A.json runs/eval/runs/B.json --baseline base --out reports/x \
        --gate truthfulqa_mc2/acc=0.01 --gate heldout_ko/token_ppl=0

Inputs are run records or results dirs (latest run per label). Nothing is re-run. Default gate:
truthfulqa_mc2/acc may drop at most 0.01. Exit 0: gates pass; 1: a gate failed; 2: bad input or
runs that cannot be compared (different task versions, n-shot, data or sample counts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.evaluation import check_report_out, compare_runs, load_runs, write_report


def _pair_arg(text: str) -> tuple[str, str]:
    candidate, sep, baseline = text.partition("=")
    if not sep or not candidate or not baseline:
        raise argparse.ArgumentTypeError(f"--pair takes CANDIDATE=BASELINE labels (e.g. stage1=base), got {text!r}")
    return candidate, baseline


def _gate_arg(text: str) -> tuple[str, float]:
    metric, sep, tol = text.partition("=")
    try:
        if sep and metric:
            return metric, float(tol)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--gate takes TASK/METRIC=TOLERANCE (e.g. truthfulqa_mc2/acc=0.01), got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.report")
    parser.add_argument("runs", nargs="+", type=Path, help="run record files or results dirs")
    parser.add_argument("--pair", action="append", type=_pair_arg, default=[], metavar="CANDIDATE=BASELINE")
    parser.add_argument("--baseline", help="compare every other run with this label (when no --pair)")
    parser.add_argument("--gate", action="append", type=_gate_arg, metavar="TASK/METRIC=TOL",
                        help="replaces the default gate truthfulqa_mc2/acc=0.01 (repeatable)")
    parser.add_argument("--metric", action="append", help="table column TASK/METRIC (default: gated + main metrics)")
    parser.add_argument("--out", type=Path, required=True, help="report.md, report.png, comparison.json go here")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


def _work(args) -> int:
    check_report_out(args.out, args.runs)  # before anything is read or written
    runs = load_runs(args.runs)
    pairs = args.pair or _pairs_against(runs, args.baseline)
    gates = dict(args.gate) if args.gate else None
    comparison = compare_runs(runs, pairs=pairs, gates=gates, metrics=args.metric)
    paths = write_report(comparison, args.out, runs, inputs=args.runs)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {paths['markdown']}, {paths['chart']}, {paths['manifest']}")
    for gate in comparison.failures():
        print(gate.message(), file=sys.stderr)
    return 0 if comparison.passed else 1

def _pairs_against(runs: dict[str, dict], baseline: str | None) -> list[tuple[str, str]]:
    baseline = baseline or next(iter(runs))
    if baseline not in runs:
        raise ValueError(f"--baseline {baseline!r} is not a run label; labels: {sorted(runs)}")
    return [(label, baseline) for label in runs if label != baseline]


if __name__ == "__main__":
    sys.exit(main())
