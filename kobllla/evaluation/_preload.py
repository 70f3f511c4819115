"""Weights read onto the device in a background thread while lm_eval and transformers import.

An 8B run of ``eval.run --scorer shared_prefix`` spent ~10 s importing lm_eval's HF model and
transformers and then ~5 s in ``from_pretrained`` (16 GB from the page cache to CPU tensors, then
to the GPU). Here the safetensors files are loaded straight onto the device by a thread started
before those imports, and ``from_pretrained(state_dict=...)`` builds the model from the tensors
already there. Same weights, same model class and config: the scores equal the plain load's
(``tests/test_eval_preload.py``). ``KOBLLLA_PRELOAD=0`` turns it off. No lm_eval, no transformers
here, so that it can start first.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kobllla.checkpoint_io import INDEX_NAME

log = logging.getLogger(__name__)


def start_preload(model_dir: Path, device: str) -> Future | None:
    """Starts loading the safetensors weights that ``from_pretrained`` would load from ``model_dir``
    onto ``device``; the future's result is the merged state dict (HF tensor names), or None when
    there is nothing to preload (no safetensors weights, or ``KOBLLLA_PRELOAD=0``)."""
    weights = model_weight_files(Path(model_dir))
    if not weights or os.environ.get("KOBLLLA_PRELOAD", "1") == "0":  # 0: load as lm_eval does (to measure)
        return None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kobllla-preload")
    future = pool.submit(_load, weights, device)
    pool.shutdown(wait=False)
    return future


def model_weight_files(model_dir: Path) -> list[Path]:
    """``model.safetensors``, else the files of the index's weight map, as transformers picks them;
    never a torchtune epoch dir's ``adapter_model.safetensors`` beside them."""
    single, index = model_dir / "model.safetensors", model_dir / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return []


def _load(files: list[Path], device: str) -> dict:
    import torch
    from safetensors.torch import load_file

    state: dict = {}
    for f in files:
        state.update(load_file(str(f), device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return state


def preloaded_state(future: Future | None) -> dict | None:
    """The preloaded state dict, or None (nothing preloaded, or the preload failed: then the model
    loads the usual way, and the reason is logged)."""
    if future is None:
        return None
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - any failure falls back to from_pretrained's own load
        log.warning("preloading the weights failed (%s: %s); loading them the usual way", type(exc).__name__, exc)
        return None
