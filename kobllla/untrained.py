"""Untrained rows of the chat tokens: find them before a chat stage trains or a model is exported.

Llama 3 *base* never saw ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (nor the reserved
tokens): their ``embed_tokens`` / ``lm_head`` rows are near zero, and tuning the base directly on chat data
gives NaNs or garbage (unsloth#658, #915). Meta's Instruct trained those rows, so the chat-vector model
(``target + instruct - base``) carries them. A row is reported when

- its L2 norm is below ``ZERO_RATIO`` (1e-3) x the median row norm of its matrix (near zero), or
- it is within ``ZERO_RATIO`` x median of another checked token's row (near identical), unless both sit at
  the mean of the trained rows (the state ``fix_untrained_mean`` leaves, as axolotl's
  ``fix_untrained_tokens`` does: training then tells them apart).

``fix_untrained_mean`` writes a copy whose reported rows are the mean of the trained rows (all rows not
near zero). Matrices are read one at a time; norms are computed in 8,192-row fp32 slices.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kobllla.atomic import atomic_output_dir, refuse_output_over_inputs
from kobllla.checkpoint_io import open_checkpoint

CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_IDS = {"<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
ROW_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")
ZERO_RATIO = 1e-3
_SLICE = 8192


@dataclass(frozen=True)
class UntrainedRow:
    """One suspicious row: matrix, token id and name, why, its norm and the matrix's median row norm."""

    matrix: str
    token_id: int
    token: str
    reason: str  # "near zero" or "near identical to <token>"
    norm: float
    median: float

    def describe(self) -> str:
        return (f"{self.matrix} row {self.token_id} {self.token}: {self.reason} "
                f"(norm {self.norm:.3g}, median row norm {self.median:.3g})")


def token_names(model_dir: Path) -> dict[str, int]:
    """Added-token name -> id from ``tokenizer.json`` (Llama 3's chat token ids when the file is missing)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return dict(_LLAMA3_IDS)
    tok = json.loads(path.read_text(encoding="utf-8"))
    return {t["content"]: int(t["id"]) for t in tok.get("added_tokens", []) if "content" in t and "id" in t}


def chat_token_ids(model_dir: Path, names: tuple[str, ...] | list[str] = CHAT_TOKENS) -> dict[int, str]:
    """Ids of the named tokens in the model's tokenizer.

    Raises:
        ValueError: a name the tokenizer does not have.
    """
    known = token_names(model_dir)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{model_dir}: tokenizer has no token {missing[0]!r}; name added tokens such as "
                         f"{', '.join(CHAT_TOKENS)}")
    return {known[n]: n for n in names}


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w[i:i + _SLICE].float().norm(dim=1) for i in range(0, w.shape[0], _SLICE)])


def _trained_mean(w: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    for i in range(0, w.shape[0], _SLICE):
        total += w[i:i + _SLICE][trained[i:i + _SLICE]].double().sum(dim=0)
    return (total / trained.sum()).float()


def _matrix_problems(name: str, w: torch.Tensor, ids: dict[int, str]) -> tuple[list[UntrainedRow], torch.Tensor]:
    """Suspicious rows of one matrix, and the mean of its trained rows."""
    norms = _row_norms(w)
    median = float(norms.median())
    tol = ZERO_RATIO * median
    trained = norms >= tol
    mean = _trained_mean(w, trained)
    out, checked = [], []
    for tid, tok in ids.items():
        if tid >= w.shape[0]:
            raise ValueError(f"{name}: token {tok} has id {tid} but the matrix has {w.shape[0]} rows; "
                             "the tokenizer does not belong to these weights")
        if norms[tid] < tol:
            out.append(UntrainedRow(name, tid, tok, "near zero", float(norms[tid]), median))
        else:
            checked.append(tid)
    twins: dict[int, int] = {}
    for i, a in enumerate(checked):
        row_a = w[a].float()
        if float((row_a - mean).norm()) < tol:  # at the trained mean: what the fix leaves
            continue
        for b in checked[i + 1:]:
            if float((row_a - w[b].float()).norm()) < tol:
                twins.setdefault(a, b)
                twins.setdefault(b, a)
    for tid in sorted(twins):
        out.append(UntrainedRow(name, tid, ids[tid], f"near identical to {ids[twins[tid]]}", float(norms[tid]),
                                median))
    return out, mean


def find_untrained_rows(model_dir: Path, token_ids: dict[int, str] | None = None) -> list[UntrainedRow]:
    """Suspicious ``embed_tokens`` / ``lm_head`` rows of the given tokens (default: the chat tokens)."""
    ids = token_ids if token_ids is not None else chat_token_ids(model_dir)
    found = []
    with open_checkpoint(Path(model_dir)) as ckpt:
        for name in ROW_MATRICES:
            if name in ckpt.tensors:
                found += _matrix_problems(name, ckpt.read_tensor(name), ids)[0]
    return found


def untrained_token_problems(model_dir: Path, token_ids: list[int] | None = None) -> list[str]:
    """One line per untrained row of the chat tokens (or of ``token_ids``); empty when all are trained.

    For the GGUF exporter and ``tools.check_model``; ``model_dir`` must hold full weights
    (:func:`kobllla.model_dir.resolve_model_dir` first for an adapter-only ``epoch_N/``).
    """
    ids = None
    if token_ids is not None:
        names = {v: k for k, v in token_names(model_dir).items()}
        ids = {int(t): names.get(int(t), f"<id {t}>") for t in token_ids}
    return [row.describe() for row in find_untrained_rows(model_dir, ids)]


def check_chat_model(model_dir: Path, token_ids: dict[int, str] | None = None) -> tuple[list[str], list[UntrainedRow]]:
    """``(stop-token problems, untrained chat-token rows)`` of a full-weights model dir; both empty when fine."""
    from kobllla.chat_format import chat_stop_token_problems

    return chat_stop_token_problems(Path(model_dir)), find_untrained_rows(Path(model_dir), token_ids)


def refusal(model_dir: Path, rows: list[UntrainedRow]) -> str:
    """The one-line refusal naming the tokens and both fixes."""
    tokens = ", ".join(dict.fromkeys(r.token for r in rows))
    where = ", ".join(dict.fromkeys(r.matrix.split(".")[-2] for r in rows))
    return (f"{model_dir}: untrained rows for {tokens} ({where}: {rows[0].reason}, norm {rows[0].norm:.3g} vs "
            f"median {rows[0].median:.3g}); chat-format tuning from here gives NaNs or garbage: start from the "
            "chat-vector model (python -m tools.chat_vector), or write a fixed copy with "
            f"python -m tools.check_model {model_dir} --fix-untrained mean --out NEWDIR")


@dataclass(frozen=True)
class FixedCopy:
    """What :func:`write_fixed_copy` changed."""

    out: Path
    rows: list[UntrainedRow]  # rows set to the trained mean
    stop_files: list[str]  # files given Meta's Instruct stop settings


def _planned_row_edits(ckpt, ids: dict[int, str]) -> tuple[dict, list[UntrainedRow]]:
    edits: dict[Path, dict[str, tuple[list[int], torch.Tensor]]] = {}
    rows_all: list[UntrainedRow] = []
    for name in ROW_MATRICES:
        if name in ckpt.tensors:
            rows, mean = _matrix_problems(name, ckpt.read_tensor(name), ids)
            if rows:
                edits.setdefault(ckpt.tensors[name].file, {})[name] = (sorted({r.token_id for r in rows}), mean)
                rows_all += rows
    return edits, rows_all


def write_fixed_copy(model_dir: Path, out: Path, *, untrained: bool, stop_tokens: bool,
                     token_ids: dict[int, str] | None = None, overwrite: bool = False) -> FixedCopy:
    """Writes a fixed copy of ``model_dir`` at ``out`` (built aside, renamed when whole; the input is untouched).

    ``untrained``: the untrained chat-token rows become the mean of the trained rows (only the safetensors
    files holding ``embed_tokens`` / ``lm_head`` are rewritten). ``stop_tokens``: Meta's Instruct stop
    settings (:func:`kobllla.chat_format.write_chat_stop_tokens`). Every other file is copied byte for byte,
    except ``kobllla_manifest.json`` (its hashes no longer hold); ``kobllla_fixed.json`` says what changed.
    """
    from safetensors.torch import load_file, save_file

    from kobllla.atomic import write_json
    from kobllla.chat_format import write_chat_stop_tokens

    model_dir, out = Path(model_dir), Path(out)
    refuse_output_over_inputs(out, [model_dir])
    ids = token_ids if token_ids is not None else chat_token_ids(model_dir)
    with open_checkpoint(model_dir) as ckpt:
        edits, rows = _planned_row_edits(ckpt, ids) if untrained else ({}, [])
        if edits and ckpt.format != "safetensors":
            raise ValueError(f"{model_dir}: --fix-untrained rewrites safetensors checkpoints only; this one is "
                             f"{ckpt.format}: convert it first")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for path in sorted(model_dir.rglob("*")):
            rel = path.relative_to(model_dir)
            if path.is_dir() or rel.parts[0].startswith(".") or path in edits or rel.name == "kobllla_manifest.json":
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, tmp / rel)
        for file, changes in edits.items():
            tensors = load_file(str(file))
            for name, (ids_, mean) in changes.items():
                tensors[name][ids_] = mean.to(tensors[name].dtype)
            save_file(tensors, str(tmp / file.relative_to(model_dir)), metadata={"format": "pt"})
        stop_files = write_chat_stop_tokens(tmp) if stop_tokens else []
        write_json(tmp / "kobllla_fixed.json", {
            "source": str(model_dir.resolve()), "made_by": "kobllla.untrained.write_fixed_copy",
            "rows_set_to_trained_mean": [r.describe() for r in rows], "stop_token_files": stop_files,
        })
    return FixedCopy(out=out, rows=rows, stop_files=stop_files)


def fix_untrained_mean(model_dir: Path, out: Path, token_ids: dict[int, str] | None = None,
                       *, overwrite: bool = False) -> list[UntrainedRow]:
    """A copy at ``out`` whose untrained chat-token rows are the trained rows' mean; returns the rows set."""
    return write_fixed_copy(model_dir, out, untrained=True, stop_tokens=False, token_ids=token_ids,
                            overwrite=overwrite).rows
