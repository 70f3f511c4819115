"""Tiny checkpoints: HF layout, the real tokenizer, NF4-friendly sizes, determinism, errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from kobllla.assets import LLAMA3_TOKENIZER_SHA256, llama3_tokenizer_model_path
from kobllla.tiny_model import PRESETS, hf_tensor_shapes, make_model


def test_packaged_tokenizer_is_metas_llama3_file(llama3_tok):
    assert hashlib.sha256(llama3_tokenizer_model_path().read_bytes()).hexdigest() == LLAMA3_TOKENIZER_SHA256
    assert llama3_tok.encode("Hello world", add_eos=False) == [128000, 9906, 1917]


def test_tiny_checkpoint_has_the_hub_layout_and_loads_in_transformers(tiny_base, tiny_instruct):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "original/tokenizer.model", "model.safetensors"):
        assert (tiny_base / name).is_file(), name
    cfg = json.loads((tiny_base / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["tie_word_embeddings"]) == (128256, 256, False)
    hf_tok = AutoTokenizer.from_pretrained(tiny_instruct)
    assert hf_tok("Hello world")["input_ids"] == [128000, 9906, 1917]  # BOS like the hub's tokenizer.json
    assert hf_tok.eos_token == "<|eot_id|>" and AutoTokenizer.from_pretrained(tiny_base).eos_token == "<|end_of_text|>"
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False, add_generation_prompt=True)
    assert chat == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert sum(p.numel() for p in model.parameters()) == PRESETS["tiny"].num_params()


def test_every_linear_weight_is_nf4_quantizable():
    for name, shape in hf_tensor_shapes(PRESETS["tiny"]):
        if "proj" in name:
            assert torch.Size(shape).numel() % 16384 == 0, name


def test_same_seed_gives_identical_weights_and_sharding_splits_them(tmp_path):
    a = make_model(tmp_path / "a", seed=3)
    b = make_model(tmp_path / "b", seed=3, max_shard_bytes=50 * 2**20)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    merged = {k: v for s in shards for k, v in load_file(str(b / s)).items()}
    single = load_file(str(a / "model.safetensors"))
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)


def test_8b_preset_has_metas_parameter_count():
    assert PRESETS["llama3-8b"].num_params() == 8_030_261_248


def test_bad_arguments_and_existing_output_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown preset 'huge'; choose one of \['llama3-8b', 'llama3.2-1b-untied', 'mini', 'tiny'\]"
    ):
        make_model(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match=r"unknown flavor 'chat'"):
        make_model(tmp_path / "x", flavor="chat")
    make_model(tmp_path / "m")
    with pytest.raises(FileExistsError, match=r"m already exists; pick another output or pass --overwrite"):
        make_model(tmp_path / "m")
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from tools.make_tiny_model import main

    assert main(["--out", str(tmp_path / "m"), "--preset", "mini", "--max-shard-gb", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-shard-gb must be above 0, got 0.0\n"
    assert not (tmp_path / "m").exists()
    (tmp_path / "taken").mkdir()
    assert main(["--out", str(tmp_path / "taken"), "--preset", "mini"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'taken'} already exists; pick another output")
    assert list((tmp_path / "taken").iterdir()) == []
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m tools.make_tiny_model --out runs/tiny/base" in capsys.readouterr().out  # examples in --help
