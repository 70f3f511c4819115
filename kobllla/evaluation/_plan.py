"""Run definitions: one YAML names the models, suites, data and the comparisons to gate.

A plan (see ``eval/suites/*.yaml``)::

    models:            # label -> HF dir or hub id, evaluated in this order
      base: meta-llama/Meta-Llama-3-8B
      stage1: runs/stage1/epoch_0
    suites: [english_retention, korean]
    tasks: []          # extra task names
    data_dir: null     # local dataset copies (null: the hub)
    translation_data: null  # held-out parallel files for the translation suite (test.ko + test.zh or test.jsonl)
    max_gen_toks: null      # translation tasks' new-token cap (null: 256)
    heldout: {ko: heldout/ko.txt, en: heldout/en.txt}
    results_dir: runs/eval
    report_dir: reports/eval
    compare: {stage1: base}            # candidate: baseline
    gates: {truthfulqa_mc2/acc: 0.01}  # null: the default gate
    device: auto
    dtype: auto
    batch_size: auto
    limit: null
    num_fewshot: null
    scorer: hf
    samples:           # optional: after the scores, eval.samples (null: none; --report-only skips it)
      prompts: eval/prompts             # default; models: [labels] (default all), out_dir: REPORT_DIR/samples
      max_new_tokens: 256

Relative paths are taken from the directory the command runs in (the repo root), like
``tune run`` configs.
"""

from __future__ import annotations

from pathlib import Path

from kobllla.evaluation._report import Comparison, compare_runs, write_report
from kobllla.evaluation._runner import evaluate_model
from kobllla.evaluation._samples import check_plan_samples, run_plan_samples
from kobllla.evaluation._store import check_label, load_runs

_DEFAULTS: dict = {
    "suites": [], "tasks": [], "data_dir": None, "translation_data": None, "max_gen_toks": None, "heldout": {},
    "compare": {}, "gates": None, "device": "auto", "dtype": "auto", "batch_size": "auto", "limit": None,
    "num_fewshot": None, "scorer": "hf", "samples": None,
}
_REQUIRED = ("models", "results_dir", "report_dir")


def load_plan(path: Path) -> dict:
    """Reads and checks a plan YAML; returns it with defaults filled in.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mapping, unknown or missing keys, bad labels or comparisons.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan {path} does not exist; see eval/suites/ for examples")
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{path} must be a mapping of plan keys, got {type(plan).__name__}")
    return check_plan(plan, where=str(path))


def check_plan(plan: dict, *, where: str = "plan") -> dict:
    """Validates keys, labels and comparisons of a plan dict; returns it with defaults filled in."""
    known = set(_DEFAULTS) | set(_REQUIRED)
    unknown = sorted(set(plan) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    missing = [k for k in _REQUIRED if not plan.get(k)]
    if missing:
        raise ValueError(f"{where}: missing {missing}; a plan needs models (label: path), results_dir and report_dir")
    if not isinstance(plan["models"], dict):
        raise ValueError(f"{where}: 'models' must map labels to checkpoint dirs or hub ids")
    for label in plan["models"]:
        check_label(str(label))
    full = {**_DEFAULTS, **plan}
    for candidate, baseline in (full["compare"] or {}).items():
        for label in (candidate, baseline):
            if label not in plan["models"]:
                raise ValueError(f"{where}: compare names {label!r}, which is not in models {sorted(plan['models'])}")
    full["samples"] = check_plan_samples(full["samples"], plan, where=where)
    return full


def run_plan(plan: dict, *, evaluate: bool = True) -> Comparison | None:
    """Evaluates every model of the plan (unless ``evaluate=False``), then writes the report.

    Returns:
        Comparison | None: the gated comparison, or None when the plan compares nothing.
    """
    plan = check_plan(plan)
    if evaluate:
        for label, model in plan["models"].items():
            evaluate_model(
                model, label=str(label), suites=plan["suites"], tasks=plan["tasks"], data_dir=plan["data_dir"],
                translation_data=plan["translation_data"], max_gen_toks=plan["max_gen_toks"],
                heldout=plan["heldout"] or None, device=plan["device"], dtype=plan["dtype"],
                batch_size=plan["batch_size"], limit=plan["limit"], num_fewshot=plan["num_fewshot"],
                scorer=plan["scorer"], results_dir=Path(plan["results_dir"]),
            )
        if plan["samples"]:
            run_plan_samples(plan)  # side-by-side answers after the scores (eval.samples)
    if not plan["compare"]:
        return None
    runs = load_runs([Path(plan["results_dir"])])
    absent = [str(label) for label in plan["models"] if str(label) not in runs]
    if absent:
        raise ValueError(f"no stored run for {absent} in {plan['results_dir']}; "
                         "run the plan without --report-only first")
    runs = {str(label): runs[str(label)] for label in plan["models"]}
    gates = None if plan["gates"] is None else {str(k): float(v) for k, v in plan["gates"].items()}
    comparison = compare_runs(runs, pairs=[(str(c), str(b)) for c, b in plan["compare"].items()], gates=gates)
    write_report(comparison, Path(plan["report_dir"]), runs)
    return comparison
