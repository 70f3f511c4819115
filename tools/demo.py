"""The main job, offline on CPU: every stage of the KoBLLa method on a mini model, then a report.

    python -m tools.demo --run-dir runs/demo           # what `make demo` runs (<= 10 min on 2 cores)
    python -m tools.demo --run-dir runs/demo --force   # redo every stage

Stages: English base pretrained from scratch (pydoc prose) and its instruct sibling (English Q/A),
stage 1 LoRA on Korean (konlpy's Constitution + bills), chat vector, stage 3 LoRA on KoLIMA +
BiLIMA, then held-out perplexity, TruthfulQA-format MC2, answer loss and the regression gate.
A rerun reuses every finished stage; a killed run resumes at the stage it was in.
Report: RUN_DIR/report/report.md (+ losses.png, metrics.png, gate/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobllla.demo import StageFailed, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output is complete")
    args = parser.parse_args(argv)
    try:
        result = run_demo(args.run_dir, force=args.force)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for check in result.checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.claim}: {check.detail}")
    print(f"{'PASS' if result.gate_passed else 'FAIL'}  regression gate (TruthfulQA-format MC2, tolerance 0.01)")
    print(f"report: {result.report} ({result.total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
