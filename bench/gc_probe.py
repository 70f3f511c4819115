"""Runs a Python module as ``python -m`` would, with every pass of CPython's cyclic collector timed.

    python bench/gc_probe.py OUT.json MODULE [ARGS...]
    e.g. python bench/gc_probe.py /tmp/gc.json torchtune._cli.tune run lora_finetune_single_device --config c.yaml

At exit writes ``OUT.json``: the Python version and, per pass, ``[generation, wall start (time.time()), seconds,
objects collected]``. ``bench/train_gpu.py`` runs each recipe under it and charges the passes to the steps
they fell in (``gc_by_step``), to tell a slow step's stall from the GPU's own clock swings.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time


def install(out_path: str) -> list[list]:
    """Times every collection from now on; the list of passes is written to ``out_path`` at exit."""
    passes: list[list] = []
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.time(), time.perf_counter()]
        elif started:
            passes.append([info["generation"], started[0], time.perf_counter() - started[1], info["collected"]])

    def write() -> None:
        tmp = f"{out_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"python": sys.version, "frozen_at_exit": gc.get_freeze_count(), "passes": passes}, f)
        os.replace(tmp, out_path)

    gc.callbacks.append(callback)
    atexit.register(write)
    return passes


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python bench/gc_probe.py OUT.json MODULE [ARGS...]")
    out, module, *rest = argv
    install(out)
    sys.argv = [module, *rest]
    if not sys.flags.safe_path:  # as `python -m` has it: the working directory first, not this script's
        sys.path[0] = os.getcwd()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
