"""The whole KoBLLa method on a mini model, offline, on CPU: each stage a real tool run.

Stages (each a directory of the run dir, skipped on a rerun once its marker
``kobllla_stage.json`` exists; a stage killed midway has no marker and starts over):

    data        English/Korean text, Q/A pairs, KoLIMA/BiLIMA rows, TruthfulQA-format questions
    init        random-init mini Llama 3 (real 128,256-token vocabulary)
    base        stage 0a: full pretraining on English prose  (full_finetune_single_device)
    instruct    stage 0b: full tuning of base on English Q/A (full_finetune_single_device)
    stage1      LoRA continued pretraining of base on Korean (lora_finetune_distributed, 2 ranks)
    chat_vector stage1 + (instruct - base)                   (tools.chat_vector)
    stage3      LoRA instruction tuning on KoLIMA + BiLIMA   (lora_finetune_single_device)
    eval        held-out perplexity (ko, en), TruthfulQA-format MC2, Q/A answer loss, the gate
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kobllla.atomic import write_json

MARKER = "kobllla_stage.json"


@dataclass
class StageRecord:
    """What a stage did: for the report and for skipping it on a rerun."""

    name: str
    what: str
    commands: list[list[str]] = field(default_factory=list)
    wall_s: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    reused: bool = False


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names its log."""


class Chain:
    """Stages in order: once one runs, every later stage runs again (its inputs changed)."""

    def __init__(self, run_dir: Path, *, force: bool, config_dir: Path) -> None:
        self.run_dir = run_dir
        self.force = force
        self.config_dir = config_dir

    def stage(self, name: str, what: str, body: Callable[[Path, StageRecord], None]) -> StageRecord:
        record = run_stage(self.run_dir, name, what, body, force=self.force)
        self.force = self.force or not record.reused
        return record


def run_stage(run_dir: Path, name: str, what: str, body: Callable[[Path, StageRecord], None], *,
              force: bool) -> StageRecord:
    """Runs ``body(out_dir, record)`` unless a finished output exists; writes the marker last."""
    out = run_dir / name
    marker = out / MARKER
    if marker.is_file() and not force:
        record = StageRecord(**json.loads(marker.read_text(encoding="utf-8")))
        record.reused = True
        return record
    if out.exists():  # forced, or left by a killed run: start the stage over
        shutil.rmtree(out)
    out.mkdir(parents=True)
    record = StageRecord(name=name, what=what)
    t0 = time.perf_counter()
    body(out, record)
    record.wall_s = round(time.perf_counter() - t0, 1)
    write_json(marker, asdict(record))
    return record


def run_logged(cmd: list[str], log: Path, record: StageRecord) -> None:
    """Runs a command (``python -m tools.X``: run from the repository root) logging to ``log``; raises on failure."""
    record.commands.append(cmd)
    with open(log, "w", encoding="utf-8") as handle:
        rc = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise StageFailed(f"{record.name}: {' '.join(cmd[:4])} ... exited {rc}; see {log} ({tail[0][:200]})")


def tune_cpu(recipe: str, config: Path, *, nproc: int | None) -> list[str]:
    """The command line of a stock torchtune recipe on CPU (``python -m tools.tune_cpu``)."""
    cmd = [sys.executable, "-m", "tools.tune_cpu"]
    if nproc:
        cmd += ["--nproc_per_node", str(nproc)]
    return [*cmd, recipe, "--config", str(config)]


def stage_config(config: Path, out: Path, settings: dict[str, object]) -> Path:
    """``config`` with this run's paths and seed set (dotted keys), saved as ``out/config.yaml``.

    Only paths and the seed differ from the shipped YAML: every training setting stays the file's.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = out / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def final_epoch(out: Path) -> Path:
    """The last ``epoch_N`` directory a recipe wrote."""
    epochs = sorted(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    if not epochs:
        raise StageFailed(f"{out}: the recipe wrote no epoch_N directory")
    return epochs[-1]


def checkpoint_settings(src: Path) -> dict[str, object]:
    """Config settings that start a recipe from the HF checkpoint in ``src``."""
    files = sorted(p.name for p in src.glob("*.safetensors") if not p.name.startswith("adapter"))
    return {
        "checkpointer.checkpoint_dir": str(src), "checkpointer.checkpoint_files": files,
        "tokenizer.path": str(src / "original" / "tokenizer.model"),
    }


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from torchtune's DiskLogger files of a training stage."""
    steps = {}
    for f in sorted((out / "logs").glob("*.txt")):
        for m in re.finditer(r"Step (\d+) \| loss:([0-9.eE+-]+)", f.read_text(encoding="utf-8")):
            steps[int(m.group(1))] = float(m.group(2))
    return sorted(steps.items())
