"""``compiled_templates``: lm_eval's requests, bit for bit, with each Jinja template compiled once."""

from __future__ import annotations

import lm_eval.utils
from lm_eval.tasks import TaskManager

from eval.bench_mc2 import write_bench
from kobllla.evaluation._runner import compiled_templates
from kobllla.evaluation._tasks import TASKS, data_source, write_task_yamls
from kobllla.evaluation._translation import TRANSLATION_TASKS, translation_source, write_translation_yamls
from tests.conftest import ASSETS

DATA = ASSETS / "eval" / "data"
FIXTURE_TASKS = ["truthfulqa_mc1", "truthfulqa_mc2", "kobest_boolq", "kobest_copa", "haerae_general_knowledge"]


def _requests(include_dir, names: list[str]) -> dict[str, list]:
    """Every request lm_eval builds for each task: its arguments, document and index, in order."""
    manager = TaskManager(include_path=str(include_dir), include_defaults=False)
    tasks = manager.load(names)["tasks"]
    out = {}
    for name in names:
        task = tasks[name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        out[name] = [(r.request_type, r.args, r.idx, r.doc_id, repr(r.doc)) for r in task.instances]
    return out


def test_every_fixture_task_and_translation_builds_the_same_requests(tmp_path):
    sources = {n: data_source(TASKS[n], DATA, None) for n in FIXTURE_TASKS}
    write_task_yamls([TASKS[n] for n in FIXTURE_TASKS], sources, tmp_path)
    names = list(FIXTURE_TASKS)
    pairs = ASSETS / "parallel"
    translation = {n: translation_source(n, pairs, None) for n in TRANSLATION_TASKS}
    write_translation_yamls(list(TRANSLATION_TASKS), translation, tmp_path)
    names += list(TRANSLATION_TASKS)
    plain = _requests(tmp_path, names)
    real = lm_eval.utils.apply_template
    with compiled_templates():
        assert lm_eval.utils.apply_template is not real  # the patch is in place while lm_eval builds
        fast = _requests(tmp_path, names)
    assert lm_eval.utils.apply_template is real  # and gone after
    assert all(plain[n] for n in names)
    for name in names:
        assert fast[name] == plain[name], name


def test_mc2_bench_rows_render_the_same_contexts_and_answers(tmp_path):
    write_bench(tmp_path, n_questions=60, seed=3)
    plain = _requests(tmp_path / "tasks", ["truthfulqa_mc2"])["truthfulqa_mc2"]
    with compiled_templates():
        fast = _requests(tmp_path / "tasks", ["truthfulqa_mc2"])["truthfulqa_mc2"]
    assert len(plain) > 60 and fast == plain
