"""TruthfulQA MC2's ``process_results`` compiled from lm_eval's source: the same task, the same scores,
and its module's rouge_score / nltk imports never run."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
from lm_eval.tasks import TaskManager

from kobllla.evaluation._tasks import TASKS, data_source, write_task_yamls
from kobllla.evaluation._upstream_hooks import process_results_mc2, upstream_function
from tests.conftest import ASSETS, REPO

DATA = ASSETS / "eval" / "data"


def _upstream_utils():
    """lm_eval's truthfulqa/utils.py as its own module (lm_eval registers it in sys.modules without
    its parent package, so a plain import depends on which test loaded a task first)."""
    import importlib.util

    from kobllla.evaluation._tasks import upstream_tasks_dir

    spec = importlib.util.spec_from_file_location("_upstream_truthfulqa_utils",
                                                  upstream_tasks_dir() / "truthfulqa" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_compiled_function_gives_lm_evals_results():
    upstream = _upstream_utils()

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 13)
        k = rng.randint(1, n - 1)
        labels = [1] * k + [0] * (n - k)
        rng.shuffle(labels)
        doc = {"mc2_targets": {"labels": labels}}
        results = [(rng.uniform(-400.0, 0.0), rng.random() < 0.5) for _ in range(n)]
        assert process_results_mc2(doc, results) == upstream.process_results_mc2(doc, results)


def test_a_function_that_needs_more_than_it_is_given_or_is_missing_is_refused():
    with pytest.raises(ValueError, match="uses np"):
        upstream_function("truthfulqa/utils.py", "process_results_mc2", {})
    with pytest.raises(ValueError, match="defines no_such_function 0 times"):
        upstream_function("truthfulqa/utils.py", "no_such_function", {})


def _config(task) -> dict:
    cfg = dict(task.config.to_dict())
    cfg.pop("process_results", None)
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k != "config_source"}  # the file's own path
    return cfg


def test_the_copied_mc2_task_is_upstreams_task_but_for_its_function(tmp_path):
    spec = TASKS["truthfulqa_mc2"]
    write_task_yamls([spec], {spec.name: data_source(spec, DATA, None)}, tmp_path / "ours")
    ours = TaskManager(include_path=str(tmp_path / "ours"), include_defaults=False).load([spec.name])
    ours = ours["tasks"][spec.name]
    # upstream's own file with only the data pointed at the same local split
    up = tmp_path / "upstream"
    up.mkdir()
    split = DATA / spec.hub_path / spec.hub_name / "validation.jsonl"
    (up / "truthfulqa_mc2.yaml").write_text(textwrap.dedent(f"""\
        include: "{_upstream_mc2()}"
        task: truthfulqa_mc2
        tag: []
        dataset_path: json
        dataset_name: null
        training_split: null
        validation_split: "validation"
        test_split: null
        dataset_kwargs: {{"data_files": {{"validation": "{split}"}}}}
        """), encoding="utf-8")
    theirs = TaskManager(include_path=str(up), include_defaults=False).load([spec.name])["tasks"][spec.name]
    assert _config(ours) == _config(theirs)
    assert ours.config.process_results.__module__ == "kobllla.evaluation._upstream_hooks"
    assert theirs.config.process_results.__module__.endswith("truthfulqa.utils")
    for task in (ours, theirs):
        task.build_all_requests(limit=None, rank=0, world_size=1)
    assert [r.args for r in ours.instances] == [r.args for r in theirs.instances]


def _upstream_mc2() -> str:
    from kobllla.evaluation._tasks import upstream_tasks_dir

    return str(upstream_tasks_dir() / "truthfulqa" / "truthfulqa_mc2.yaml")


def test_building_and_scoring_mc2_never_imports_rouge_score_or_nltk(tmp_path):
    probe = f"""
import sys
from pathlib import Path
from lm_eval.tasks import TaskManager
from kobllla.evaluation._tasks import TASKS, data_source, write_task_yamls
spec = TASKS["truthfulqa_mc2"]
write_task_yamls([spec], {{spec.name: data_source(spec, Path({str(DATA)!r}), None)}}, Path({str(tmp_path)!r}))
task = TaskManager(include_path={str(tmp_path)!r}, include_defaults=False).load([spec.name])["tasks"][spec.name]
doc = next(iter(task.eval_docs))
print(task.process_results(doc, [(-1.0, False)] * len(doc["mc2_targets"]["labels"]))["acc"] > 0)
print(sorted(m for m in ("rouge_score", "nltk") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                              "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "[]"]


def test_an_upstream_file_with_another_function_or_without_the_hooked_key_is_refused(tmp_path):
    from kobllla.evaluation._tasks import _upstream_keys

    other = tmp_path / "other.yaml"
    other.write_text("task: t\nprocess_docs: !function utils.process_docs\nprocess_results: !function utils.f\n")
    with pytest.raises(ValueError, match=r"other.yaml: process_docs is !function utils.process_docs"):
        _upstream_keys(other, {"process_results": "process_results_mc2"})
    bare = tmp_path / "bare.yaml"
    bare.write_text("task: t\ninclude: base.yaml\n")
    with pytest.raises(ValueError, match=r"bare.yaml has no process_results to replace"):
        _upstream_keys(bare, {"process_results": "process_results_mc2"})
