"""Report and gate from stored run records; the records carry the seed README's TruthfulQA MC2
numbers (Llama-3 0.4396 -> KoBLLa 0.4304; Llama-3-Instruct 0.5170 -> KoBLLa+ChatVec 0.5144)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import report as report_cli
from kobllla.evaluation import (
    IncomparableRunsError,
    compare_runs,
    load_run,
    load_runs,
    render_markdown,
    save_run,
)
from kobllla.evaluation._store import RUN_SCHEMA

HUB_TQA = {"source": "hub", "path": "truthfulqa/truthful_qa", "name": "multiple_choice"}


def _task(value: float, *, version: float = 3.0, n: int = 817, stderr: float | None = 0.0150,
          data: dict | None = None, higher: bool = True, metric: str = "acc") -> dict:
    return {"version": version, "n_shot": 0, "n_samples": {"original": 817, "effective": n}, "data": data or HUB_TQA,
            "metrics": {metric: {"value": value, "stderr": stderr, "higher_is_better": higher}}}


def _run(label: str, tasks: dict, stamp: str = "20261123T120000Z") -> dict:
    return {"schema": RUN_SCHEMA, "run_id": f"{stamp}-{label}", "label": label, "timestamp": stamp,
            "model": {"spec": f"/ckpt/{label}", "local": True, "fingerprint": "sha256:" + "0" * 64, "device": "cuda",
                      "dtype": "bfloat16", "batch_size": "auto", "max_length": 8192},
            "versions": {"lm_eval": "0.4.13", "transformers": "5.23.0", "torch": "2.13.0", "kobllla": "0.1.0"},
            "limit": None, "tasks": tasks}


@pytest.fixture
def seed_runs(tmp_path) -> Path:
    """The seed README's four models, stored as run records in a results dir."""
    for label, mc2 in [("llama3", 0.4396), ("kobllla", 0.4304), ("llama3-instruct", 0.5170),
                       ("kobllla-chatvec", 0.5144)]:
        save_run(_run(label, {"truthfulqa_mc2": _task(mc2)}), tmp_path / "results")
    return tmp_path / "results"


def test_seed_numbers_pass_the_default_gate_and_render_the_seed_table(seed_runs, tmp_path, capsys):
    rc = report_cli.main([str(seed_runs), "--pair", "kobllla=llama3", "--pair", "kobllla-chatvec=llama3-instruct",
                          "--out", str(tmp_path / "report")])
    assert rc == 0
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert md.splitlines()[:6] == [
        "| model | vs | truthfulqa_mc2 acc | gate |",
        "|---|---|---|---|",
        "| llama3 |  | 0.4396 ± 0.0150 |  |",
        "| kobllla | llama3 | 0.4304 ± 0.0150 (-0.0092) | pass |",
        "| llama3-instruct |  | 0.5170 ± 0.0150 |  |",
        "| kobllla-chatvec | llama3-instruct | 0.5144 ± 0.0150 (-0.0026) | pass |",
    ]
    assert "- gate PASS truthfulqa_mc2/acc: kobllla 0.4304 vs llama3 0.4396 (delta -0.0092, allowed drop 0.0100)" in md
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    manifest = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert manifest["passed"] is True and [g["candidate"] for g in manifest["gates"]] == ["kobllla", "kobllla-chatvec"]


def test_a_drop_beyond_the_tolerance_exits_1_naming_metric_values_and_tolerance(seed_runs, tmp_path, capsys):
    save_run(_run("stage3", {"truthfulqa_mc2": _task(0.5012)}, stamp="20261123T130000Z"), seed_runs)
    rc = report_cli.main([str(seed_runs), "--pair", "stage3=llama3-instruct", "--out", str(tmp_path / "r")])
    assert rc == 1
    assert capsys.readouterr().err == (
        "gate FAIL truthfulqa_mc2/acc: stage3 0.5012 vs llama3-instruct 0.5170 (delta -0.0158, allowed drop 0.0100)\n")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| stage3 | llama3-instruct | 0.5012 ± 0.0150 (-0.0158) | **FAIL** |" in md


def test_a_drop_of_exactly_the_tolerance_passes_and_the_tolerance_is_configurable_per_metric(seed_runs, tmp_path):
    assert report_cli.main([str(seed_runs), "--pair", "kobllla=llama3", "--gate", "truthfulqa_mc2/acc=0.0092",
                            "--out", str(tmp_path / "a")]) == 0
    assert report_cli.main([str(seed_runs), "--pair", "kobllla=llama3", "--gate", "truthfulqa_mc2/acc=0.005",
                            "--out", str(tmp_path / "b")]) == 1


def test_runs_with_different_task_versions_are_refused(seed_runs, tmp_path, capsys):
    save_run(_run("old-harness", {"truthfulqa_mc2": _task(0.4500, version=2.0)}, stamp="20261123T130000Z"), seed_runs)
    rc = report_cli.main([str(seed_runs), "--pair", "old-harness=llama3", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert capsys.readouterr().err == (
        "error: refusing to compare old-harness with llama3 on truthfulqa_mc2: task version differs "
        "(2.0 in 20261123T130000Z-old-harness vs 3.0 in 20261123T120000Z-llama3); "
        "re-run both with the same lm_eval version\n")
    assert not (tmp_path / "r").exists()


def test_runs_on_different_local_data_are_refused(tmp_path):
    local = {"source": "local", "files": {"validation": {"path": "/d/v.jsonl", "sha256": "ab" * 32, "rows": 817}}}
    runs = {"a": _run("a", {"truthfulqa_mc2": _task(0.44, data=local)}),
            "b": _run("b", {"truthfulqa_mc2": _task(0.43)})}
    with pytest.raises(IncomparableRunsError,
                       match=r"on truthfulqa_mc2: data differs \(hub truthfulqa/truthful_qa/multiple_choice in .*-b "
                             r"vs local validation:abababababab in .*-a\)"):
        compare_runs(runs, pairs=[("b", "a")])


def test_perplexity_gates_fail_when_perplexity_rises(tmp_path):
    ppl = dict(version="kobllla-heldout/1", stderr=None, higher=False, metric="token_ppl", n=3)
    runs = {"base": _run("base", {"heldout_ko": _task(41.0, **ppl)}),
            "stage1": _run("stage1", {"heldout_ko": _task(12.5, **ppl)}),
            "worse": _run("worse", {"heldout_ko": _task(43.0, **ppl)})}
    comparison = compare_runs(runs, pairs=[("stage1", "base"), ("worse", "base")], gates={"heldout_ko/token_ppl": 1.0})
    assert [g.passed for g in comparison.gates] == [True, False]
    assert comparison.failures()[0].message() == (
        "gate FAIL heldout_ko/token_ppl: worse 43.0000 vs base 41.0000 (delta +2.0000, allowed rise 1.0000)")


def test_an_explicit_gate_on_a_metric_a_run_lacks_is_refused(seed_runs, tmp_path, capsys):
    save_run(_run("korean-only", {"kobest_boolq": _task(0.61, version=1.0)}, stamp="20261123T130000Z"), seed_runs)
    rc = report_cli.main([str(seed_runs), "--pair", "korean-only=llama3", "--gate", "truthfulqa_mc2/acc=0.01",
                          "--out", str(tmp_path / "r")])
    assert rc == 2
    assert ("error: cannot gate truthfulqa_mc2/acc: run korean-only (20261123T130000Z-korean-only) "
            "has no score for it; evaluate it on truthfulqa_mc2 or drop the gate") in capsys.readouterr().err


def test_the_default_gate_is_noted_not_applied_when_neither_run_has_the_metric():
    runs = {"a": _run("a", {"kobest_boolq": _task(0.6, version=1.0)}),
            "b": _run("b", {"kobest_boolq": _task(0.5, version=1.0)})}
    comparison = compare_runs(runs, pairs=[("b", "a")])
    assert comparison.gates == [] and comparison.passed
    assert comparison.notes == ["b vs a: truthfulqa_mc2/acc not gated (neither run has it)"]
    assert "| b | a | 0.5000 ± 0.0150 (-0.1000) |  |" in render_markdown(comparison)


def test_unknown_labels_and_metrics_are_refused_with_the_valid_ones(seed_runs):
    runs = load_runs([seed_runs])
    with pytest.raises(ValueError, match=r"no run labelled 'stage9'; "
                                         r"runs given: \['kobllla', 'kobllla-chatvec', 'llama3', 'llama3-instruct'\]"):
        compare_runs(runs, pairs=[("stage9", "llama3")])
    with pytest.raises(ValueError,
                       match=r"no run has metric 'kobest_boolq/acc'; metrics in these runs: \['truthfulqa_mc2/acc'\]"):
        compare_runs(runs, pairs=[("kobllla", "llama3")], metrics=["kobest_boolq/acc"])


def test_baseline_flag_compares_every_other_run_with_it(seed_runs, tmp_path):
    assert report_cli.main([str(seed_runs), "--baseline", "llama3", "--out", str(tmp_path / "r")]) == 0
    gates = json.loads((tmp_path / "r" / "comparison.json").read_text())["gates"]
    assert [(g["candidate"], g["baseline"], round(g["delta"], 4)) for g in gates] == [
        ("kobllla", "llama3", -0.0092), ("llama3-instruct", "llama3", 0.0774), ("kobllla-chatvec", "llama3", 0.0748)]


def test_history_keeps_every_run_and_reports_use_the_latest_per_label(seed_runs):
    save_run(_run("kobllla", {"truthfulqa_mc2": _task(0.4350)}, stamp="20261124T090000Z"), seed_runs)
    runs = load_runs([seed_runs])
    assert runs["kobllla"]["run_id"] == "20261124T090000Z-kobllla"
    lines = (seed_runs / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines][-2:] == ["20261123T120000Z-kobllla-chatvec",
                                                                   "20261124T090000Z-kobllla"]
    assert len(lines) == 5


def test_bad_record_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"schema": "something-else"}')
    with pytest.raises(ValueError, match=r"x\.json is not a run record "
                                         r"\(schema 'something-else', expected 'kobllla\.eval\.run/1'\)"):
        load_run(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"y\.json is not valid JSON \(Expecting property name"):
        load_run(tmp_path / "y.json")
    with pytest.raises(FileNotFoundError, match=r"run record .*z\.json does not exist"):
        load_run(tmp_path / "z.json")


def test_an_empty_history_or_an_out_that_is_a_file_is_a_one_line_error(seed_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "history.jsonl").write_text("\n", encoding="utf-8")
    assert report_cli.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'empty' / 'history.jsonl'} lists no run (the file is empty or blank): no evaluation has "
        f"finished there yet; run `python -m eval.run --results-dir {tmp_path / 'empty'}` first\n")
    (tmp_path / "taken").write_text("mine", encoding="utf-8")
    assert report_cli.main([str(seed_runs), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'taken'} is a file; pass a directory")
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "mine" and not (tmp_path / "r").exists()


# --- plans (eval/suites/*.yaml) ------------------------------------------------------------------


def test_shipped_plans_are_valid():
    from kobllla.evaluation import load_plan

    suites = Path(__file__).parent.parent / "eval" / "suites"
    plan = load_plan(suites / "kobllla_8b.yaml")
    assert plan["compare"] == {"stage1": "llama3", "chatvec": "llama3-instruct", "stage3": "llama3-instruct"}
    assert plan["gates"] == {"truthfulqa_mc2/acc": 0.01} and plan["suites"] == ["english_retention", "korean"]
    assert load_plan(suites / "tiny_smoke.yaml")["data_dir"] == "tests/assets/eval/data"
    translation = load_plan(suites / "translation_ko_zh.yaml")
    assert (translation["suites"], translation["translation_data"]) == (["translation"], "data/translation")
    assert translation["gates"] == {"kobllla_translation_ko_zh/chrf": 0.0, "kobllla_translation_zh_ko/chrf": 0.0}


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"models": {"a": "x"}, "results_dir": "r", "report_dir": "o", "suite": ["korean"]},
         r"plan: unknown key\(s\) \['suite'\]; valid keys: \['batch_size', 'compare', "),
        ({"models": {"a": "x"}, "report_dir": "o"}, r"plan: missing \['results_dir'\]; a plan needs models"),
        ({"models": {"a": "x"}, "results_dir": "r", "report_dir": "o", "compare": {"b": "a"}},
         r"plan: compare names 'b', which is not in models \['a'\]"),
        ({"models": {"a b": "x"}, "results_dir": "r", "report_dir": "o"}, r"label 'a b' must start with a letter"),
    ],
)
def test_bad_plans_are_one_line_errors(plan, message):
    from kobllla.evaluation import check_plan

    with pytest.raises(ValueError, match=message):
        check_plan(plan)


def test_report_only_plan_renders_from_stored_runs_and_gates(seed_runs, tmp_path):
    from eval import plan as plan_cli

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"models: {{llama3: /ckpt/llama3, kobllla: /ckpt/kobllla}}\nresults_dir: {seed_runs}\n"
        f"report_dir: {tmp_path / 'report'}\ncompare: {{kobllla: llama3}}\ngates: {{truthfulqa_mc2/acc: 0.005}}\n"
    )
    assert plan_cli.main([str(plan), "--report-only"]) == 1  # -0.0092 is beyond 0.005
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| kobllla | llama3 | 0.4304 ± 0.0150 (-0.0092) | **FAIL** |" in md
    missing = tmp_path / "missing.yaml"
    missing.write_text(plan.read_text().replace("kobllla: /ckpt/kobllla", "stage9: /ckpt/s9")
                       .replace("compare: {kobllla", "compare: {stage9"))
    assert plan_cli.main([str(missing), "--report-only"]) == 2
