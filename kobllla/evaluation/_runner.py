"""Run lm_eval (0.4.13, its Python API) on one checkpoint and store the result as a run record.

torchtune 0.6.1's ``eleuther_eval`` recipe refuses lm_eval 0.4.13 (it compares versions as
strings), so we drive lm_eval's HF model directly on the HF-format dirs every stage writes. The
model is loaded once and also scores the held-out perplexity texts.
"""

from __future__ import annotations

import functools
import json
import math
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from unittest import mock

import torch

from kobllla.evaluation._checkpoint import fingerprint_files, resolve_model
from kobllla.evaluation._perplexity import HELDOUT_VERSION, perplexity_of_texts, read_heldout
from kobllla.evaluation._preload import start_preload
from kobllla.evaluation._store import RUN_SCHEMA, check_label, new_run_id, save_run
from kobllla.evaluation._tasks import (
    TASKS,
    MissingLocalDataError,
    data_source,
    export_hint,
    resolve_tasks,
    write_task_yamls,
)
from kobllla.evaluation._translation import (
    is_translation_task,
    translation_samples,
    translation_source,
    write_translation_yamls,
)
from kobllla.gcpause import heavy_imports
from kobllla.versions import package_versions

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Scorer = Literal["hf", "shared_prefix"]
# lm_eval's "auto" batch size probes with a 64 x max_length batch: on CPU that can exhaust RAM
# (64 x 2048 x 128,256 fp32 logits = 67 GB), so "auto" means this on CPU.
CPU_AUTO_BATCH = 4


def _resolve_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cpu|cuda(:\d+)?", device) is None:
        raise ValueError(f"unknown device {device!r}; choose auto, cuda, cuda:N or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no GPU; pass --device cpu")
    return device


def _resolve_dtype(dtype: DType, device: str) -> str:
    if dtype == "auto":  # bf16 on GPU as Meta ships; fp32 on CPU, where bf16 is several times slower
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
    return dtype


def _clean(value) -> float | None:
    if value is None or value == "N/A":
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _task_entries(out: dict, sources: dict[str, dict]) -> dict[str, dict]:
    """Our per-task record from lm_eval's results dict."""
    entries = {}
    for task, scores in out["results"].items():
        metrics = {}
        for key, value in scores.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else key
            metrics[name] = {
                "value": _clean(value),
                "stderr": _clean(scores.get(f"{metric}_stderr,{filt}")),
                "higher_is_better": bool(out["higher_is_better"].get(task, {}).get(metric, True)),
            }
        n = out["n-samples"][task]
        entries[task] = {
            "version": out["versions"][task],
            "n_shot": out["n-shot"][task],
            "n_samples": {"original": n["original"], "effective": n["effective"]},
            "data": sources[task],
            "metrics": metrics,
        }
        if is_translation_task(task):  # every hypothesis beside its source and reference
            entries[task]["samples"] = translation_samples(out, task)
    return entries


def _heldout_entries(lm, docs: dict[str, list[str]], sources: dict[str, dict], stride: int | None) -> dict[str, dict]:
    entries = {}
    for lang, lang_docs in docs.items():
        scores = perplexity_of_texts(lm.model, lm.tokenizer, lang_docs, max_length=lm.max_length, stride=stride)
        entries[f"heldout_{lang}"] = {
            "version": HELDOUT_VERSION,
            "n_shot": 0,
            "n_samples": {"original": scores["documents"], "effective": scores["documents"]},
            "data": sources[lang],
            "metrics": {
                "token_ppl": {"value": scores["token_ppl"], "stderr": None, "higher_is_better": False},
                "bits_per_byte": {"value": scores["bits_per_byte"], "stderr": None, "higher_is_better": False},
            },
            "counts": {"tokens": scores["tokens"], "bytes": scores["bytes"], "nll": scores["nll"]},
        }
    return entries


def _heldout_sources(heldout: dict[str, Path | list[str]]) -> tuple[dict[str, list[str]], dict[str, dict]]:
    import hashlib

    docs, sources = {}, {}
    for lang, src in heldout.items():
        check_label(lang)
        docs[lang] = read_heldout(src)
        digest = hashlib.sha256("\n\n".join(docs[lang]).encode("utf-8")).hexdigest()
        where = "inline" if isinstance(src, list) else str(Path(src).resolve())
        text = {"path": where, "sha256": digest, "rows": len(docs[lang])}
        sources[lang] = {"source": "local", "files": {"text": text}}
    return docs, sources


def evaluate_model(
    model: str | Path,
    *,
    label: str,
    suites: list[str] | tuple[str, ...] = (),
    tasks: list[str] | tuple[str, ...] = (),
    data_dir: Path | None = None,
    translation_data: Path | None = None,
    max_gen_toks: int | None = None,
    heldout: dict[str, Path | list[str]] | None = None,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: int | Literal["auto"] = "auto",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    heldout_stride: int | None = None,
    bootstrap_iters: int = 100_000,
    scorer: Scorer = "hf",
    fingerprint: Literal["sampled", "full"] = "sampled",
    results_dir: Path | None = None,
) -> dict:
    """Evaluates one checkpoint on suites/tasks (and held-out perplexity); returns the run record.

    Everything is checked before the model loads: the checkpoint dir (config, weights, tokenizer),
    task and suite names, every local data file row by row, and the held-out texts.

    Args:
        model: HF checkpoint dir (e.g. a stage's ``epoch_0/``) or hub id.
        label: name of this model in reports (``base``, ``stage1``...).
        suites: names in ``SUITES`` (``english_retention``, ``korean``, ``kobest``, ``haerae``, ``kmmlu``).
        tasks: extra task names from ``TASKS``.
        data_dir: local copies of the datasets (layout in ``kobllla.evaluation._tasks``); None: the hub.
        translation_data: held-out pairs of the ``kobllla_translation`` tasks (``test.ko`` + ``test.zh``
            or ``test.jsonl``; see ``kobllla.evaluation._translation``).
        max_gen_toks: new tokens per translation hypothesis (None: 256; another value changes the task version).
        heldout: language -> held-out text (``.txt``/``.jsonl`` or list) scored for perplexity.
        device: ``auto`` (cuda if available), ``cuda`` or ``cpu``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU) or an explicit dtype.
        batch_size: an int, or ``auto`` (lm_eval's probe on GPU, ``CPU_AUTO_BATCH`` on CPU).
        limit: lm_eval's ``--limit`` for smoke runs (samples per task, or a fraction < 1).
        num_fewshot: override the tasks' n-shot (None: each task's default).
        max_length: context length lm_eval uses (None: the model config's).
        heldout_stride: scored tokens per perplexity window (None: disjoint windows).
        bootstrap_iters: lm_eval's bootstrap iterations for non-mean metrics' stderr.
        scorer: ``hf`` (lm_eval's HF model) or ``shared_prefix`` (all answers of a question scored
            against one shared context; lm_eval's log-likelihoods with 5.4x fewer tokens on MC2).
        fingerprint: ``sampled`` (1 MiB of every 64 MiB block, ~1 s for 8B) or ``full`` (every byte).
        results_dir: where to store the record and append history (None: not stored).

    Returns:
        dict: the run record (see ``kobllla.evaluation._store``), with ``path`` if stored.

    Raises:
        FileNotFoundError, ValueError: bad checkpoint, name, data file or option (one line each).
    """
    check_label(label)
    if results_dir is not None and Path(results_dir).exists() and not Path(results_dir).is_dir():
        raise NotADirectoryError(f"--results-dir {results_dir} is a file; pass a directory for runs/ and history.jsonl")
    if scorer not in ("hf", "shared_prefix"):
        raise ValueError(f"unknown scorer {scorer!r}; choose hf or shared_prefix")
    if isinstance(limit, bool) or (limit is not None and not limit > 0):
        raise ValueError(f"--limit must be > 0 (samples per task, or a fraction < 1), got {limit!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"--batch-size must be an integer >= 1 or 'auto', got {batch_size!r}")
    names = resolve_tasks(suites=suites, tasks=tasks) if (suites or tasks or not heldout) else []
    ref = resolve_model(model, fingerprint=False)
    if ref.local:
        _check_local_weights(Path(ref.spec), results_dir)
    sources = _data_sources(names, data_dir, num_fewshot, translation_data, max_gen_toks)
    docs, heldout_sources = _heldout_sources(heldout or {})
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if batch_size == "auto" and device == "cpu":
        batch_size = CPU_AUTO_BATCH
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the weights while lm_eval loads them
        digest = pool.submit(fingerprint_files, ref.files, Path(ref.spec), mode=fingerprint) if ref.local else None
        # the shared-prefix scorer's weights load onto the device while lm_eval and transformers import
        preload = start_preload(Path(ref.spec), device) if scorer == "shared_prefix" and ref.local else None
        lm, out, timing = _run_lm_eval(ref.spec, names, sources, device=device, dtype=dtype, batch_size=batch_size,
                                       limit=limit, num_fewshot=num_fewshot, max_length=max_length,
                                       bootstrap_iters=bootstrap_iters, scorer=scorer, preload=preload)
        t1 = time.perf_counter()
        task_entries = _task_entries(out, sources) if out else {}
        task_entries.update(_heldout_entries(lm, docs, heldout_sources, heldout_stride))
        timing["heldout_s"] = time.perf_counter() - t1
        model_id = digest.result() if digest else f"hub:{ref.spec}"
    timing["total_s"] = time.perf_counter() - t0
    record = _record(label, ref, started, device=device, dtype=dtype, batch_size=batch_size,
                     max_length=lm.max_length, limit=limit, tasks=task_entries, results_dir=results_dir)
    record["model"].update(fingerprint=model_id, scorer=scorer)
    record["timing"] = {k: round(v, 3) for k, v in timing.items()}
    if results_dir is not None:
        record["path"] = str(save_run(record, Path(results_dir)))
    return record


def _check_local_weights(model: Path, results_dir: Path | None) -> None:
    """An adapter-only ``epoch_N/`` (lm_eval loads full weights only), broken safetensors headers, and a
    results dir inside the checkpoint dir are refused before lm_eval loads anything."""
    from kobllla.atomic import refuse_output_over_inputs
    from kobllla.model_dir import adapter_weights_file, check_weight_headers, has_full_weights

    if results_dir is not None:
        try:
            refuse_output_over_inputs(Path(results_dir), [model])
        except ValueError:
            raise ValueError(f"--results-dir {results_dir} is or lies inside/around the model dir {model}; "
                             "the checkpoint dir is never written to: pick a results dir outside it") from None
    if not has_full_weights(model) and adapter_weights_file(model) is not None:
        raise ValueError(f"{model} holds only a LoRA adapter ({adapter_weights_file(model).name}); lm_eval needs "
                         "full weights: merge it into its base first with python -m tools.check_model "
                         f"{model} --base BASE_DIR --fix-stop-tokens --out MERGED_DIR (or "
                         "kobllla.model_dir.merge_adapter) and evaluate MERGED_DIR")
    check_weight_headers(model)


def _data_sources(names: list[str], data_dir: Path | None, num_fewshot: int | None,
                  translation_data: Path | None = None, max_gen_toks: int | None = None) -> dict[str, dict]:
    """Every task's data source; all missing local files are named in one error, not one per run."""
    sources, missing = {}, []
    for name in names:
        if is_translation_task(name):
            sources[name] = translation_source(name, translation_data, max_gen_toks)
            continue
        try:
            sources[name] = data_source(TASKS[name], data_dir, num_fewshot)
        except MissingLocalDataError as exc:
            missing.append(exc)
    if data_dir is None:
        _check_hub_cache([n for n in names if not is_translation_task(n)])
    if len(missing) == 1:
        raise missing[0]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} tasks have no local data: "
            f"{', '.join(f'{e.spec.name} ({e.path})' for e in missing)}; write each split in its hub dataset's "
            f"schema, e.g. {export_hint(first.spec, first.split, first.path)}"
        )
    return sources


def _hub_missing_error(spec, reason: str) -> FileNotFoundError:
    """One line: the dataset, that it is neither reachable nor cached, and the --data-dir layout."""
    from datasets.config import HF_DATASETS_CACHE

    path = Path("DATA_DIR") / spec.hub_path / spec.hub_name / f"{spec.eval_split}.jsonl"
    return FileNotFoundError(
        f"{spec.name} needs the hub dataset {spec.hub_path} ({spec.hub_name}), which is not in the local cache "
        f"{HF_DATASETS_CACHE} and cannot be fetched ({reason}); pass --data-dir DATA_DIR with each split as "
        f"DATA_DIR/<dataset>/<config>/<split>.jsonl, here {path}, written on a machine with network by "
        f"{export_hint(spec, spec.eval_split, path)}"
    )


def _check_hub_cache(names: list[str]) -> None:
    """Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), every hub dataset must be in the local cache."""
    import datasets
    from datasets.config import HF_HUB_OFFLINE

    if not HF_HUB_OFFLINE:
        return
    for name in names:
        spec = TASKS[name]
        try:
            datasets.load_dataset_builder(spec.hub_path, spec.hub_name)
        except (ConnectionError, FileNotFoundError, ValueError) as exc:
            raise _hub_missing_error(spec, f"offline mode: {type(exc).__name__}") from None


@contextmanager
def _no_env_report():
    """Skips lm_eval's ``add_env_info`` (torch's collect_env: pip list, nvidia-smi; ~3 s) inside
    ``simple_evaluate``: the run record keeps its own versions and never reads that report."""
    import lm_eval.evaluator

    with mock.patch.object(lm_eval.evaluator, "add_env_info", lambda storage: None):
        yield


@contextmanager
def compiled_templates():
    """lm_eval's ``apply_template`` compiles the Jinja template again for every document and field
    (``env.from_string`` per call: MC2 renders 2,453 times, 1.0 of its 1.1 s of request building on a
    2-core box); here each distinct template is compiled once, by the same environment, and rendered
    per document, so every rendered string is the one lm_eval renders (``tests/test_eval_templates.py``)."""
    import lm_eval.utils

    compile_once = functools.lru_cache(maxsize=1024)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_once(template).render(**doc)

    with mock.patch.object(lm_eval.utils, "apply_template", apply_template):
        yield


def _run_lm_eval(spec: str, names: list[str], sources: dict[str, dict], *, device: str, dtype: str,
                 batch_size, limit, num_fewshot, max_length, bootstrap_iters: int, scorer: str, preload=None):
    with heavy_imports():  # lm_eval and transformers: long-lived objects, no garbage
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from kobllla.evaluation._shared_prefix import SharedPrefixHFLM

        _import_model_code(spec)

    extra = {}
    if scorer == "shared_prefix":
        model_class = SharedPrefixHFLM
        extra["preloaded"] = preload
    else:
        model_class = HFLM
    t0 = time.perf_counter()
    lm = model_class(pretrained=spec, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                     **extra)
    timing = {"load_s": time.perf_counter() - t0}
    if not names:
        return lm, None, timing
    with tempfile.TemporaryDirectory(prefix="kobllla-tasks-") as include_dir:
        lm_names = [n for n in names if not is_translation_task(n)]
        write_task_yamls([TASKS[n] for n in lm_names], sources, Path(include_dir))
        write_translation_yamls([n for n in names if is_translation_task(n)], sources, Path(include_dir))
        manager = TaskManager(include_path=include_dir, include_defaults=False)
        try:
            with _no_env_report(), compiled_templates():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    bootstrap_iters=bootstrap_iters, log_samples=len(lm_names) < len(names),  # translation hypotheses
                )
        except ConnectionError as exc:  # the hub is unreachable (no network) and a dataset is not cached
            raise _hub_missing_error(_task_of_error(lm_names, exc), f"{type(exc).__name__}") from None
    timing["lm_eval_s"] = time.perf_counter() - t0 - timing["load_s"]
    timing.update(getattr(lm, "timing", {}))  # the shared-prefix scorer's tokenize_s / score_s
    return lm, out, timing


def _import_model_code(spec: str) -> None:
    """Imports what transformers imports lazily on the first model built (``modeling_utils``, which
    pulls in torch.distributed.tensor, scikit-learn and torch._dynamo, and the config's model class),
    so that it happens inside :func:`heavy_imports` rather than while the model loads."""
    import transformers
    import transformers.modeling_utils  # noqa: F401

    config = Path(spec) / "config.json"
    try:
        names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # a hub id, or a config HF itself will refuse later
        return
    for name in names:
        if isinstance(name, str):
            getattr(transformers, name, None)


def _task_of_error(names: list[str], exc: BaseException):
    """The task whose hub dataset the error names (the first task when it names none)."""
    text = str(exc)
    return next((TASKS[n] for n in names if TASKS[n].hub_path in text), TASKS[names[0]])


def _record(label: str, ref, started: datetime, *, device: str, dtype: str, batch_size, max_length: int,
            limit, tasks: dict, results_dir: Path | None) -> dict:
    run_id = new_run_id(label, Path(results_dir), started) if results_dir else f"{started:%Y%m%dT%H%M%SZ}-{label}"
    return {
        "schema": RUN_SCHEMA,
        "run_id": run_id,
        "label": label,
        "timestamp": started.isoformat(timespec="seconds"),
        "model": {"spec": ref.spec, "local": ref.local, "fingerprint": ref.fingerprint, "device": device,
                  "dtype": dtype, "batch_size": batch_size, "max_length": max_length},
        "versions": package_versions("lm_eval", "transformers", "torch", "kobllla"),
        "limit": limit,
        "tasks": tasks,
    }
