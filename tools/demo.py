"""The main job, offline on CPU: every stage of the KoBLLa method on a mini model, then a report.

    python -m tools.demo --run-dir runs/demo             # what `make demo` runs (from the repository root)
    python -m tools.demo --run-dir runs/demo --force     # redo every stage
    python -m tools.demo --run-dir runs/demo-s1 --seed 1 # the same method from another random init

Stages: a mini base pretrained from scratch, English-first with ~8 % Korean tokens, and its
instruct sibling (English Q/A); stage 1 LoRA on Korean (konlpy's Constitution + bills); the chat
vector; stage 3 LoRA on KoLIMA + BiLIMA; then held-out perplexity, TruthfulQA-format MC2, answer
loss, the regression gate and side-by-side samples. Every training setting is in configs/demo/*.yaml.
A rerun reuses every finished stage; a killed run resumes at the stage it was in.
Report: RUN_DIR/report/report.md (+ losses.png, metrics.png, gate/, samples).
Exit status: 0 when every check and the gate pass, 1 when one fails (the report says which), 2 on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import make_parser, run
from kobllla.demo import StageFailed, run_demo


def _work(args) -> int:
    result = run_demo(args.run_dir, force=args.force, seed=args.seed, config_dir=args.config_dir)
    for check in result.checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.claim}: {check.detail}")
    print(f"{'PASS' if result.gate_passed else 'FAIL'}  regression gate (TruthfulQA-format MC2, tolerance 0.01)")
    print(f"report: {result.report} ({result.total_s:.0f} s)")
    return 0 if result.gate_passed and all(c.passed for c in result.checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.demo")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="where every stage and the report go")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output is complete")
    parser.add_argument("--seed", type=int, default=0, help="init seed of the mini model and every recipe's seed")
    parser.add_argument("--config-dir", type=Path, default=Path("configs/demo"),
                        help="the demo's torchtune YAMLs (default configs/demo)")
    args = parser.parse_args(argv)
    try:
        return run(lambda: _work(args))
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
