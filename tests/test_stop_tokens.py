"""Every chat model the project writes stops at <|eot_id|>: each shipped path, read back by transformers.

Meta's Instruct settings are tokenizer eos ``<|eot_id|>`` and ``generation_config.json`` eos
``[128001, 128009]``. Paths: the chat-vector output (even when the instruct checkpoint said
``<|end_of_text|>``, as the demo's instruct stage did before), ``tools.make_tiny_model --flavor instruct``,
a torchtune-written ``epoch_N/`` fixed by ``write_chat_stop_tokens`` (the demo's instruct and stage-3
step) or by ``tools.check_model --fix-stop-tokens`` (the documented step), and stage 3 trained from the
chat-vector model (torchtune's checkpointer copies the checkpoint dir's files into ``epoch_N/``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kobllla.chat_format import CHAT_EOS_IDS, EOT, EOT_ID, chat_stop_token_problems, write_chat_stop_tokens
from kobllla.chat_vector import ChatVectorOptions, merge_chat_vector
from kobllla.tiny_model import make_model
from tests.conftest import REPO


def meta_settings(model_dir: Path) -> tuple[str, list[int]]:
    """(tokenizer eos, generation eos ids) as transformers reads them."""
    from transformers import AutoTokenizer, GenerationConfig

    return AutoTokenizer.from_pretrained(str(model_dir)).eos_token, GenerationConfig.from_pretrained(
        str(model_dir)).eos_token_id


def say_end_of_text(model_dir: Path) -> None:
    """Rewrites a dir's stop settings to the base's <|end_of_text|> (what torchtune keeps from a base)."""
    for rel in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((model_dir / rel).read_text())
        data["eos_token"] = "<|end_of_text|>"
        (model_dir / rel).write_text(json.dumps(data))
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = 128001
    (model_dir / "generation_config.json").write_text(json.dumps(gen))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def torchtune_save(checkpoint_dir: Path, output_dir: Path) -> Path:
    """Loads and saves through torchtune's FullModelHFCheckpointer, as every recipe does; returns epoch_0/."""
    from torchtune.training import FullModelHFCheckpointer

    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type="LLAMA3",
                                   output_dir=str(output_dir))
    ckpt.save_checkpoint(ckpt.load_checkpoint(), epoch=0)
    return output_dir / "epoch_0"


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stop")
    base = make_model(root / "base", preset="mini", seed=0, dtype="float32")
    instruct = make_model(root / "instruct", preset="mini", flavor="instruct", seed=1, dtype="float32")
    say_end_of_text(instruct)  # the demo's instruct model said <|end_of_text|> before issue 10
    chatvec = root / "chatvec"
    merge_chat_vector(base=base, instruct=instruct, target=base, out=chatvec,
                      options=ChatVectorOptions(hash_files=False))
    return {"root": root, "base": base, "instruct": instruct, "chatvec": chatvec}


def test_chat_vector_output_gets_eot_even_when_the_instruct_checkpoint_said_end_of_text(trio):
    assert chat_stop_token_problems(trio["instruct"])
    assert chat_stop_token_problems(trio["chatvec"]) == []
    assert meta_settings(trio["chatvec"]) == (EOT, CHAT_EOS_IDS)
    assert json.loads((trio["chatvec"] / "config.json").read_text())["eos_token_id"] == EOT_ID


def test_make_tiny_model_instruct_flavor_carries_meta_instruct_settings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tools.make_tiny_model", "--out", str(tmp_path / "m"), "--preset",
                           "mini", "--flavor", "instruct"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert chat_stop_token_problems(tmp_path / "m") == []
    assert meta_settings(tmp_path / "m") == (EOT, CHAT_EOS_IDS)


def test_stage3_trained_from_the_chat_vector_model_inherits_its_stop_settings(trio):
    epoch = torchtune_save(trio["chatvec"], trio["root"] / "stage3-out")
    for rel in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json"):
        assert (epoch / rel).read_bytes() == (trio["chatvec"] / rel).read_bytes(), rel
    assert chat_stop_token_problems(epoch) == []
    assert meta_settings(epoch) == (EOT, CHAT_EOS_IDS)


def test_torchtune_epoch_from_a_base_model_is_fixed_in_place_by_the_library_step(trio):
    """The demo's instruct (and stage-3) stage: torchtune wrote the base's eos; write_chat_stop_tokens fixes it."""
    epoch = torchtune_save(trio["base"], trio["root"] / "instruct-out")
    assert chat_stop_token_problems(epoch) == [
        "tokenizer_config.json eos_token is '<|end_of_text|>', not '<|eot_id|>'",
        "generation_config.json eos_token_id is 128001, not [128001, 128009]",
    ]
    assert sorted(write_chat_stop_tokens(epoch)) == ["config.json", "generation_config.json",
                                                     "special_tokens_map.json", "tokenizer_config.json"]
    assert chat_stop_token_problems(epoch) == [] and meta_settings(epoch) == (EOT, CHAT_EOS_IDS)


def test_check_model_reports_and_fix_stop_tokens_writes_a_fixed_copy_leaving_the_input(trio):
    epoch = torchtune_save(trio["base"], trio["root"] / "from-base-out")
    before = tree_digest(epoch)
    cmd = [sys.executable, "-m", "tools.check_model", str(epoch)]
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"error: {epoch}: stop tokens: tokenizer_config.json eos_token is '<|end_of_text|>', not '<|eot_id|>'; "
        "generation_config.json eos_token_id is 128001, not [128001, 128009]; llama.cpp and vLLM would not stop at "
        f"a turn's end: write a fixed copy with python -m tools.check_model {epoch} --fix-stop-tokens --out NEWDIR"]
    fixed = trio["root"] / "fixed"
    done = subprocess.run([*cmd, "--fix-stop-tokens", "--out", str(fixed)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"ok: {fixed}" in done.stdout
    assert tree_digest(epoch) == before
    assert meta_settings(fixed) == (EOT, CHAT_EOS_IDS)
    digest = tree_digest(fixed)
    for name in ("model-00001-of-00001.safetensors", "tokenizer.json", "original/tokenizer.model"):
        assert digest[name] == before[name]
    again = subprocess.run([*cmd, "--fix-stop-tokens", "--out", str(fixed)], cwd=REPO, capture_output=True,
                           text=True, timeout=180)
    assert again.returncode == 2 and "already exists" in again.stderr
