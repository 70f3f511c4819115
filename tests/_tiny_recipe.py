"""The shipped single-device stage-1 config at the tiny shape, run through the real ``tune run`` (test helper)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def tiny_stage1_losses(run: Path, tiny_base: Path, *, model: dict, launcher: list[str] | None = None,
                       steps: int = 4) -> tuple[dict, list[float]]:
    """``(config, losses)`` of ``bench.train_gpu``'s recipe config (the shipped stage-1 config) at the tiny
    shape on the tiny Korean CSV, fp32 on the CPU, uncompiled, with ``model`` keys laid over the config's.

    ``launcher``: what runs ``torchtune._cli.tune`` (default ``python -m``); the recipe's arguments follow it.
    """
    sys.path.insert(0, str(ROOT))
    from bench.train_gpu import parse_metric_log, write_recipe_config

    files = sorted(p.name for p in tiny_base.glob("*.safetensors"))
    cfg = write_recipe_config(run / "c.yaml", model_dir=tiny_base, files=files,
                              csv_path=ROOT / "tests/assets/kowiki_tiny.csv", run_dir=run, preset="tiny", seq_len=64,
                              batch_size=2, steps=steps, compile_model=False, device="cpu", dtype="fp32")
    shipped = dict(cfg["model"])
    cfg["model"].update(model)
    (run / "c.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)), encoding="utf-8")
    cmd = [*(launcher or [sys.executable, "-m", "torchtune._cli.tune"]), "run", "lora_finetune_single_device",
           "--config", str(run / "c.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = parse_metric_log(next((run / "logs").glob("log_*.txt")).read_text(encoding="utf-8"))
    return {**cfg, "model": shipped}, [r["loss"] for r in rows if "loss" in r]
