"""Turn any stage's output into a directory that transformers and llama.cpp's converter load.

Full weights load as they are: a Hugging Face dir, torchtune's ``epoch_N/`` (merged weights + index,
config and tokenizer files copied from the checkpoint dir), a chat-vector output. An adapter-only
``epoch_N/`` (``save_adapter_weights_only: True``: ``adapter_model.safetensors`` + ``adapter_config.json``,
PEFT names, HF row order) is merged into its base here, as torchtune merges at save time::

    W' = W + (lora_alpha / r) * B @ A        # fp32 math, rounded once to the base tensor's dtype

and written as an HF dir (sharded safetensors + the config/tokenizer files of the adapter dir, the base's
where the adapter dir lacks one).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from kobllla.atomic import atomic_output_dir
from kobllla.checkpoint_io import INDEX_NAME, ShardedSafetensorsWriter, open_checkpoint

WEIGHT_FILES = ("model.safetensors", INDEX_NAME, "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MERGED_MARK = "kobllla_merged_adapter.json"


def has_full_weights(model: Path) -> bool:
    """Whether ``model`` holds a whole model's weights (not only a LoRA adapter)."""
    model = Path(model)
    if any((model / name).is_file() for name in WEIGHT_FILES):
        return True
    return any(model.glob("model-*-of-*.safetensors")) or any(model.glob("model-*-of-*.bin"))


def adapter_weights_file(model: Path) -> Path | None:
    """The PEFT adapter weights torchtune wrote into ``model``, if any."""
    for name in ADAPTER_WEIGHTS:
        if (Path(model) / name).is_file():
            return Path(model) / name
    return None


def check_weight_headers(model: Path) -> None:
    """Reads the header of every safetensors weight file of ``model`` (no tensor data): a 0-byte,
    truncated or padded file is refused here, before transformers raises ``SafetensorError``.

    Raises:
        ValueError: one line naming the file and the fix (from ``read_safetensors_header``).
    """
    from kobllla.checkpoint_io import read_safetensors_header

    model = Path(model)
    files = sorted({*model.glob("model.safetensors"), *model.glob("model-*-of-*.safetensors")})
    for path in files:
        read_safetensors_header(path)


def check_loadable_files(model: Path, *, role: str = "model") -> None:
    """Refuses a directory without ``config.json`` or the tokenizer files transformers loads.

    Raises:
        FileNotFoundError: one line naming the directory, the missing file and the fix.
    """
    model = Path(model)
    if not model.is_dir():
        what = "is a file; pass the directory that holds it" if model.exists() else "does not exist"
        raise FileNotFoundError(f"{role} {model} {what}")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{role} {model}: no config.json; pass a Hugging Face model dir or a torchtune "
                                "epoch_N/ (torchtune copies config.json from the checkpoint dir)")
    if (model / "tokenizer.json").is_file():
        return
    meta = [p for p in (model / "tokenizer.model", model / "original" / "tokenizer.model") if p.is_file()]
    if meta:
        raise FileNotFoundError(f"{role} {model}: has {meta[0].relative_to(model)} but no tokenizer.json, which "
                                "transformers and llama.cpp's converter read; copy tokenizer.json and "
                                "tokenizer_config.json from the model it was trained from")
    raise FileNotFoundError(f"{role} {model}: no tokenizer files (tokenizer.json or tokenizer.model); copy "
                            "tokenizer.json and tokenizer_config.json from the model it was trained from")


def resolve_model_dir(model: Path, *, base: Path | None = None, scratch: Path | None = None) -> Path:
    """A directory that transformers and llama.cpp's converter load.

    ``model`` itself when it holds full weights (HF dir, torchtune ``epoch_N/`` with merged weights,
    chat-vector output). For an adapter-only torchtune ``epoch_N/`` the LoRA is merged into ``base``'s
    weights (``W + (alpha/r) * B @ A``, fp32 math, base dtype) and written as an HF dir under ``scratch``
    (a new temporary directory if None; the caller removes it), with config and tokenizer files.

    Raises:
        FileNotFoundError: no such directory, no ``config.json``, no tokenizer files, no weights at all.
        ValueError: adapter-only without ``base``, ``base`` with full weights, an adapter config or tensor that
            does not fit the base, a truncated or malformed safetensors weight file.
    """
    model = Path(model)
    if not model.is_dir():
        check_loadable_files(model)  # raises: missing, or a file
    if has_full_weights(model):
        if base is not None:
            raise ValueError(f"--base {base} is given but model {model} holds full weights (no adapter to merge); "
                             "drop --base (it is only for an adapter-only torchtune epoch_N/)")
        check_loadable_files(model)
        check_weight_headers(model)
        return model
    adapter = adapter_weights_file(model)
    if adapter is None or not (model / ADAPTER_CONFIG).is_file():
        if not (model / "config.json").is_file():
            check_loadable_files(model)
        open_checkpoint(model)  # raises the checkpoint reader's one-line "no weights" message
        check_loadable_files(model)
        return model
    if base is None:
        raise ValueError(f"model {model} holds only a LoRA adapter ({adapter.name}, no full weights); pass "
                         "--base DIR, the model it was trained from (the checkpointer's checkpoint_dir)")
    base = Path(base)
    if not has_full_weights(base):
        open_checkpoint(base)
        raise ValueError(f"base {base} holds no full weights; pass the model the adapter was trained from")
    check_loadable_files(base, role="base")
    check_weight_headers(base)
    scratch_dir = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="kobllla-merged-"))
    out = scratch_dir / f"merged-{model.parent.name}-{model.name}"
    merge_adapter(model, base=base, out=out, overwrite=True)
    return out


def read_adapter_config(model: Path) -> tuple[float, list[str]]:
    """``(lora_alpha / r, target_modules)`` from ``adapter_config.json``, checked."""
    path = Path(model) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object (PEFT adapter config)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    for field, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{path}: field {field!r} must be a positive number, got {value!r}")
    if cfg.get("use_dora"):
        raise ValueError(f"{path}: use_dora is true; DoRA adapters are not merged here: save merged weights "
                         "(save_adapter_weights_only: False) and pass that epoch_N/")
    return float(alpha) / float(r), list(cfg.get("target_modules") or [])


def _adapter_pairs(adapter: Path, base_names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base tensor name -> (A, B) from a PEFT adapter file, every name checked against the base."""
    if adapter.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(adapter))
    else:
        tensors = torch.load(adapter, map_location="cpu", weights_only=True)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                target = name.replace(f".{part}.weight", ".weight")
                pairs.setdefault(target, {})[part] = value
                break
        else:
            raise ValueError(f"{adapter}: tensor {key} is not a LoRA A/B matrix (DoRA magnitude or an unknown "
                             "adapter); only plain LoRA adapters are merged")
    out = {}
    for target, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{adapter}: {target} has {sorted(ab)} but needs both lora_A and lora_B")
        if target not in base_names:
            raise ValueError(f"{adapter}: adapts {target}, which the base does not have; pass the base model "
                             "the adapter was trained from")
        out[target] = (ab["lora_A"], ab["lora_B"])
    return out


def _merged(name: str, weight: torch.Tensor, ab: tuple[torch.Tensor, torch.Tensor], scale: float,
            adapter: Path) -> torch.Tensor:
    a, b = ab
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ValueError(f"{adapter}: {name}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} does not match "
                         f"the base tensor {tuple(weight.shape)}; pass the base model the adapter was trained from")
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype)


def merge_adapter(model: Path, *, base: Path, out: Path, overwrite: bool = False) -> Path:
    """Writes ``base`` + the LoRA adapter in ``model`` as an HF dir at ``out`` (atomically)."""
    model, base, out = Path(model), Path(base), Path(out)
    adapter = adapter_weights_file(model)
    scale, _ = read_adapter_config(model)
    with open_checkpoint(base) as ckpt, atomic_output_dir(out, overwrite=overwrite) as tmp:
        pairs = _adapter_pairs(adapter, set(ckpt.tensors))
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=2 * 2**30)
        for name in ckpt.tensors:
            tensor = ckpt.read_tensor(name)
            if name in pairs:
                tensor = _merged(name, tensor, pairs[name], scale, adapter)
            writer.add(name, tensor)
        writer.close()
        _copy_side_files(model, tmp)
        _copy_side_files(base, tmp)
        (tmp / MERGED_MARK).write_text(json.dumps({
            "adapter_dir": str(model.resolve()), "base": str(base.resolve()), "scale": scale,
            "merged_tensors": sorted(pairs),
        }, indent=2) + "\n", encoding="utf-8")
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copies config/tokenizer/other non-weight files of ``src`` that ``dst`` does not have yet."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if (not path.is_file() or rel.parts[0].startswith(".") or path.suffix in _WEIGHT_SUFFIXES
                or path.name in (INDEX_NAME, ADAPTER_CONFIG, "pytorch_model.bin.index.json", MERGED_MARK)
                or path.name.startswith("kobllla_manifest")):
            continue
        target = dst / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
