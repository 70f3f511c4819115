"""Compare stored runs: a Markdown table in the seed README's shape, a PNG chart and a gate.

Nothing is re-run: the report reads run records only. Each candidate is compared with its own
baseline (stage 1 vs base, chat vector vs instruct, ...). Two runs are compared on a task only
if they ran the same task version, n-shot, data (hub dataset or local file sha256) and sample
count; otherwise :class:`IncomparableRunsError` says which field differs.

A gate is ``{"task/metric": tolerance}``: the candidate fails when the metric moves the wrong way
(down for accuracy, up for perplexity) by more than the tolerance.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kobllla.atomic import write_json, write_text

DEFAULT_GATES: dict[str, float] = {"truthfulqa_mc2/acc": 0.01}
REPORT_MD, REPORT_PNG, REPORT_JSON = "report.md", "report.png", "comparison.json"
_EPS = 1e-12  # a drop of exactly the tolerance passes despite float rounding


class IncomparableRunsError(ValueError):
    """Two runs scored a task under different versions, n-shot, data or sample counts."""


@dataclass
class GateResult:
    candidate: str
    baseline: str
    metric: str
    baseline_value: float
    candidate_value: float
    tolerance: float
    higher_is_better: bool

    @property
    def delta(self) -> float:
        return self.candidate_value - self.baseline_value

    @property
    def passed(self) -> bool:
        worse_by = -self.delta if self.higher_is_better else self.delta
        return worse_by <= self.tolerance + _EPS

    def message(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        direction = "drop" if self.higher_is_better else "rise"
        return (
            f"gate {word} {self.metric}: {self.candidate} {self.candidate_value:.4f} vs {self.baseline} "
            f"{self.baseline_value:.4f} (delta {self.delta:+.4f}, allowed {direction} {self.tolerance:.4f})"
        )


@dataclass
class Comparison:
    """Everything the report shows, computed from run records alone."""

    labels: list[str]
    baseline_of: dict[str, str]  # candidate label -> baseline label
    metrics: list[str]  # "task/metric" columns
    values: dict[str, dict[str, dict]]  # label -> metric -> {"value", "stderr"}
    higher_is_better: dict[str, bool]
    gates: list[GateResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]


def _metric_entry(run: dict, metric: str) -> dict | None:
    task, _, name = metric.partition("/")
    return run["tasks"].get(task, {}).get("metrics", {}).get(name)


def _primary_metric(task: str, entry: dict) -> str:
    names = list(entry["metrics"])
    for preferred in ("acc", "token_ppl"):
        if preferred in names:
            return f"{task}/{preferred}"
    return f"{task}/{names[0]}"


def default_metrics(runs: dict[str, dict], gates: dict[str, float]) -> list[str]:
    """Gated metrics first, then each task's main metric (acc, or token_ppl for held-out text)."""
    metrics = list(gates)
    for run in runs.values():
        for task, entry in run["tasks"].items():
            if entry["metrics"]:
                metrics.append(_primary_metric(task, entry))
    present = [m for m in dict.fromkeys(metrics) if any(_metric_entry(r, m) for r in runs.values())]
    return present


def _data_identity(data: dict) -> object:
    if data.get("source") == "local":
        return ("local", tuple(sorted((s, f["sha256"]) for s, f in data["files"].items())))
    return ("hub", data.get("path"), data.get("name"))


def check_comparable(candidate: dict, baseline: dict, task: str) -> None:
    """Raises IncomparableRunsError when the two runs' scores of ``task`` cannot be compared."""
    a, b = candidate["tasks"][task], baseline["tasks"][task]
    checks = [
        ("task version", a["version"], b["version"], "re-run both with the same lm_eval version"),
        ("n-shot", a["n_shot"], b["n_shot"], "re-run both with the same --num-fewshot"),
        ("data", _data_identity(a["data"]), _data_identity(b["data"]), "re-run both on the same --data-dir files"),
        ("samples", a["n_samples"]["effective"], b["n_samples"]["effective"], "re-run both with the same --limit"),
    ]
    for what, x, y, fix in checks:
        if x != y:
            raise IncomparableRunsError(
                f"refusing to compare {candidate['label']} with {baseline['label']} on {task}: {what} differs "
                f"({_show(x)} in {candidate['run_id']} vs {_show(y)} in {baseline['run_id']}); {fix}"
            )


def _show(value: object) -> str:
    if isinstance(value, tuple) and value and value[0] == "local":
        return "local " + ",".join(f"{s}:{h[:12]}" for s, h in value[1])
    if isinstance(value, tuple):
        return "hub " + "/".join(str(v) for v in value[1:])
    return str(value)


def compare_runs(
    runs: dict[str, dict],
    *,
    pairs: list[tuple[str, str]],
    gates: dict[str, float] | None = None,
    metrics: list[str] | None = None,
) -> Comparison:
    """Builds the comparison of candidates with their baselines, and applies the gates.

    Args:
        runs: label -> run record (``load_runs`` or ``evaluate_model`` output).
        pairs: ``(candidate, baseline)`` labels, e.g. ``[("stage1", "base"), ("chatvec", "instruct")]``.
        gates: metric -> tolerance; None: ``DEFAULT_GATES``, applied where both runs have the metric.
            Explicit gates must be present in every compared pair.
        metrics: columns (``task/metric``); None: gated metrics, then each task's main metric.

    Raises:
        ValueError: unknown label, unknown metric, or an explicit gate missing from a run.
        IncomparableRunsError: task versions (or n-shot, data, sample count) differ within a pair.
    """
    explicit = gates is not None
    gates = dict(DEFAULT_GATES if gates is None else gates)
    _check_pairs(runs, pairs)
    metrics = metrics or default_metrics(runs, gates)
    _check_metrics(runs, metrics)
    comparison = Comparison(
        labels=list(runs), baseline_of=dict(pairs), metrics=metrics,
        values={label: {m: e for m in metrics if (e := _metric_entry(r, m))} for label, r in runs.items()},
        higher_is_better=_directions(runs, metrics + list(gates)),
    )
    for candidate, baseline in pairs:
        cand, base = runs[candidate], runs[baseline]
        tasks = {m.partition("/")[0] for m in metrics + list(gates)} & set(cand["tasks"]) & set(base["tasks"])
        for task in sorted(tasks):
            check_comparable(cand, base, task)
        comparison.gates += _apply_gates(cand, base, gates, explicit, comparison.higher_is_better, comparison.notes)
    return comparison


def _check_pairs(runs: dict[str, dict], pairs: list[tuple[str, str]]) -> None:
    for candidate, baseline in pairs:
        for label in (candidate, baseline):
            if label not in runs:
                raise ValueError(f"no run labelled {label!r}; runs given: {sorted(runs)}")
        if candidate == baseline:
            raise ValueError(f"run {candidate!r} cannot be its own baseline")


def _check_metrics(runs: dict[str, dict], metrics: list[str]) -> None:
    for metric in metrics:
        if "/" not in metric:
            raise ValueError(f"metric {metric!r} must be written task/metric, e.g. truthfulqa_mc2/acc")
        if not any(_metric_entry(r, metric) for r in runs.values()):
            known = sorted({f"{t}/{m}" for r in runs.values() for t, e in r["tasks"].items() for m in e["metrics"]})
            raise ValueError(f"no run has metric {metric!r}; metrics in these runs: {known}")


def _directions(runs: dict[str, dict], metrics: list[str]) -> dict[str, bool]:
    out = {}
    for metric in metrics:
        for run in runs.values():
            entry = _metric_entry(run, metric)
            if entry is not None:
                out[metric] = entry["higher_is_better"]
    return out


def _apply_gates(cand: dict, base: dict, gates: dict[str, float], explicit: bool,
                 directions: dict[str, bool], notes: list[str]) -> list[GateResult]:
    results = []
    for metric, tolerance in gates.items():
        if tolerance < 0:
            raise ValueError(f"gate {metric}: tolerance must be >= 0, got {tolerance}")
        c, b = _metric_entry(cand, metric), _metric_entry(base, metric)
        if c is None and b is None and not explicit:
            notes.append(f"{cand['label']} vs {base['label']}: {metric} not gated (neither run has it)")
            continue
        for run, entry in ((cand, c), (base, b)):
            if entry is None or entry["value"] is None:
                task = metric.partition("/")[0]
                raise ValueError(f"cannot gate {metric}: run {run['label']} ({run['run_id']}) has no score for it; "
                                 f"evaluate it on {task} or drop the gate")
        results.append(GateResult(cand["label"], base["label"], metric, b["value"], c["value"], tolerance,
                                  directions.get(metric, True)))
    return results


def _cell(entry: dict | None, base_entry: dict | None) -> str:
    if entry is None or entry["value"] is None:
        return "–"
    text = f"{entry['value']:.4f}"
    if entry.get("stderr") is not None:
        text += f" ± {entry['stderr']:.4f}"
    if base_entry is not None and base_entry["value"] is not None:
        text += f" ({entry['value'] - base_entry['value']:+.4f})"
    return text


def render_markdown(comparison: Comparison, runs: dict[str, dict] | None = None) -> str:
    """The table (model rows, metric columns, deltas vs each row's baseline) and the gate lines."""
    header = ["model", "vs", *[m.replace("/", " ") for m in comparison.metrics], "gate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in comparison.labels:
        base = comparison.baseline_of.get(label)
        cells = [_cell(comparison.values[label].get(m), comparison.values[base].get(m) if base else None)
                 for m in comparison.metrics]
        gate = [g for g in comparison.gates if g.candidate == label]
        status = ("**FAIL**" if any(not g.passed for g in gate) else "pass") if gate else ""
        lines.append("| " + " | ".join([label, base or "", *cells, status]) + " |")
    lines.append("")
    lines.append("Cells: score ± stderr (delta vs the row's baseline). " + ", ".join(
        f"{m} {'higher' if comparison.higher_is_better.get(m, True) else 'lower'} is better"
        for m in comparison.metrics))
    lines += [""] + [f"- {g.message()}" for g in comparison.gates] + [f"- {n}" for n in comparison.notes]
    if runs:
        lines += ["", "| model | run | checkpoint | fingerprint | lm_eval | limit |", "|---|---|---|---|---|---|"]
        for label in comparison.labels:
            r = runs[label]
            lines.append(f"| {label} | {r['run_id']} | {r['model']['spec']} | {r['model']['fingerprint'][:19]} "
                         f"| {r['versions']['lm_eval']} | {r['limit']} |")
    return "\n".join(lines) + "\n"


def render_chart(comparison: Comparison, path: Path) -> None:
    """One bar panel per metric, a bar per model (grey: baseline-only rows, red: failed the gate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(comparison.metrics)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 3.2 * n), 3.6), squeeze=False)
    failed = {(g.candidate, g.metric) for g in comparison.failures()}
    for ax, metric in zip(axes[0], comparison.metrics, strict=True):
        labels = [lab for lab in comparison.labels if metric in comparison.values[lab]]
        vals = [comparison.values[lab][metric]["value"] or 0.0 for lab in labels]
        errs = [comparison.values[lab][metric].get("stderr") or 0.0 for lab in labels]
        colors = ["tab:red" if (lab, metric) in failed else "tab:blue" if lab in comparison.baseline_of else "tab:gray"
                  for lab in labels]
        ax.bar(range(len(labels)), vals, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        arrow = "↑" if comparison.higher_is_better.get(metric, True) else "↓"
        ax.set_title(f"{metric} {arrow}", fontsize=9)
    fig.suptitle("grey: baseline, blue: candidate, red: failed its gate", fontsize=8, y=0.995)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def check_report_out(out_dir: Path, inputs: list[Path]) -> None:
    """Refuses an ``--out`` that is, holds or lies inside an input (a run record or a results dir).

    Raises:
        ValueError: one line naming both paths.
    """
    from kobllla.atomic import refuse_output_over_inputs

    try:
        refuse_output_over_inputs(Path(out_dir), [Path(p) for p in inputs])
    except ValueError:
        clash = next(str(p) for p in inputs if _overlaps(Path(out_dir), Path(p)))
        raise ValueError(f"--out {out_dir} is, holds or lies inside the input {clash}; run records are never "
                         "written over: pick an --out outside every results dir (e.g. reports/eval)") from None


def _overlaps(out: Path, inp: Path) -> bool:
    o, i = out.resolve(), inp.resolve()
    return o == i or i in o.parents or o in i.parents


def write_report(comparison: Comparison, out_dir: Path, runs: dict[str, dict] | None = None, *,
                 inputs: list[Path] | None = None) -> dict[str, Path]:
    """Writes ``report.md``, ``report.png`` and, last, ``comparison.json`` (the manifest) into ``out_dir``
    (refused when it overlaps one of ``inputs``, see :func:`check_report_out`)."""
    out_dir = Path(out_dir)
    check_report_out(out_dir, list(inputs or []))
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; pass a directory for report.md, report.png and "
                                 "comparison.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png, manifest = out_dir / REPORT_MD, out_dir / REPORT_PNG, out_dir / REPORT_JSON
    write_text(md, render_markdown(comparison, runs))
    render_chart(comparison, png)
    data = asdict(comparison)
    data["gates"] = [{**asdict(g), "delta": g.delta, "passed": g.passed} for g in comparison.gates]
    data["passed"] = comparison.passed
    data["runs"] = {label: r["run_id"] for label, r in (runs or {}).items()}
    write_json(manifest, json.loads(json.dumps(data, default=_json_default)))
    return {"markdown": md, "chart": png, "manifest": manifest}


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
