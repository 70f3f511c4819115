"""Llama 3 chat settings: the tokens a chat model must stop at, and the files that carry them.

Meta's Llama-3-8B-Instruct ends every turn with ``<|eot_id|>`` (128009) and ships
``tokenizer_config.json`` eos ``<|eot_id|>``, ``config.json`` ``eos_token_id`` 128009 and
``generation_config.json`` ``eos_token_id`` ``[128001, 128009]``. A fine-tuned model that keeps the
base's eos ``<|end_of_text|>`` (128001) never stops in llama.cpp or vLLM, which stop at the eos
only (unsloth#416, llama-cookbook#640). Every chat model kobllla writes gets Meta's settings
through :func:`write_chat_stop_tokens`; :func:`chat_stop_token_problems` says what a directory
lacks. Torch-free (text tools import it).
"""

from __future__ import annotations

from pathlib import Path

from kobllla.atomic import write_json
from kobllla.jsonl import read_json

BOS_ID = 128000
END_OF_TEXT_ID = 128001
EOT_ID = 128009
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
# Generation stops at either, whatever a checkpoint's eos says.
STOP_TOKENS = (EOT, END_OF_TEXT)
CHAT_EOS_IDS = [END_OF_TEXT_ID, EOT_ID]

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def stop_token_ids(model_dir: Path) -> list[int]:
    """Ids of ``<|eot_id|>`` and ``<|end_of_text|>`` in the directory's ``tokenizer.json``.

    Falls back to Llama 3's ids (128009, 128001) when the file does not name them.
    """
    tok = read_json(Path(model_dir) / "tokenizer.json") or {}
    ids = {t.get("content"): t.get("id") for t in tok.get("added_tokens", [])}
    default = {EOT: EOT_ID, END_OF_TEXT: END_OF_TEXT_ID}
    return [int(ids.get(name, default[name])) for name in STOP_TOKENS]


def write_chat_stop_tokens(model_dir: Path) -> list[str]:
    """Gives a Llama 3 chat model Meta's Instruct stop settings, in place; returns the files changed.

    Use it on outputs kobllla builds (before they are renamed into place) or, as a documented step,
    on a torchtune ``epoch_N/`` that was trained from a base model. Sets ``tokenizer_config.json``
    and ``special_tokens_map.json`` eos to ``<|eot_id|>``, ``config.json`` ``eos_token_id`` to
    128009 and ``generation_config.json`` ``eos_token_id`` to ``[128001, 128009]`` (created if missing).
    """
    model_dir = Path(model_dir)
    eot_id, eos_id = stop_token_ids(model_dir)
    changed = []
    for rel in ("tokenizer_config.json", "special_tokens_map.json"):
        data = read_json(model_dir / rel)
        if data is not None and data.get("eos_token") != EOT:
            data["eos_token"] = EOT
            write_json(model_dir / rel, data)
            changed.append(rel)
    cfg = read_json(model_dir / "config.json")
    if cfg is not None and cfg.get("eos_token_id") != eot_id:
        cfg["eos_token_id"] = eot_id
        write_json(model_dir / "config.json", cfg)
        changed.append("config.json")
    gen = read_json(model_dir / "generation_config.json")
    want = [eos_id, eot_id]
    if gen is None or gen.get("eos_token_id") != want:
        gen = dict(gen or {"bos_token_id": BOS_ID})
        gen["eos_token_id"] = want
        write_json(model_dir / "generation_config.json", gen)
        changed.append("generation_config.json")
    return changed


def chat_stop_token_problems(model_dir: Path) -> list[str]:
    """What keeps a directory's chat model from stopping at ``<|eot_id|>``; empty when all is right."""
    model_dir = Path(model_dir)
    eot_id, eos_id = stop_token_ids(model_dir)
    problems = []
    tcfg = read_json(model_dir / "tokenizer_config.json")
    if tcfg is not None and tcfg.get("eos_token") != EOT:
        problems.append(f"tokenizer_config.json eos_token is {tcfg.get('eos_token')!r}, not {EOT!r}")
    gen = read_json(model_dir / "generation_config.json")
    gen_eos = None if gen is None else gen.get("eos_token_id")
    gen_ids = set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if gen is None:
        problems.append("no generation_config.json")
    elif not {eos_id, eot_id} <= gen_ids:
        problems.append(f"generation_config.json eos_token_id is {gen_eos!r}, not [{eos_id}, {eot_id}]")
    return problems
