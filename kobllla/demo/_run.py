"""``run_demo``: every stage of the method, in order, each reused on a rerun unless forced."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kobllla.checkpoint_io import write_json
from kobllla.demo._data import DemoData, prepare_data
from kobllla.demo._pipeline import (
    MINI_MODEL,
    Chain,
    StageRecord,
    checkpoint_overrides,
    derived_config,
    final_epoch,
    logged_losses,
    run_logged,
    tune_cpu,
)

log = logging.getLogger(__name__)

# Steps are sized for <= 10 minutes on 2 CPU cores; see the stage descriptions in the report.
PRETRAIN_STEPS = 50
INSTRUCT_EPOCHS = 5
STAGE1_STEPS = 60
STAGE3_EPOCHS = 2
# Stages 1 and 3 adapt what the 8B configs adapt (q_proj/v_proj, rank 8, alpha 16). Measured on
# this model (stage 1, 60 steps): lr 1e-3 took Korean held-out perplexity to 62 % of the base's
# with English at -1 %; lr 2e-3 reached 21 % but doubled English perplexity, and adding LoRA on
# the MLP and output layer (the tiny configs' default) tripled it: the mini model has too little
# context to keep two languages apart once its output distribution moves.
METHOD_LORA = [
    "model.lora_attn_modules=[q_proj,v_proj]", "model.apply_lora_to_mlp=False", "model.apply_lora_to_output=False",
    "model.lora_rank=8", "model.lora_alpha=16", "optimizer.lr=1e-3",
]


def _data_stage(chain: Chain) -> tuple[StageRecord, DemoData]:
    def body(out: Path, rec: StageRecord) -> None:
        _, counts = prepare_data(out)
        rec.info.update(counts)

    rec = chain.stage("data", "Offline data from installed packages", body)
    return rec, DemoData.at(chain.run_dir / "data")


def _init_stage(chain: Chain) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        model = out / "model"
        run_logged([sys.executable, "-m", "tools.make_tiny_model", "--out", str(model), "--preset", "mini",
                    "--dtype", "float32", "--seed", "0"], out / "stdout.log", rec)
        rec.outputs["checkpoint"] = str(model)

    return chain.stage("init", "Random-init mini Llama 3 (hidden 64, 2 layers, vocab 128,256)", body)


def _training_stage(chain: Chain, name: str, what: str, recipe: str, config: str, src: Path,
                    overrides: list[str], *, nproc: int | None, dataset: list | None = None) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        cfg = derived_config(config, out, dataset=dataset) if dataset is not None else config
        cmd = tune_cpu(recipe, cfg, [f"output_dir={out}", *checkpoint_overrides(src), *MINI_MODEL, *overrides], nproc=nproc)
        run_logged(cmd, out / "stdout.log", rec)
        rec.outputs["checkpoint"] = str(final_epoch(out))
        rec.info["losses"] = logged_losses(out)

    return chain.stage(name, what, body)


def _chat_vector_stage(chain: Chain, base: Path, instruct: Path, target: Path) -> StageRecord:
    def body(out: Path, rec: StageRecord) -> None:
        model = out / "model"
        run_logged([sys.executable, "-m", "tools.chat_vector", "--base", str(base), "--instruct", str(instruct),
                    "--target", str(target), "--out", str(model), "--quiet"], out / "stdout.log", rec)
        rec.outputs["checkpoint"] = str(model)

    return chain.stage("chat_vector", "stage 1 + (instruct - base)", body)


def train_all(chain: Chain) -> tuple[dict[str, StageRecord], DemoData]:
    """Runs (or reuses) every training stage; returns the records by stage name."""
    stages: dict[str, StageRecord] = {}
    stages["data"], data = _data_stage(chain)
    stages["init"] = _init_stage(chain)
    ckpt = lambda name: Path(stages[name].outputs["checkpoint"])  # noqa: E731
    stages["base"] = _training_stage(
        chain, "base", "Stage 0a: pretrain the English base from scratch on pydoc prose",
        "full_finetune_single_device", "stage0_pretrain_en_full.yaml", ckpt("init"),
        [f"dataset.data_files={data.en_train}", f"max_steps_per_epoch={PRETRAIN_STEPS}", "optimizer.lr=1e-2"],
        nproc=None)
    stages["instruct"] = _training_stage(
        chain, "instruct", "Stage 0b: tune a copy of the base on English Q/A (chat format)",
        "full_finetune_single_device", "stage0_instruct_en_full.yaml", ckpt("base"),
        [f"dataset.data_files={data.en_qa_train}", f"epochs={INSTRUCT_EPOCHS}", "batch_size=2", "optimizer.lr=3e-3"],
        nproc=None)
    stages["stage1"] = _training_stage(
        chain, "stage1", "Stage 1: LoRA continued pretraining of the base on Korean",
        "lora_finetune_distributed", "stage1_kowiki_lora.yaml", ckpt("base"),
        [f"dataset.data_files={data.ko_train}", f"max_steps_per_epoch={STAGE1_STEPS}", *METHOD_LORA],
        nproc=2)
    stages["chat_vector"] = _chat_vector_stage(chain, ckpt("base"), ckpt("instruct"), ckpt("stage1"))
    stages["stage3"] = _training_stage(
        chain, "stage3", "Stage 3: LoRA instruction tuning on KoLIMA + BiLIMA (en_ko, ko_en)",
        "lora_finetune_distributed", "stage3_kolima_bilima_lora.yaml", ckpt("chat_vector"),
        [f"epochs={STAGE3_EPOCHS}", *METHOD_LORA], nproc=2, dataset=[
            {"_component_": "kobllla.datasets.kolima_dataset", "source": "json",
             "data_files": str(data.kolima_train), "packed": True},
            *({"_component_": "kobllla.datasets.bilima_dataset", "mode": mode, "source": "json",
               "data_files": str(data.bilima), "packed": True} for mode in ("en_ko", "ko_en")),
        ])
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


def run_demo(run_dir: Path, *, force: bool = False) -> DemoResult:
    """Runs every stage (reusing finished ones unless ``force``), evaluates, writes the report.

    Args:
        run_dir (Path): where every stage's output, the evaluation and the report go.
        force (bool): redo every stage even if its output is complete.

    Returns:
        DemoResult: the report's path, the method's checks, the gate, the scores.

    Raises:
        StageFailed: a stage's command failed (the message names its log).
    """
    from kobllla.demo._evaluate import evaluate_models, gate, method_checks
    from kobllla.demo._report import write_report

    run_dir = Path(run_dir).resolve()
    t0 = time.perf_counter()
    chain = Chain(run_dir, force=force)
    stages, data = train_all(chain)
    checkpoints = {name: Path(stages[name].outputs["checkpoint"]) for name in ("base", "instruct", "stage1", "chat_vector", "stage3")}
    stages["eval"] = evaluate_models(chain, checkpoints, data)
    scores = {label: stages["eval"].info[label] for label in checkpoints}
    checks = method_checks(scores)
    gate_passed, gate_lines = gate(run_dir, run_dir / "report" / "gate")
    total_s = time.perf_counter() - t0
    report = write_report(run_dir / "report", stages, scores, checks, gate_passed, gate_lines, total_s)
    write_json(run_dir / "report" / "summary.json", {
        "checks": [asdict(c) for c in checks], "gate_passed": gate_passed, "gate": gate_lines,
        "scores": scores, "total_s": round(total_s, 1), "stages": stage_summary(stages),
    })
    return DemoResult(report=report, checks=checks, gate_passed=gate_passed, scores=scores, total_s=total_s)
