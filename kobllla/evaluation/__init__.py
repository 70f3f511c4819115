"""Evaluation: lm_eval suites on every stage's checkpoint, held-out perplexity, stored runs,
and a report + regression gate (TruthfulQA MC2 must not drop more than 0.01).

Library use (what ``python -m eval.run`` / ``python -m eval.report`` call)::

    from kobllla.evaluation import evaluate_model, load_runs, compare_runs, write_report

    for label, ckpt in {"base": "runs/base", "stage1": "runs/stage1/epoch_0"}.items():
        evaluate_model(ckpt, label=label, suites=["english_retention"], data_dir="data/eval",
                       heldout={"ko": "heldout/ko.txt", "en": "heldout/en.txt"},
                       results_dir="runs/eval")
    runs = load_runs(["runs/eval"])
    comparison = compare_runs(runs, pairs=[("stage1", "base")])   # default gate: MC2 -0.01
    write_report(comparison, "reports/eval", runs)
    ok = comparison.passed
"""

from kobllla.evaluation._checkpoint import ModelRef, check_checkpoint_dir, resolve_model
from kobllla.evaluation._perplexity import perplexity, perplexity_of_texts, read_heldout
from kobllla.evaluation._plan import check_plan, load_plan, run_plan
from kobllla.evaluation._report import (
    DEFAULT_GATES,
    Comparison,
    GateResult,
    IncomparableRunsError,
    check_report_out,
    compare_runs,
    render_chart,
    render_markdown,
    write_report,
)
from kobllla.evaluation._runner import evaluate_model
from kobllla.evaluation._samples import (
    answer_metrics,
    parse_named_dirs,
    read_sample_prompts,
    summarize,
    write_samples,
)
from kobllla.evaluation._store import latest_runs, load_history, load_run, load_runs, save_run
from kobllla.evaluation._tasks import KMMLU_KOREAN_SUBSET, SUITES, TASKS, TaskSpec, resolve_tasks

__all__ = [
    "DEFAULT_GATES", "KMMLU_KOREAN_SUBSET", "SUITES", "TASKS", "Comparison", "GateResult",
    "IncomparableRunsError", "ModelRef", "TaskSpec", "check_checkpoint_dir", "check_plan", "check_report_out",
    "compare_runs",
    "evaluate_model", "latest_runs", "load_history", "load_plan", "load_run", "load_runs", "perplexity",
    "perplexity_of_texts", "read_heldout", "render_chart", "render_markdown", "resolve_model",
    "resolve_tasks", "run_plan", "save_run", "write_report",
    "answer_metrics", "parse_named_dirs", "read_sample_prompts", "summarize", "write_samples",
]
