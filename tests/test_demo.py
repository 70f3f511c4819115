"""The main job end to end: `run_demo` on a fresh directory, then the method's predictions.

One run of every stage (real recipes, real chat vector, real lm-eval) on the mini model. The
predictions are asserted as the method states them; if one fails at this scale the report says
so and this test fails with the numbers.
"""

from __future__ import annotations

import json

import pytest

from kobllla.demo import run_demo
from kobllla.demo._pipeline import MARKER

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    return run_dir, run_demo(run_dir)


def test_demo_writes_a_readable_report_with_plots(demo):
    run_dir, result = demo
    report = result.report.read_text(encoding="utf-8")
    for heading in ("## Did the method do what it predicts?", "## Scores", "## What each stage did", "## Commands"):
        assert heading in report
    for png in ("losses.png", "metrics.png", "gate/report.png"):
        assert (run_dir / "report" / png).stat().st_size > 10_000
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["data", "init", "base", "instruct", "stage1", "chat_vector", "stage3", "eval"]


def test_the_method_moves_the_numbers_the_way_it_predicts(demo):
    _, result = demo
    failed = [f"{c.claim}: {c.detail}" for c in result.checks if not c.passed]
    assert not failed, "\n".join(failed)


def test_training_stages_lowered_their_loss(demo):
    run_dir, _ = demo
    for name in ("base", "instruct", "stage1", "stage3"):
        losses = json.loads((run_dir / name / MARKER).read_text())["info"]["losses"]
        assert losses[-1][1] < losses[0][1], f"{name}: {losses[0]} -> {losses[-1]}"


def test_a_rerun_reuses_finished_stages_and_redoes_an_unfinished_one_and_all_after_it(demo):
    run_dir, first = demo
    (run_dir / "stage3" / MARKER).unlink()  # as if killed during stage 3
    again = run_demo(run_dir)
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    reused = {s["name"]: s["reused"] for s in summary["stages"]}
    assert reused == {"data": True, "init": True, "base": True, "instruct": True, "stage1": True,
                      "chat_vector": True, "stage3": False, "eval": False}
    same = lambda scores: {k: v for k, v in scores.items() if k != "record"}  # noqa: E731
    assert same(again.scores["base"]) == same(first.scores["base"])  # base untouched, scored the same
