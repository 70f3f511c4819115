"""``run_demo``: every stage of the method, in order, each reused on a rerun unless forced."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kobllla.atomic import write_json
from kobllla.chat_format import write_chat_stop_tokens
from kobllla.demo._data import DemoData, prepare_data
from kobllla.demo._pipeline import (
    Chain,
    StageRecord,
    checkpoint_settings,
    final_epoch,
    logged_losses,
    run_logged,
    stage_config,
    tune_cpu,
)

log = logging.getLogger(__name__)

# Every training setting of the demo is in these YAML files (``configs/demo/`` in the repository);
# the demo only fills in its run's paths and seed and saves the result as RUN_DIR/<stage>/config.yaml.
CONFIG_FILES = {
    "base": "stage0_pretrain_en_full.yaml",
    "instruct": "stage0_instruct_en_full.yaml",
    "stage1": "stage1_kowiki_lora.yaml",
    "stage3": "stage3_kolima_bilima_lora.yaml",
}
DEFAULT_CONFIG_DIR = Path("configs/demo")  # relative to the repository root, where `make demo` runs


def _data_stage(chain: Chain) -> tuple[StageRecord, DemoData]:
    def body(out: Path, rec: StageRecord) -> None:
        _, counts = prepare_data(out)
        rec.info.update(counts)

    rec = chain.stage("data", "Offline data from installed packages", body)
    return rec, DemoData.at(chain.run_dir / "data")


def _init_stage(chain: Chain, seed: int) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        model = out / "model"
        run_logged([sys.executable, "-m", "tools.make_tiny_model", "--out", str(model), "--preset", "mini",
                    "--dtype", "float32", "--seed", str(seed)], out / "stdout.log", rec)
        rec.outputs["checkpoint"] = str(model)
        rec.info["seed"] = seed

    return chain.stage("init", "Random-init mini Llama 3 (hidden 64, 2 layers, vocab 128,256)", body)


def _training_stage(chain: Chain, name: str, what: str, recipe: str, src: Path, settings: dict[str, object],
                    *, nproc: int | None, chat_model: bool = False) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        cfg = stage_config(chain.config_dir / CONFIG_FILES[name], out,
                           {"output_dir": str(out), **checkpoint_settings(src), **settings})
        run_logged(tune_cpu(recipe, cfg, nproc=nproc), out / "stdout.log", rec)
        ckpt = final_epoch(out)
        if chat_model:  # the chat template ends a turn with <|eot_id|>: so must generation
            write_chat_stop_tokens(ckpt)
        rec.outputs["checkpoint"] = str(ckpt)
        rec.info["losses"] = logged_losses(out)

    return chain.stage(name, what, body)


def _chat_vector_stage(chain: Chain, base: Path, instruct: Path, target: Path) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        model = out / "model"
        run_logged([sys.executable, "-m", "tools.chat_vector", "--base", str(base), "--instruct", str(instruct),
                    "--target", str(target), "--out", str(model), "--quiet"], out / "stdout.log", rec)
        rec.outputs["checkpoint"] = str(model)

    return chain.stage("chat_vector", "stage 1 + (instruct - base)", body)


def _stage3_datasets(data: DemoData) -> dict[str, object]:
    return {"dataset.0.data_files": str(data.kolima_train), "dataset.1.data_files": str(data.bilima),
            "dataset.2.data_files": str(data.bilima), "dataset.3.data_files": str(data.en_qa_train)}


def train_all(chain: Chain, *, seed: int = 0) -> tuple[dict[str, StageRecord], DemoData]:
    """Runs (or reuses) every training stage; returns the records by stage name."""
    stages: dict[str, StageRecord] = {}
    stages["data"], data = _data_stage(chain)
    stages["init"] = _init_stage(chain, seed)
    if stages["init"].info.get("seed") != seed:
        raise ValueError(f"{chain.run_dir} holds the run of seed {stages['init'].info.get('seed')}, not {seed}: "
                         "use another --run-dir or --force")

    def ckpt(name: str) -> Path:
        return Path(stages[name].outputs["checkpoint"])

    stages["base"] = _training_stage(
        chain, "base", "Stage 0a: pretrain the base from scratch, English-first with a small Korean share",
        "full_finetune_single_device", ckpt("init"), {"dataset.data_files": str(data.base_train), "seed": seed},
        nproc=None)
    stages["instruct"] = _training_stage(
        chain, "instruct", "Stage 0b: tune a copy of the base on English Q/A (chat format)",
        "full_finetune_single_device", ckpt("base"), {"dataset.data_files": str(data.en_qa_train), "seed": seed},
        nproc=None, chat_model=True)
    stages["stage1"] = _training_stage(
        chain, "stage1", "Stage 1: LoRA continued pretraining of the base on Korean (+ English replay)",
        "lora_finetune_distributed", ckpt("base"), {"dataset.data_files": str(data.stage1_train), "seed": seed},
        nproc=2)
    stages["chat_vector"] = _chat_vector_stage(chain, ckpt("base"), ckpt("instruct"), ckpt("stage1"))
    stages["stage3"] = _training_stage(
        chain, "stage3", "Stage 3: LoRA instruction tuning on KoLIMA + BiLIMA (en_ko, ko_en)",
        "lora_finetune_single_device", ckpt("chat_vector"), {**_stage3_datasets(data), "seed": seed}, nproc=None)
    return stages, data


def stage_summary(stages: dict[str, StageRecord]) -> list[dict]:
    """Plain dicts of the stage records (for JSON)."""
    return [asdict(s) for s in stages.values()]


@dataclass(frozen=True)
class DemoResult:
    """Where the report is, and what it found."""

    report: Path
    checks: list
    gate_passed: bool
    scores: dict[str, dict]
    total_s: float


def run_demo(run_dir: Path, *, force: bool = False, seed: int = 0, config_dir: Path = DEFAULT_CONFIG_DIR) -> DemoResult:
    """Runs every stage (reusing finished ones unless ``force``), evaluates, writes the report.

    Args:
        run_dir (Path): where every stage's output, the evaluation and the report go.
        force (bool): redo every stage even if its output is complete.
        seed (int): the mini model's init seed and every recipe's ``seed`` (torch's RNG: LoRA's init).
            Not the data order: torchtune 0.6.1's recipes seed their sampler with 0, so every seed
            sees the same batches in the same order.
        config_dir (Path): the demo's torchtune YAMLs (``configs/demo`` of the repository).

    Returns:
        DemoResult: the report's path, the method's checks, the gate, the scores.

    Raises:
        StageFailed: a stage's command failed (the message names its log).
    """
    from kobllla.demo._evaluate import evaluate_models, gate, method_checks, samples_stage
    from kobllla.demo._report import write_report

    run_dir = Path(run_dir).resolve()
    t0 = time.perf_counter()
    config_dir = Path(config_dir).resolve()
    missing = [name for name in CONFIG_FILES.values() if not (config_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{config_dir}: missing the demo configs {missing}; run from the repository root "
                                "or pass --config-dir configs/demo")
    chain = Chain(run_dir, force=force, config_dir=config_dir)
    stages, data = train_all(chain, seed=seed)
    models = ("base", "instruct", "stage1", "chat_vector", "stage3")
    checkpoints = {name: Path(stages[name].outputs["checkpoint"]) for name in models}
    stages["eval"] = evaluate_models(chain, checkpoints, data)
    scores = {label: stages["eval"].info[label] for label in checkpoints}
    stages["samples"] = samples_stage(chain, checkpoints, data, seed=seed)
    checks = method_checks(scores)
    gate_passed, gate_lines = gate(run_dir, run_dir / "report" / "gate")
    total_s = time.perf_counter() - t0
    report = write_report(run_dir / "report", stages, scores, checks, gate_passed, gate_lines, total_s)
    write_json(run_dir / "report" / "summary.json", {
        "checks": [asdict(c) for c in checks], "gate_passed": gate_passed, "gate": gate_lines,
        "scores": scores, "total_s": round(total_s, 1), "stages": stage_summary(stages),
    })
    return DemoResult(report=report, checks=checks, gate_passed=gate_passed, scores=scores, total_s=total_s)
