"""Named lm_eval tasks and suites, and the task YAMLs that point them at hub or local data.

Every task we run is written at run time as a small YAML that ``include:``s lm_eval's own task
file by absolute path (resolved from the installed ``lm_eval`` package), so prompts, metrics
and task versions stay upstream's. With ``data_dir`` the YAML also overrides
``dataset_path: json`` and ``data_files``; the local layout mirrors the hub::

    DATA_DIR/truthfulqa/truthful_qa/multiple_choice/validation.jsonl
    DATA_DIR/skt/kobest_v1/boolq/test.jsonl              (train.jsonl for n-shot > 0)
    DATA_DIR/HAERAE-HUB/HAE_RAE_BENCH/general_knowledge/test.jsonl
    DATA_DIR/HAERAE-HUB/KMMLU/Korean-History/test.jsonl  (dev.jsonl for n-shot > 0)

On a machine with network, one split is copied with
``datasets.load_dataset("skt/kobest_v1", "boolq", split="test").to_json(DATA_DIR/...)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kobllla.evaluation._schemas import SCHEMAS, validate_jsonl
from kobllla.evaluation._translation import TRANSLATION_GROUP, TRANSLATION_TASKS


@dataclass(frozen=True)
class TaskSpec:
    """One lm_eval task as we run it.

    Attributes:
        name: lm_eval task name (kept unchanged, so results match plain ``lm_eval`` runs).
        upstream_yaml: path of lm_eval's task file relative to ``lm_eval/tasks``.
        hub_path: ``dataset_path`` of the upstream task.
        hub_name: ``dataset_name`` of the upstream task.
        eval_split: the split lm_eval scores.
        fewshot_split: the split few-shot examples come from (None: the task has none).
        schema: key of ``SCHEMAS`` that local rows must satisfy.
        hooks: ``(yaml key, function)`` pairs whose upstream ``!function`` is replaced by the same
            function of lm_eval compiled alone (``kobllla.evaluation._upstream_hooks``), so that its
            module's other imports are not run; the upstream file is then copied key by key instead
            of included (lm_eval resolves an included file's functions too).
    """

    name: str
    upstream_yaml: str
    hub_path: str
    hub_name: str
    eval_split: str
    fewshot_split: str | None
    schema: str
    hooks: tuple[tuple[str, str], ...] = ()

    def local_file(self, data_dir: Path, split: str) -> Path:
        """Where the local copy of ``split`` lives under ``data_dir``."""
        return Path(data_dir) / self.hub_path / self.hub_name / f"{split}.jsonl"


_KOBEST = ("boolq", "copa", "hellaswag", "sentineg", "wic")
_HAERAE = {  # task name -> (upstream file, hub config)
    "haerae_general_knowledge": ("haerae_gk.yaml", "general_knowledge"),
    "haerae_history": ("haerae_hi.yaml", "history"),
    "haerae_loan_word": ("haerae_lw.yaml", "loan_words"),
    "haerae_rare_word": ("haerae_rw.yaml", "rare_words"),
    "haerae_standard_nomenclature": ("haerae_sn.yaml", "standard_nomenclature"),
}
# KMMLU's 45 subjects, as lm_eval 0.4.13's kmmlu/default/kmmlu_<subject>.yaml names them.
_KMMLU = (
    "accounting agricultural_sciences aviation_engineering_and_maintenance biology "
    "chemical_engineering chemistry civil_engineering computer_science construction criminal_law "
    "ecology economics education electrical_engineering electronics_engineering energy_management "
    "environmental_science fashion food_processing gas_technology_and_engineering geomatics health "
    "industrial_engineer information_technology interior_architecture_and_design korean_history law "
    "machine_design_and_manufacturing management maritime_engineering marketing materials_engineering "
    "math mechanical_engineering nondestructive_testing patent political_science_and_sociology "
    "psychology public_safety railway_and_automotive_engineering real_estate refrigerating_machinery "
    "social_welfare taxation telecommunications_and_wireless_technology"
).split()
# The hub configs are the subject in Title-Case with hyphens ("Korean-History"); a few words
# keep their case in the dataset ("and").
_KMMLU_KEEP_LOWER = {"and"}


def _kmmlu_config(subject: str) -> str:
    return "-".join(w if w in _KMMLU_KEEP_LOWER else w.capitalize() for w in subject.split("_"))


def _build_tasks() -> dict[str, TaskSpec]:
    tasks = {
        f"truthfulqa_{mc}": TaskSpec(
            f"truthfulqa_{mc}", f"truthfulqa/truthfulqa_{mc}.yaml", "truthfulqa/truthful_qa",
            "multiple_choice", "validation", None, "truthfulqa_mc",
            # utils.py also imports rouge_score + nltk and sacrebleu for the generation task: 0.7 s
            hooks=(("process_results", "process_results_mc2"),) if mc == "mc2" else (),
        )
        for mc in ("mc1", "mc2")
    }
    for sub in _KOBEST:
        tasks[f"kobest_{sub}"] = TaskSpec(
            f"kobest_{sub}", f"kobest/kobest_{sub}.yaml", "skt/kobest_v1", sub, "test", "train", f"kobest_{sub}",
        )
    for name, (fname, config) in _HAERAE.items():
        tasks[name] = TaskSpec(name, f"haerae/{fname}", "HAERAE-HUB/HAE_RAE_BENCH", config, "test", "test", "haerae")
    for subject in _KMMLU:
        tasks[f"kmmlu_{subject}"] = TaskSpec(
            f"kmmlu_{subject}", f"kmmlu/default/kmmlu_{subject}.yaml", "HAERAE-HUB/KMMLU",
            _kmmlu_config(subject), "test", "dev", "kmmlu",
        )
    return tasks


TASKS: dict[str, TaskSpec] = _build_tasks()

# A documented KMMLU subset for the `korean` suite: the Korea-specific subjects (history, law,
# society, tax), ~1,400 of KMMLU's 35k test questions; the `kmmlu` suite runs all 45 subjects.
KMMLU_KOREAN_SUBSET = ["korean_history", "law", "criminal_law", "political_science_and_sociology", "taxation"]

SUITES: dict[str, list[str]] = {
    # truthfulqa_mc2 is the gate; mc1 scores the same 817 questions at no extra download.
    "english_retention": ["truthfulqa_mc2", "truthfulqa_mc1"],
    "korean": [f"kobest_{s}" for s in _KOBEST] + list(_HAERAE) + [f"kmmlu_{s}" for s in KMMLU_KOREAN_SUBSET],
    "kobest": [f"kobest_{s}" for s in _KOBEST],
    "haerae": list(_HAERAE),
    "kmmlu": [f"kmmlu_{s}" for s in _KMMLU],
    # generate_until on local held-out pairs (--translation-data DIR; kobllla/evaluation/_translation.py)
    "translation": list(TRANSLATION_TASKS),
}


def resolve_tasks(*, suites: list[str] | tuple[str, ...] = (), tasks: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Task names of the given suites and tasks, in order, without duplicates.

    Raises:
        ValueError: an unknown suite or task (the message lists the valid ones), or nothing asked.
    """
    names: list[str] = []
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
        names += SUITES[suite]
    for task in tasks:
        if task == TRANSLATION_GROUP:
            names += list(TRANSLATION_TASKS)
            continue
        if task not in TASKS and task not in TRANSLATION_TASKS:
            raise ValueError(
                f"unknown task {task!r}; known tasks: {', '.join(_task_summary())} "
                "(see kobllla.evaluation.TASKS)"
            )
        names.append(task)
    if not names:
        raise ValueError(f"no tasks to run: name a suite ({', '.join(sorted(SUITES))}) or a task")
    return list(dict.fromkeys(names))


def _task_summary() -> list[str]:
    short = [n for n in TASKS if not n.startswith("kmmlu_")]
    return short + ["kmmlu_<subject> (45 subjects)", f"{TRANSLATION_GROUP} ({', '.join(TRANSLATION_TASKS)})"]


def upstream_tasks_dir() -> Path:
    """``lm_eval/tasks`` of the installed lm_eval."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class MissingLocalDataError(FileNotFoundError):
    """A task's split has no file under ``--data-dir``; carries what the combined message needs."""

    def __init__(self, spec: TaskSpec, split: str, path: Path) -> None:
        self.spec, self.split, self.path = spec, split, path
        super().__init__(
            f"{spec.name}: no local {split} split at {path}; write it in the {spec.hub_path} "
            f"({spec.hub_name}) schema, e.g. {export_hint(spec, split, path)}"
        )


def export_hint(spec: TaskSpec, split: str, path: Path) -> str:
    """The one line that copies a hub split into the local layout (on a machine with network)."""
    return f"datasets.load_dataset({spec.hub_path!r}, {spec.hub_name!r}, split={split!r}).to_json({str(path)!r})"


def data_source(spec: TaskSpec, data_dir: Path | None, num_fewshot: int | None) -> dict:
    """Checks local files (if any) and describes where the task's data comes from.

    Returns:
        dict: ``{"source": "hub", "path", "name"}`` or ``{"source": "local", "files":
        {split: {"path", "sha256", "rows"}}}``; the latter is part of what makes two runs comparable.

    Raises:
        MissingLocalDataError: the eval split (or the few-shot split when n-shot > 0) is missing.
        ValueError: a row does not match the task's schema.
    """
    if data_dir is None:
        return {"source": "hub", "path": spec.hub_path, "name": spec.hub_name}
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    splits = [spec.eval_split]
    if num_fewshot and spec.fewshot_split and spec.fewshot_split not in splits:
        splits.append(spec.fewshot_split)
    files = {}
    for split in splits:
        path = spec.local_file(data_dir, split)
        if not path.is_file():
            raise MissingLocalDataError(spec, split, path)
        rows = validate_jsonl(path, SCHEMAS[spec.schema])
        files[split] = {"path": str(path.resolve()), "sha256": _file_sha256(path), "rows": rows}
    return {"source": "local", "files": files}


def task_yaml(spec: TaskSpec, source: dict) -> str:
    """The YAML text of ``spec``: upstream's file (included, or copied with its hooks replaced),
    plus local data overrides for a local source."""
    upstream = upstream_tasks_dir() / spec.upstream_yaml
    if not upstream.is_file():
        raise FileNotFoundError(f"lm_eval task file {upstream} is missing; reinstall lm_eval==0.4.13")
    keys = _upstream_keys(upstream, dict(spec.hooks)) if spec.hooks else {"include": json.dumps(str(upstream))}
    keys.update(task=spec.name, tag="[]")
    if source["source"] == "local":
        files = {split: f["path"] for split, f in source["files"].items()}
        # Splits with no local file are switched off so lm_eval does not look for them.
        split_keys = {"training_split": "train", "validation_split": "validation", "test_split": "test"}
        keys.update(dataset_path="json", dataset_name="null")
        for key, split in split_keys.items():
            keys[key] = json.dumps(split if split in files else None)
        if spec.fewshot_split is not None:
            keys["fewshot_split"] = json.dumps(spec.fewshot_split if spec.fewshot_split in files else None)
        keys["dataset_kwargs"] = json.dumps({"data_files": files})
    return "".join(f"{key}: {value}\n" for key, value in keys.items())


class _Function(str):
    """A ``!function`` value of an upstream YAML, kept as its text."""


def _upstream_keys(upstream: Path, hooks: dict[str, str]) -> dict[str, str]:
    """Upstream's top-level keys as YAML text, in order: includes made absolute, each hooked key
    pointing at our hooks module; any other ``!function`` is refused (it would need its module)."""
    import yaml

    from kobllla.evaluation._upstream_hooks import HOOKS_MODULE

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
    raw = yaml.load(upstream.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - SafeLoader + one tag
    out = {}
    for key, value in raw.items():
        if key in hooks:
            out[key] = f"!function {HOOKS_MODULE}.{hooks[key]}"
        elif isinstance(value, _Function):
            raise ValueError(f"{upstream}: {key} is !function {value}, which kobllla has no copy of; "
                             "lm_eval==0.4.13 is supported")
        elif key == "include":
            incs = [str(upstream.parent / i) for i in (value if isinstance(value, list) else [value])]
            out[key] = json.dumps(incs if isinstance(value, list) else incs[0])
        else:
            out[key] = json.dumps(value)
    missing = sorted(set(hooks) - set(raw))
    if missing:
        raise ValueError(f"{upstream} has no {', '.join(missing)} to replace; lm_eval==0.4.13 is supported")
    return out


def write_task_yamls(specs: list[TaskSpec], sources: dict[str, dict], include_dir: Path) -> None:
    """Writes one ``<task>.yaml`` per spec into ``include_dir`` (an lm_eval include path)."""
    from kobllla.evaluation._upstream_hooks import HOOKS_MODULE

    include_dir = Path(include_dir)
    include_dir.mkdir(parents=True, exist_ok=True)
    hooks = sorted({fn for spec in specs for _, fn in spec.hooks})
    if hooks:  # lm_eval's !function loads this file from beside the YAMLs
        (include_dir / f"{HOOKS_MODULE}.py").write_text(
            f"from kobllla.evaluation._upstream_hooks import {', '.join(hooks)}  # noqa: F401\n", encoding="utf-8")
    for spec in specs:
        (include_dir / f"{spec.name}.yaml").write_text(task_yaml(spec, sources[spec.name]), encoding="utf-8")
