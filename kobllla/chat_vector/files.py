"""The files beside the weights: config, tokenizer and generation files (which input each
comes from), and the manifest's description of inputs and versions."""

from __future__ import annotations

import shutil
from pathlib import Path

from kobllla.atomic import write_json
from kobllla.checkpoint_io import Checkpoint, SequentialHasher
from kobllla.jsonl import read_json
from kobllla.versions import package_versions

MANIFEST_NAME = "kobllla_manifest.json"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "added_tokens.json",
                    "original/tokenizer.model")


def copy_model_files(out: Path, *, target: Path, chat: Path, out_dtype: str | None,
                     vocab_rows: int | None) -> dict[str, str]:
    """Writes config/generation/tokenizer files; returns ``{file: where it came from}``.

    The vocabulary (tokenizer.json, tokenizer.model) comes from the target, whose embedding
    rows it indexes; what makes a chat model (chat template, eos ``<|eot_id|>``, generation
    settings) comes from ``chat`` (the instruct model, or a saved vector that carries its files).
    """
    sources: dict[str, str] = {}
    first_choice = [(rel, ("target", target), ("instruct", chat)) for rel in _TOKENIZER_FILES]
    first_choice += [(rel, ("instruct", chat), ("target", target))
                     for rel in ("generation_config.json", "chat_template.jinja")]
    for rel, *candidates in first_choice:
        for label, root in candidates:
            if (root / rel).is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, out / rel)
                sources[rel] = label
                break
    sources.update(_write_config(out, target=target, chat=chat, out_dtype=out_dtype, vocab_rows=vocab_rows))
    for rel in ("tokenizer_config.json", "special_tokens_map.json"):
        merged = _merge_tokenizer_json(target / rel, chat / rel)
        if merged is not None:
            write_json(out / rel, merged[0])
            sources[rel] = merged[1]
    return sources


def _write_config(out: Path, *, target: Path, chat: Path, out_dtype: str | None,
                  vocab_rows: int | None) -> dict[str, str]:
    tcfg, ccfg = read_json(target / "config.json"), read_json(chat / "config.json")
    if tcfg is None and ccfg is None:
        return {}
    cfg = dict(tcfg if tcfg is not None else ccfg)
    where = "target" if tcfg is not None else "instruct"
    if ccfg is not None and tcfg is not None:
        for key in ("eos_token_id", "bos_token_id"):
            if key in ccfg:
                cfg[key] = ccfg[key]
        where += " (eos_token_id, bos_token_id from instruct)"
    if vocab_rows is not None and cfg.get("vocab_size") != vocab_rows:
        cfg["vocab_size"] = vocab_rows
        where += f" (vocab_size set to the target's {vocab_rows} rows)"
    if out_dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = out_dtype
    write_json(out / "config.json", cfg)
    return {"config.json": where}


def _merge_tokenizer_json(target_file: Path, chat_file: Path) -> tuple[dict, str] | None:
    tdata, cdata = read_json(target_file), read_json(chat_file)
    if tdata is None:
        return (cdata, "instruct") if cdata is not None else None
    if cdata is None:
        return tdata, "target"
    taken = [k for k in ("chat_template", "eos_token") if k in cdata]
    return {**tdata, **{k: cdata[k] for k in taken}}, f"target ({', '.join(taken)} from instruct)"


def describe_input(ckpt: Checkpoint, *, hashes: dict[Path, SequentialHasher] | None) -> dict:
    files = []
    for f in ckpt.files:
        entry = {"file": f.name, "bytes": f.stat().st_size}
        if hashes is not None:
            entry["sha256"] = hashes[f].finish()
        files.append(entry)
    return {"path": str(ckpt.path.resolve()), "format": ckpt.format, "tensors": len(ckpt.tensors),
            "files": files}


def versions() -> dict[str, str]:
    return package_versions("kobllla", "numpy", "torch", "safetensors", "python")


def copy_chat_files(out: Path, instruct: Path) -> dict[str, str]:
    copied = {}
    for rel in ("config.json", "params.json", "generation_config.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja") + _TOKENIZER_FILES:
        if (instruct / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(instruct / rel, out / rel)
            copied[rel] = "instruct"
    return copied


def is_saved_vector(path: Path) -> bool:
    manifest = Path(path) / MANIFEST_NAME
    return manifest.is_file() and (read_json(manifest) or {}).get("operation") == "extract"
