"""GGUF export through llama.cpp's own converter and quantizer, checked against llama.cpp and transformers.

Outside references: gguf-py's ``GGUFReader`` for what the files hold, llama.cpp (llama-cpp-python)
for tokenization and logits, transformers for the logits llama.cpp must reproduce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kobllla.chat_format import EOT_ID
from kobllla.gguf import QUANTS, export_gguf, read_gguf_info
from kobllla.gguf.compare import NextTokenStats, hf_logits, llama_cpp_logits, llama_cpp_tokenize, open_llama
from tools import export_gguf as cli

pytest_plugins = ["tests._gguf_fixtures"]

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "tests" / "assets" / "eval" / "heldout"
MIXED = "서울은 대한민국의 수도이다. Seoul is the capital; 한글은 1443년에 만들어졌다! GGUF ✓ — naïve café 3.14"


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def reader_fields(path: Path) -> dict:
    """gguf-py's own reader: the metadata the tests assert on and every matrix's tensor type."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keys = ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
            "tokenizer.chat_template", "general.file_type")
    out = {k: r.get_field(k).contents() for k in keys}
    out["types"] = {t.name: t.tensor_type.name for t in r.tensors if len(t.shape) >= 2}
    return out


def test_chat_model_gguf_carries_llama_bpe_eot_and_template_per_gguf_reader(mini_export, trained_mini):
    path = mini_export / "mini-trained-q8_0.gguf"
    fields = reader_fields(path)
    template = json.loads((trained_mini / "tokenizer_config.json").read_text())["chat_template"]
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.eos_token_id"] == EOT_ID == 128009
    assert fields["tokenizer.ggml.bos_token_id"] == 128000
    assert fields["tokenizer.chat_template"] == template
    assert fields["general.file_type"] == QUANTS["q8_0"].ftype
    # kobllla's header reader (used to verify every export) agrees with gguf-py's
    info = read_gguf_info(path)
    assert (info.tokenizer_pre, info.eos_token_id, info.chat_template) == ("llama-bpe", 128009, template)
    assert info.matrix_types == fields["types"] and set(fields["types"].values()) == {"Q8_0"}


def test_q4_k_m_on_hidden_256_is_really_q4_k(tiny_q4_export):
    fields = reader_fields(tiny_q4_export / "tiny-instruct-q4_k_m.gguf")
    counts = {t: list(fields["types"].values()).count(t) for t in set(fields["types"].values())}
    # llama.cpp's Q4_K_M mix: Q4_K for most matrices, Q6_K for output and some attn_v/ffn_down; no fallback
    assert max(counts, key=counts.get) == "Q4_K", counts
    assert set(counts) <= {"Q4_K", "Q6_K"}, counts
    assert fields["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    manifest = json.loads((tiny_q4_export / "kobllla_manifest.json").read_text())
    assert list(manifest["outputs"]) == ["tiny-instruct-q4_k_m.gguf"]  # the bf16 intermediate is not an output
    assert sorted(p.name for p in tiny_q4_export.iterdir()) == ["kobllla_manifest.json", "logs",
                                                                 "tiny-instruct-q4_k_m.gguf"]


def test_k_quant_on_hidden_64_is_refused_not_silently_q5_0(trained_mini, llama_cpp_tree, tmp_path):
    out = tmp_path / "mini-q4"
    with pytest.raises(ValueError, match=r"q4_k_m: llama.cpp fell back to .*Q5_0 x\d+.* multiples of 256"):
        export_gguf(model=trained_mini, out=out, quants="q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_tokenizes_mixed_korean_english_like_hf(mini_export, trained_mini):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_mini)
    texts = [MIXED, (HELDOUT / "ko.txt").read_text(encoding="utf-8"), (HELDOUT / "en.txt").read_text(encoding="utf-8")]
    with open_llama(mini_export / "mini-trained-f16.gguf", vocab_only=True) as llm:
        for text in texts:
            assert llama_cpp_tokenize(llm, text) == tok(text).input_ids


def test_llama_cpp_logits_match_transformers(mini_export, trained_mini):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_mini)
    model = AutoModelForCausalLM.from_pretrained(trained_mini, dtype=torch.float32).eval()
    texts = [MIXED] + [d for f in ("ko.txt", "en.txt") for d in (HELDOUT / f).read_text(encoding="utf-8").split("\n\n")]
    windows = [tok(t).input_ids for t in texts if t.strip()]
    refs = [hf_logits(model, w) for w in windows]
    agreement, max_diff = {}, {}
    for quant in ("f32", "f16", "q8_0"):
        stats = NextTokenStats()
        with open_llama(mini_export / f"mini-trained-{quant}.gguf", n_ctx=256) as llm:
            diffs = []
            for w, ref in zip(windows, refs, strict=True):
                got = llama_cpp_logits(llm, w)
                diffs.append(float(np.abs(got - ref).max()))
                stats.add(got[:-1], np.asarray(w[1:]), ref[:-1])
        agreement[quant], max_diff[quant] = stats.top1_agreement, max(diffs)
    assert stats.n > 250
    assert agreement["f32"] == agreement["f16"] == 1.0, (agreement, max_diff)
    assert agreement["q8_0"] >= 0.99, (agreement, max_diff)
    assert max_diff["f32"] < 0.01, max_diff


def test_manifest_records_inputs_sha256_llama_cpp_commit_and_commands(mini_export, trained_mini):
    m = json.loads((mini_export / "kobllla_manifest.json").read_text())
    assert m["inputs"]["model"] == str(trained_mini.resolve()) and "model.safetensors" in m["inputs"]["files"]
    assert len(m["llama_cpp"]["version"]) == 40 and m["llama_cpp"]["llama_cpp_python"] == "0.3.36"
    assert set(m["outputs"]) == {f"mini-trained-{q}.gguf" for q in ("f32", "f16", "q8_0")}
    for name, facts in m["outputs"].items():
        data = (mini_export / name).read_bytes()
        assert facts["sha256"] == hashlib.sha256(data).hexdigest() and facts["bytes"] == len(data)
    assert "convert_hf_to_gguf.py" in " ".join(m["outputs"]["mini-trained-f32.gguf"]["command"])
    assert m["outputs"]["mini-trained-q8_0.gguf"]["command"][-2:] == ["7", str(os.cpu_count())]
    assert ".tmp-" not in json.dumps(m["outputs"])  # commands name the final paths
    assert m["stop_tokens"] == {"chat_template": True, "problems": [], "fixed_in_scratch": []}


def _write_adapter(base: Path, out: Path) -> None:
    """An adapter-only torchtune epoch_N/: PEFT LoRA on layer 0's q_proj, the base's config/tokenizer."""
    import torch
    from safetensors.torch import save_file

    out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copyfile(base / name, out / name)
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 256, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(256, 8, generator=g)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))


def test_adapter_only_epoch_with_base_eos_is_merged_and_gets_eot_input_untouched(tiny_base, llama_cpp_tree, tmp_path):
    adapter = tmp_path / "stage3" / "epoch_0"
    adapter.parent.mkdir()
    _write_adapter(tiny_base, adapter)
    before = tree_bytes(adapter)
    out = tmp_path / "gguf"
    m = export_gguf(model=adapter, base=tiny_base, out=out, quants="q8_0", progress=False)
    assert tree_bytes(adapter) == before
    assert m["inputs"]["merged_adapter"] is True
    assert "tokenizer_config.json eos_token is '<|end_of_text|>', not '<|eot_id|>'" in m["stop_tokens"]["problems"]
    assert "tokenizer_config.json" in m["stop_tokens"]["fixed_in_scratch"]
    info = read_gguf_info(out / "stage3-epoch_0-q8_0.gguf")
    assert (info.eos_token_id, info.tokenizer_pre) == (128009, "llama-bpe")
    assert sorted(p.name for p in out.iterdir()) == ["kobllla_manifest.json", "logs", "stage3-epoch_0-q8_0.gguf"]


def test_chat_vector_output_is_tagged_llama_bpe(tiny_base, tiny_instruct, llama_cpp_tree, tmp_path):
    from kobllla.tiny_model import make_model
    from tools import chat_vector

    target = make_model(tmp_path / "target", preset="tiny", seed=2)
    cv = tmp_path / "chatvec"
    assert chat_vector.main(["--base", str(tiny_base), "--instruct", str(tiny_instruct), "--target", str(target),
                             "--out", str(cv), "--quiet", "--no-hash"]) == 0
    export_gguf(model=cv, out=tmp_path / "gguf", quants="bf16", progress=False)
    info = read_gguf_info(tmp_path / "gguf" / "chatvec-bf16.gguf")  # checked against GGUFReader above
    assert (info.tokenizer_pre, info.eos_token_id) == ("llama-bpe", 128009) and info.chat_template
    assert set(info.matrix_types.values()) == {"BF16"}


def test_sigkilled_export_leaves_nothing_at_the_final_names(trained_mini, llama_cpp_tree, tmp_path):
    import psutil

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tools.export_gguf", "--model", str(trained_mini), "--out", str(out),
                             "--quant", "f32,q8_0", "--no-progress"], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    children = []
    while time.time() < deadline and not children:  # wait until llama.cpp's converter runs
        children = [c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "convert_hf_to_gguf.py" in " ".join(c.cmdline())]
        time.sleep(0.2)
    assert children, "the converter never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(children, timeout=30)
    assert not any(c.is_running() for c in children)  # the converter died with its parent
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".killed.tmp-{proc.pid}"]  # only the hidden sibling


@pytest.mark.parametrize("case, match", [
    ("no-config", r"no config\.json"),
    ("no-tokenizer", r"no tokenizer files"),
    ("unknown-quant", r"unknown quant 'q4_k_x'; valid quants: f32, f16, bf16, q8_0, q6_k, .*q4_k_m"),
    ("architecture", r"llama\.cpp's converter .* failed .*Model FooForCausalLM is not supported"),
    ("no-llama-cpp", r"--llama-cpp .*nowhere has no convert_hf_to_gguf\.py; run `make llama-cpp`"),
    ("out-inside-model", r"would overwrite or replace input"),
    ("out-is-a-file", r"--out .*x\.gguf is a file; --out names a directory"),
    ("bad-name", r"file name stem 'a/b' .* pass --name"),
])
def test_bad_input_one_line_exit_2_nothing_written(case, match, tiny_base, llama_cpp_tree, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    quant, extra, out = "f16", [], tmp_path / "out"
    if case == "no-config":
        (model / "config.json").unlink()
    elif case == "no-tokenizer":
        for name in ("tokenizer.json", "original/tokenizer.model"):
            (model / name).unlink()
    elif case == "unknown-quant":
        quant = "f16,q4_k_x"
    elif case == "architecture":
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    elif case == "no-llama-cpp":
        extra = ["--llama-cpp", str(tmp_path / "nowhere")]
    elif case == "out-inside-model":
        out = model / "gguf"
    elif case == "out-is-a-file":
        out = tmp_path / "x.gguf"
        out.write_bytes(b"GGUF")
    elif case == "bad-name":
        extra = ["--name", "a/b"]
    before = tree_bytes(model)
    assert cli.main(["--model", str(model), "--out", str(out), "--quant", quant, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert tree_bytes(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] + (["x.gguf"] if case == "out-is-a-file" else [])


def test_chat_model_with_untrained_chat_token_rows_is_refused(tiny_base, llama_cpp_tree, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "base-like"
    shutil.copytree(tiny_base, model)
    weights = load_file(str(model / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # Llama 3 base: these rows were never trained
        weights[name][[128006, 128007, 128009]] = torch.zeros(3, weights[name].shape[1], dtype=weights[name].dtype)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["--model", str(model), "--out", str(tmp_path / "out"), "--quant", "f16"]) == 2
    err = capsys.readouterr().err
    assert "untrained chat-token rows" in err and "--fix-untrained mean" in err and "--allow-untrained" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-like"]


def test_existing_out_is_refused_without_overwrite(trained_mini, llama_cpp_tree, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["--model", str(trained_mini), "--out", str(tmp_path / "out"), "--quant", "f16"]) == 2
    assert "already exists; pick another --out or pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_missing_managed_llama_cpp_says_how_to_get_it(tmp_path, monkeypatch):
    from kobllla.gguf import find_llama_cpp

    monkeypatch.setenv("KOBLLLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"not installed; run `make llama-cpp` .* pass --llama-cpp DIR"):
        find_llama_cpp(fetch=False)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"LLAMA_CPP_DIR .* has no convert_hf_to_gguf\.py"):
        find_llama_cpp()


def test_header_checks_use_a_clones_gguf_py_when_the_gguf_package_is_missing(tmp_path, monkeypatch):
    """A user with only a llama.cpp clone (no `pip install gguf`): its gguf-py is put on the path,
    and with neither there the export stops with one line saying how to get it."""
    import sys

    from kobllla.gguf.export import _importable_gguf_py
    from kobllla.gguf.locate import LlamaCpp

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    clone = tmp_path / "llama.cpp"
    (clone / "gguf-py" / "gguf").mkdir(parents=True)
    (clone / "gguf-py" / "gguf" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", list(sys.path))
    _importable_gguf_py(LlamaCpp(root=clone, source="--llama-cpp", version="unknown", quantize_binary=None))
    assert sys.path[-1] == str(clone / "gguf-py")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=r"pip install 'kobllla\[gguf\]'"):
        _importable_gguf_py(LlamaCpp(root=bare, source="--llama-cpp", version="unknown", quantize_binary=None))
