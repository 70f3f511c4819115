"""Suites, task YAML generation and local data checks (no model is loaded here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kobllla.evaluation import SUITES, TASKS, resolve_tasks
from kobllla.evaluation._schemas import SCHEMAS, validate_jsonl
from kobllla.evaluation._tasks import data_source, task_yaml, upstream_tasks_dir

DATA = Path(__file__).parent / "assets" / "eval" / "data"


def test_suites_name_the_gate_and_the_korean_benchmarks_in_order():
    assert SUITES["english_retention"] == ["truthfulqa_mc2", "truthfulqa_mc1"]
    assert SUITES["korean"][:5] == ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]
    assert SUITES["korean"][5:10] == ["haerae_general_knowledge", "haerae_history", "haerae_loan_word",
                                      "haerae_rare_word", "haerae_standard_nomenclature"]
    assert SUITES["korean"][10:] == ["kmmlu_korean_history", "kmmlu_law", "kmmlu_criminal_law",
                                     "kmmlu_political_science_and_sociology", "kmmlu_taxation"]
    assert len(SUITES["kmmlu"]) == 45


def test_resolve_tasks_merges_suites_and_tasks_without_duplicates():
    assert resolve_tasks(suites=["english_retention"], tasks=["truthfulqa_mc2", "kobest_copa"]) == [
        "truthfulqa_mc2", "truthfulqa_mc1", "kobest_copa"]


def test_resolve_tasks_refuses_nothing_asked():
    with pytest.raises(
        ValueError,
        match=r"no tasks to run: name a suite \(english_retention, haerae, kmmlu, kobest, korean, translation\)",
    ):
        resolve_tasks()


def test_every_task_points_at_an_installed_lm_eval_file_with_the_same_task_name_and_dataset():
    for spec in TASKS.values():
        path = upstream_tasks_dir() / spec.upstream_yaml
        text = path.read_text(encoding="utf-8")
        assert re.search(rf"^task: {spec.name}$", text, re.M), spec.name
        name = re.search(r"^dataset_name: (\S+)$", text, re.M)
        if name:  # kobest/haerae/kmmlu name their config in the file; truthfulqa_mc2 inherits mc1's
            assert name.group(1) == spec.hub_name, spec.name


def test_local_task_yaml_includes_upstream_by_absolute_path_and_overrides_only_the_data():
    spec = TASKS["kobest_boolq"]
    yaml = task_yaml(spec, data_source(spec, DATA, None))
    test_file = (DATA / "skt" / "kobest_v1" / "boolq" / "test.jsonl").resolve()
    assert yaml.splitlines() == [
        f'include: "{upstream_tasks_dir() / "kobest" / "kobest_boolq.yaml"}"',
        "task: kobest_boolq",
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        "training_split: null",
        "validation_split: null",
        'test_split: "test"',
        "fewshot_split: null",
        f'dataset_kwargs: {{"data_files": {{"test": "{test_file}"}}}}',
    ]


def test_hub_task_yaml_is_upstream_unchanged():
    spec = TASKS["truthfulqa_mc1"]
    assert task_yaml(spec, data_source(spec, None, None)).splitlines() == [
        f'include: "{upstream_tasks_dir() / "truthfulqa" / "truthfulqa_mc1.yaml"}"', "task: truthfulqa_mc1", "tag: []"]


def test_hub_mc2_yaml_is_upstreams_keys_with_its_function_from_our_hooks_module():
    spec = TASKS["truthfulqa_mc2"]
    lines = task_yaml(spec, data_source(spec, None, None)).splitlines()
    assert lines[0] == f'include: "{upstream_tasks_dir() / "truthfulqa" / "truthfulqa_mc1.yaml"}"'
    assert "process_results: !function kobllla_lm_eval_hooks.process_results_mc2" in lines
    assert 'metadata: {"version": 3.0}' in lines and lines[-1] == "tag: []"
    assert not any(line.startswith("dataset") for line in lines)  # the hub: upstream's dataset keys stay


def test_fixture_files_match_their_schemas():
    assert data_source(TASKS["truthfulqa_mc2"], DATA, None)["files"]["validation"]["rows"] == 4
    assert data_source(TASKS["kobest_copa"], DATA, None)["files"]["test"]["rows"] == 3
    assert data_source(TASKS["haerae_general_knowledge"], DATA, None)["files"]["test"]["rows"] == 3


def test_nshot_with_local_data_needs_the_fewshot_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"kobest_boolq: no local train split at .*boolq/train\.jsonl"):
        data_source(TASKS["kobest_boolq"], DATA, 5)


def test_data_dir_that_is_not_a_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*missing is not a directory"):
        data_source(TASKS["kobest_boolq"], tmp_path / "missing", None)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("schema", "row", "problem"),
    [
        ("kobest_boolq", {"paragraph": "p", "question": "q", "label": 2},
         r"field 'label' must be an integer in \[0, 1\], got 2"),
        ("kobest_boolq", {"paragraph": "p", "question": "q", "label": True},
         r"field 'label' must be an integer in \[0, 1\], got True"),
        ("kobest_copa", {"premise": "p", "question": "이유", "alternative_1": "a", "alternative_2": "b", "label": 0},
         r"field 'question' must be one of \['원인', '결과'\], got '이유'"),
        ("kobest_hellaswag", {"context": "c", "ending_1": "a", "ending_2": "b", "ending_3": "c", "label": 0},
         r"field 'ending_4' must be a non-empty string, got None"),
        ("kobest_sentineg", {"sentence": "", "label": 0}, r"field 'sentence' must be a non-empty string, got ''"),
        ("kobest_wic", {"word": "w", "context_1": "a", "context_2": "b", "label": "1"},
         r"field 'label' must be an integer in \[0, 1\], got '1'"),
        ("haerae", {"query": "q", "answer": "B"},
         r"field 'answer' must be one of \['\(A\)', '\(B\)', '\(C\)', '\(D\)', '\(E\)'\], got 'B'"),
        ("kmmlu", {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": 0},
         r"field 'answer' must be an integer in \[1, 2, 3, 4\], got 0"),
        ("truthfulqa_mc", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]},
                           "mc2_targets": {"choices": ["a", "b"], "labels": [1, 0]}},
         r"field 'mc1_targets\.labels' must mark exactly one choice 1, got \[1, 1\]"),
        ("truthfulqa_mc", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]},
                           "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}},
         r"field 'mc2_targets\.labels' marks no choice true \(1\)"),
    ],
)
def test_a_row_breaking_the_schema_names_file_row_and_field(tmp_path, schema, row, problem):
    good = {"kobest_boolq": {"paragraph": "p", "question": "q", "label": 1}}.get(schema)
    lines = ([json.dumps(good, ensure_ascii=False)] if good else []) + [json.dumps(row, ensure_ascii=False)]
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=rf"test\.jsonl line {len(lines)}: {problem}; fix the row"):
        validate_jsonl(path, SCHEMAS[schema])


def test_a_line_that_is_not_json_or_not_an_object_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"test\.jsonl line 1: not valid JSON \(Expecting .*\); write one JSON object per line"
    ):
        validate_jsonl(_write(tmp_path, ["{'paragraph': 'p'}"]), SCHEMAS["kobest_boolq"])
    with pytest.raises(ValueError, match=r"test\.jsonl line 1: expected a JSON object, got list"):
        validate_jsonl(_write(tmp_path, ["[1, 2]"]), SCHEMAS["kobest_boolq"])


def test_an_empty_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"test\.jsonl has no rows"):
        validate_jsonl(_write(tmp_path, [""]), SCHEMAS["kobest_boolq"])
