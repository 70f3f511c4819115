"""Run a whole evaluation plan (eval/suites/*.yaml): evaluate every model, then report and gate.

    python -m eval.plan eval/suites/kobllla_8b.yaml                  # every stage of the 8B recipe
    python -m eval.plan eval/suites/kobllla_8b.yaml --report-only    # re-render from stored runs
    # tiny CPU smoke plan on the repo's fixtures (~1 min):
    python -m tools.make_tiny_model --out runs/eval-smoke/models/base --dtype float32
    python -m tools.make_tiny_model --out runs/eval-smoke/models/instruct --flavor instruct --seed 1 --dtype float32
    python -m eval.plan eval/suites/tiny_smoke.yaml

Exit 0: gates pass; 1: a gate failed; 2: bad plan or input, or runs that cannot be compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla import gcpause
from kobllla.cli import exit_fast, make_parser, run

# Run as a command the process is ours: what torch's import builds lives until exit (kobllla.gcpause).
with gcpause.paused_gc(freeze=__name__ == "__main__"):
    from kobllla.evaluation import load_plan, run_plan


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m eval.plan")
    parser.add_argument("plan", type=Path, help="plan YAML (see eval/suites/)")
    parser.add_argument("--report-only", action="store_true", help="skip evaluation; report from stored runs")
    args = parser.parse_args(argv)
    return run(lambda: _work(args))


def _work(args) -> int:
    plan = load_plan(args.plan)
    comparison = run_plan(plan, evaluate=not args.report_only)
    if comparison is None:
        print(f"evaluated {len(plan['models'])} model(s) into {plan['results_dir']}; the plan compares nothing")
        return 0
    print((Path(plan["report_dir"]) / "report.md").read_text(encoding="utf-8"))
    for gate in comparison.failures():
        print(gate.message(), file=sys.stderr)
    return 0 if comparison.passed else 1


if __name__ == "__main__":
    gcpause.FREEZE_IMPORTS = True  # and lm_eval's and transformers' too, once, before the first model loads
    exit_fast(main())
