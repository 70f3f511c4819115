"""Claims about the chat vector (stage 2): exact fp32-once arithmetic on every input layout,
extract/apply equal to one shot, loadable output carrying the instruct chat settings, and every
bad input refused in one line with nothing left at the output path."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kobllla.chat_vector import (
    MANIFEST_NAME,
    ChatVectorOptions,
    apply_chat_vector,
    extract_chat_vector,
    merge_chat_vector,
)
from kobllla.tiny_model import PRESETS, make_model
from tools import chat_vector as cli

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


# ------------------------------------------------------------------ helpers (independent of kobllla)


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors dir, through the safetensors library itself."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference(base: Path, instruct: Path, target: Path, ratio: float) -> dict[str, torch.Tensor]:
    """The formula of the issue: bf16(fp32(target) + ratio * (fp32(instruct) - fp32(base)))."""
    b, i, t = load_all(base), load_all(instruct), load_all(target)
    return {k: (t[k].float() + ratio * (i[k].float() - b[k].float())).to(t[k].dtype) for k in t}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base / instruct / target tiny Llama 3 checkpoints (65M params, bf16, real tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {
        "base": make_model(root / "base", seed=0),
        "instruct": make_model(root / "instruct", flavor="instruct", seed=1),
        "target": make_model(root / "target", seed=2),
    }
    return paths


def merge(tiny: dict[str, Path], out: Path, **kw) -> Path:
    kw.setdefault("hash_files", False)
    merge_chat_vector(base=tiny["base"], instruct=tiny["instruct"], target=kw.pop("target", tiny["target"]),
                      out=out, options=ChatVectorOptions(**kw))
    return out


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_merge_is_bit_identical_to_the_fp32_once_formula(tiny: dict[str, Path], tmp_path: Path, ratio: float) -> None:
    out = merge(tiny, tmp_path / "out", ratio=ratio, chunk_elements=100_003)  # slices cross rows
    want = reference(tiny["base"], tiny["instruct"], tiny["target"], ratio)
    assert_same_bits(load_all(out), want)
    naive = {k: load_all(tiny["target"])[k] + ratio * (load_all(tiny["instruct"])[k] - load_all(tiny["base"])[k])
             for k in ("model.layers.0.mlp.up_proj.weight",)}
    differ = (bits(naive["model.layers.0.mlp.up_proj.weight"]) != bits(want["model.layers.0.mlp.up_proj.weight"]))
    assert differ.any(), "bf16 arithmetic should differ somewhere, or this test could not tell them apart"


def test_ratio_zero_returns_the_target_bit_for_bit(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = merge(tiny, tmp_path / "out", ratio=0.0)
    assert_same_bits(load_all(out), load_all(tiny["target"]))


def test_sharded_and_single_file_inputs_give_identical_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    sharded = make_model(tmp_path / "target-sharded", seed=2, max_shard_bytes=40 * 10**6)
    assert (sharded / "model.safetensors.index.json").is_file()
    one = merge(tiny, tmp_path / "one")
    many = merge(tiny, tmp_path / "many", target=sharded, max_shard_bytes=30 * 10**6)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) == 3  # embed | layers + norm | lm_head
    assert len(list(many.glob("model-*-of-*.safetensors"))) == 3
    assert_same_bits(load_all(many), load_all(one))


def test_torchtune_epoch_dir_and_meta_pth_targets_give_the_same_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    from torchtune.models.convert_weights import hf_to_tune, tune_to_meta
    from torchtune.training.checkpointing import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(tiny["target"]), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3", output_dir=str(tmp_path / "tt"))
    ckpt.save_checkpoint(ckpt.load_checkpoint(), epoch=0)
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    tune = hf_to_tune(load_all(tiny["target"]), num_heads=TINY.heads, num_kv_heads=TINY.kv_heads, dim=TINY.hidden)
    torch.save(tune_to_meta(tune), meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(json.dumps({
        "dim": TINY.hidden, "n_layers": TINY.layers, "n_heads": TINY.heads, "n_kv_heads": TINY.kv_heads,
        "vocab_size": TINY.vocab, "norm_eps": TINY.norm_eps, "rope_theta": TINY.rope_theta}))
    want = reference(tiny["base"], tiny["instruct"], tiny["target"], 1.0)
    assert_same_bits(load_all(merge(tiny, tmp_path / "from-tt", target=tmp_path / "tt" / "epoch_0")), want)
    from_meta = merge(tiny, tmp_path / "from-meta", target=meta_dir)
    assert_same_bits(load_all(from_meta), want)
    assert json.loads((from_meta / "config.json").read_text())["eos_token_id"] == 128009


def test_saved_vector_applied_later_equals_one_shot(tiny: dict[str, Path], tmp_path: Path) -> None:
    vec = extract_chat_vector(base=tiny["base"], instruct=tiny["instruct"], out=tmp_path / "vec",
                              options=ChatVectorOptions(hash_files=False)).out
    assert {t.dtype for t in load_all(vec).values()} == {torch.float32}
    applied = apply_chat_vector(vector=vec, target=tiny["target"], out=tmp_path / "applied",
                                options=ChatVectorOptions(ratio=0.5, hash_files=False)).out
    one_shot = merge(tiny, tmp_path / "one-shot", ratio=0.5)
    assert_same_bits(load_all(applied), load_all(one_shot))
    assert json.loads((applied / MANIFEST_NAME).read_text())["operation"] == "apply"
    with pytest.raises(ValueError, match="is not a chat vector saved by --save-vector"):
        apply_chat_vector(vector=tiny["instruct"], target=tiny["target"], out=tmp_path / "x")
    with pytest.raises(ValueError, match="--target .*vec is a chat vector saved by --save-vector, not a model"):
        merge(tiny, tmp_path / "x", target=vec)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ output files


def test_output_loads_in_transformers_and_torchtune_with_the_merged_weights(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.training.checkpointing import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(tiny, tmp_path / "out")
    want = reference(tiny["base"], tiny["instruct"], tiny["target"], 1.0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(bits(model.lm_head.weight.data), bits(want["lm_head.weight"]))
    assert torch.equal(bits(model.model.layers[1].self_attn.q_proj.weight.data),
                       bits(want["model.layers.1.self_attn.q_proj.weight"]))
    sd = FullModelHFCheckpointer(checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
                                 model_type="LLAMA3", output_dir=str(tmp_path / "tt-out")).load_checkpoint()["model"]
    tune = hf_to_tune(want, num_heads=TINY.heads, num_kv_heads=TINY.kv_heads, dim=TINY.hidden)
    assert_same_bits(sd, tune)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|eot_id|>"
    text = tok.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_output_takes_chat_settings_from_instruct_and_vocabulary_from_target(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    out = merge(tiny, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["vocab_size"], cfg["torch_dtype"]) == (128009, 128256, "bfloat16")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|eot_id|>"
    assert sha256(out / "tokenizer.json") == sha256(tiny["target"] / "tokenizer.json")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["files_from"]["tokenizer_config.json"] == "target (chat_template, eos_token from instruct)"


def test_manifest_records_inputs_with_true_hashes_ratio_policy_and_outputs(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    out = merge(tiny, tmp_path / "out", ratio=0.25, hash_files=True)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert (m["operation"], m["ratio"], m["embeddings"]["policy"], m["versions"]["kobllla"]) == \
           ("merge", 0.25, "error", "0.1.0")
    for role in ("base", "instruct", "target"):
        (entry,) = m["inputs"][role]["files"]
        path = tiny[role] / entry["file"]
        assert (entry["bytes"], entry["sha256"]) == (path.stat().st_size, sha256(path))
    (made,) = m["outputs"]
    assert made["sha256"] == sha256(out / "model.safetensors")
    assert_same_bits(load_file(out / "model.safetensors"),  # the hashed file is the merge's result
                     reference(tiny["base"], tiny["instruct"], tiny["target"], 0.25))
    newest = max(out.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST_NAME


def test_sharded_inputs_hashed_by_many_workers_record_their_true_sha256(tiny: dict[str, Path], tmp_path: Path) -> None:
    sharded = {role: make_model(tmp_path / role, flavor="instruct" if role == "instruct" else "base",
                                seed=seed, max_shard_bytes=40 * 10**6)
               for seed, role in enumerate(("base", "instruct", "target"))}
    out = merge(sharded, tmp_path / "out", hash_files=True, workers=4, chunk_elements=70_001,
                max_shard_bytes=30 * 10**6)
    m = json.loads((out / MANIFEST_NAME).read_text())
    for role, path in sharded.items():
        files = m["inputs"][role]["files"]
        assert len(files) == 3 and all(e["sha256"] == sha256(path / e["file"]) for e in files)
    assert [e["sha256"] for e in m["outputs"]] == [sha256(out / e["file"]) for e in m["outputs"]]


def test_inputs_are_never_modified(tiny: dict[str, Path], tmp_path: Path) -> None:
    before = {role: tree_hashes(p) for role, p in tiny.items()}
    merge(tiny, tmp_path / "out")
    merge(tiny, tmp_path / "out", ratio=2.0, overwrite=True)
    assert {role: tree_hashes(p) for role, p in tiny.items()} == before
    with pytest.raises(ValueError, match="overlaps input .*inputs are never modified"):
        merge(tiny, tiny["target"] / "merged")
    assert {role: tree_hashes(p) for role, p in tiny.items()} == before


def test_a_run_killed_mid_write_leaves_nothing_that_looks_complete(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "outs" / "chat"
    cmd = [sys.executable, "-m", "tools.chat_vector", "--base", str(tiny["base"]), "--instruct", str(tiny["instruct"]),
           "--target", str(tiny["target"]), "--out", str(out), "--max-shard-gb", "0.01", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(out.parent.glob(".chat.tmp-*")) if out.parent.exists() else []
        if temps and any(temps[0].glob("*.safetensors")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait() == -signal.SIGKILL, "the merge finished before it could be killed mid-write"
    assert not out.exists()
    (left,) = list(out.parent.iterdir())
    assert left.name.startswith(".chat.tmp-") and not (left / MANIFEST_NAME).exists()
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["chat"]  # the killed run's leftovers are gone
    assert (out / MANIFEST_NAME).is_file()


# ------------------------------------------------------------------ micro checkpoints for bad input

MICRO_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
                "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 1,
                "num_key_value_heads": 1, "vocab_size": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "tie_word_embeddings": False, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def micro(path: Path, *, seed: int, vocab: int = 8, up_rows: int = 6, drop: tuple[str, ...] = (),
          poke: tuple[str, int, float] | None = None, **config: object) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(up_rows, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
        "lm_head.weight": torch.randn(vocab, 4, generator=g),
    }
    if poke is not None:
        tensors[poke[0]].view(-1)[poke[1]] = poke[2]
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items() if k not in drop}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**MICRO_CONFIG, "vocab_size": vocab, **config}))
    return path


@pytest.fixture
def trio(tmp_path: Path) -> dict[str, Path]:
    return {"base": micro(tmp_path / "base", seed=0), "instruct": micro(tmp_path / "instruct", seed=1),
            "target": micro(tmp_path / "target", seed=2)}


def refused(tmp_path: Path, exc: type[Exception], match: str, **paths: Path) -> None:
    """The merge raises one line matching ``match`` and leaves nothing under tmp_path/outs."""
    out = tmp_path / "outs" / "o"
    roles = {k: v for k, v in paths.items() if k in ("base", "instruct", "target")}
    options = ChatVectorOptions(hash_files=False, **{k: v for k, v in paths.items() if k not in (*roles, "out")})
    with pytest.raises(exc, match=match) as info:
        merge_chat_vector(out=paths.get("out", out), options=options, **roles)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not (tmp_path / "outs").exists() or list((tmp_path / "outs").iterdir()) == []


def test_mismatched_shape_is_refused_naming_tensor_shapes_and_files(trio: dict[str, Path], tmp_path: Path) -> None:
    trio["target"] = micro(tmp_path / "t7", seed=2, up_rows=7)
    refused(tmp_path, ValueError, r"shape mismatch: tensor model.layers.0.mlp.up_proj.weight is \[7, 4\] in target "
                                  r"\(.*t7/model.safetensors\) but \[6, 4\] in the vector", **trio)
    trio["target"], trio["instruct"] = tmp_path / "target", micro(tmp_path / "i7", seed=1, up_rows=7)
    refused(tmp_path, ValueError, r"shape mismatch: tensor model.layers.0.mlp.up_proj.weight is \[6, 4\] in base "
                                  r".* but \[7, 4\] in instruct", **trio)


def test_missing_tensor_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    trio["target"] = micro(tmp_path / "tied", seed=2, drop=("lm_head.weight",))
    refused(tmp_path, ValueError, r"missing tensor: lm_head.weight is in instruct \(.*instruct\) but not in target",
            **trio)


def test_different_architecture_is_refused_naming_field_and_files(trio: dict[str, Path], tmp_path: Path) -> None:
    trio["target"] = micro(tmp_path / "gqa", seed=2, num_key_value_heads=2)
    refused(tmp_path, ValueError, r"architecture differs: num_key_value_heads is 1 in instruct "
                                  r"\(.*instruct/config.json\) "
                                  r"but 2 in target \(.*gqa/config.json\)", **trio)
    trio["target"] = micro(tmp_path / "rope", seed=2, rope_theta=10000.0)
    refused(tmp_path, ValueError, r"architecture differs: rope_theta is 500000.0 in instruct .* but 10000.0 in target",
            **trio)
    trio["target"] = micro(tmp_path / "rope31", seed=2,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "original_max_position_embeddings": 8192})
    refused(tmp_path, ValueError, r"architecture differs: rope_scaling is None in instruct .* but "
                                  r"\{'rope_type': 'llama3', 'factor': 8.0, .*\} in target", **trio)


@pytest.mark.parametrize("role", ["base", "instruct", "target"])
def test_nan_in_any_input_is_refused_with_its_location_and_nothing_is_left(
        trio: dict[str, Path], tmp_path: Path, role: str) -> None:
    trio[role] = micro(tmp_path / f"nan-{role}", seed={"base": 0, "instruct": 1, "target": 2}[role],
                       poke=("model.layers.0.mlp.up_proj.weight", 11, float("nan")))
    refused(tmp_path, ValueError, rf"non-finite value in {role}: tensor model.layers.0.mlp.up_proj.weight in "
                                  rf".*nan-{role}/model.safetensors has nan at flat index 11 \(row 2, column 3\)",
            **trio)


def test_result_outside_the_output_dtype_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    trio["instruct"] = micro(tmp_path / "big", seed=1, poke=("model.norm.weight", 1, 70000.0))
    refused(tmp_path, ValueError, r"result overflows float16: tensor model.norm.weight at flat index 1 is 7\d+\.\d+ "
                                  "in float32; use --dtype float32", dtype="float16", **trio)


def test_truncated_input_is_refused_before_anything_is_written(trio: dict[str, Path], tmp_path: Path) -> None:
    f = trio["instruct"] / "model.safetensors"
    os.truncate(f, f.stat().st_size - 2)
    refused(tmp_path, ValueError, r"instruct/model.safetensors: truncated: tensor \S+ ends at byte", **trio)


def test_existing_output_is_refused_unless_overwrite(trio: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "done"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="done already exists; pick another output or pass --overwrite"):
        merge_chat_vector(out=out, **trio)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge_chat_vector(out=out, options=ChatVectorOptions(overwrite=True, hash_files=False), **trio)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


def test_unknown_policy_is_refused_listing_the_choices(trio: dict[str, Path], tmp_path: Path, capsys) -> None:
    refused(tmp_path, ValueError, r"unknown embeddings policy 'merge'; choose one of \['error', 'skip', 'overlap'\]",
            embeddings="merge", **trio)
    with pytest.raises(SystemExit) as info:
        cli.main(["--base", str(trio["base"]), "--instruct", str(trio["instruct"]), "--target", str(trio["target"]),
                  "--out", str(tmp_path / "outs" / "o"), "--embeddings", "merge"])
    assert info.value.code == 2
    assert "invalid choice: 'merge' (choose from 'error', 'skip', 'overlap')" in capsys.readouterr().err
    assert not (tmp_path / "outs").exists()


# ------------------------------------------------------------------ vocabulary policies


def test_extended_vocabulary_is_an_error_by_default_naming_tensors_and_shapes(
        trio: dict[str, Path], tmp_path: Path) -> None:
    trio["target"] = micro(tmp_path / "ko", seed=2, vocab=10)
    refused(tmp_path, ValueError, r"vocabulary differs: model.embed_tokens.weight \[10, 4\] in target vs \[8, 4\] in "
                                  r"base/instruct; lm_head.weight \[10, 4\] in target vs \[8, 4\] in base/instruct; "
                                  "pass --embeddings skip .* or --embeddings overlap", **trio)


def test_skip_keeps_target_embeddings_and_overlap_adds_the_vector_to_shared_rows(
        trio: dict[str, Path], tmp_path: Path) -> None:
    ko = micro(tmp_path / "ko", seed=2, vocab=10)
    b, i, t = load_all(trio["base"]), load_all(trio["instruct"]), load_all(ko)

    def formula(name: str, rows: slice = slice(None)) -> torch.Tensor:
        return (t[name][rows].float() + (i[name][rows].float() - b[name][rows].float())).to(torch.bfloat16)

    skip = merge_chat_vector(base=trio["base"], instruct=trio["instruct"], target=ko, out=tmp_path / "skip",
                             options=ChatVectorOptions(embeddings="skip", hash_files=False))
    got = load_all(skip.out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(bits(got[name]), bits(t[name]))
    assert torch.equal(bits(got["model.norm.weight"]), bits(formula("model.norm.weight")))
    assert skip.embeddings["lm_head.weight"] == "skip: kept the target's 10 rows unchanged"

    over = merge_chat_vector(base=trio["base"], instruct=trio["instruct"], target=ko, out=tmp_path / "overlap",
                             options=ChatVectorOptions(embeddings="overlap", hash_files=False))
    got = load_all(over.out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(bits(got[name][:8]), bits(formula(name, slice(0, 8))))
        assert torch.equal(bits(got[name][8:]), bits(t[name][8:]))
    manifest = json.loads((over.out / MANIFEST_NAME).read_text())
    assert manifest["embeddings"] == {"policy": "overlap", "tensors": {
        n: "overlap: vector added to rows 0..7; rows 8..9 kept from the target"
        for n in ("model.embed_tokens.weight", "lm_head.weight")}}
    assert json.loads((over.out / "config.json").read_text())["vocab_size"] == 10


# ------------------------------------------------------------------ CLI


def test_cli_merges_and_says_which_policy_was_used(trio: dict[str, Path], tmp_path: Path, capsys) -> None:
    rc = cli.main(["--base", str(trio["base"]), "--instruct", str(trio["instruct"]), "--target", str(trio["target"]),
                   "--out", str(tmp_path / "o"), "--ratio", "0.5", "--quiet", "--no-hash"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "merge: 4 tensors" in printed
    assert "ratio 0.5, embeddings: vocabularies match (a mismatch would have been refused)" in printed
    assert_same_bits(load_all(tmp_path / "o"), reference(trio["base"], trio["instruct"], trio["target"], 0.5))


@pytest.mark.parametrize("argv, message", [
    (["--base", "b", "--instruct", "i", "--target", "t"], "missing --out: a merge needs --base, --instruct, --target"),
    (["--base", "b", "--instruct", "i", "--target", "t", "--save-vector", "v"],
     "--save-vector DIR takes --base and --instruct only (drop --target)"),
    (["--vector", "v", "--base", "b", "--target", "t", "--out", "o"], "--vector replaces --base/--instruct"),
    (["--vector", "v", "--target", "t"], "--vector DIR needs --target and --out"),
])
def test_cli_refuses_flag_combinations_that_mean_nothing(argv: list[str], message: str, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_auto_dtype_keeps_each_target_tensors_dtype_and_float32_skips_rounding(tmp_path: Path) -> None:
    base, instruct = micro(tmp_path / "b", seed=0), micro(tmp_path / "i", seed=1)
    mixed = micro(tmp_path / "t", seed=2)  # a merged QLoRA checkpoint keeps norms/embeddings in fp32
    tensors = load_file(mixed / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float() + 1e-3
    save_file(tensors, str(mixed / "model.safetensors"))
    b, i, t = load_all(base), load_all(instruct), load_all(mixed)
    exact = {k: t[k].float() + 0.3 * (i[k].float() - b[k].float()) for k in t}
    auto = load_all(merge_chat_vector(base=base, instruct=instruct, target=mixed, out=tmp_path / "auto",
                                      options=ChatVectorOptions(ratio=0.3, hash_files=False)).out)
    assert_same_bits(auto, {k: v.to(t[k].dtype) for k, v in exact.items()})
    assert auto["model.norm.weight"].dtype == torch.float32 and auto["lm_head.weight"].dtype == torch.bfloat16
    f32 = merge_chat_vector(base=base, instruct=instruct, target=mixed, out=tmp_path / "f32",
                            options=ChatVectorOptions(ratio=0.3, dtype="float32", hash_files=False)).out
    assert_same_bits(load_all(f32), exact)
    assert json.loads((f32 / "config.json").read_text())["torch_dtype"] == "float32"
    # mixed output dtypes: config.json keeps the target's torch_dtype; the manifest lists both
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "auto" / MANIFEST_NAME).read_text())["output_dtypes"] == ["bfloat16", "float32"]


def test_bfloat16_vector_is_half_the_size_and_rounds_the_difference_once_more(
        trio: dict[str, Path], tmp_path: Path) -> None:
    vec = extract_chat_vector(base=trio["base"], instruct=trio["instruct"], out=tmp_path / "vec",
                              options=ChatVectorOptions(vector_dtype="bfloat16", hash_files=False)).out
    b, i, t = load_all(trio["base"]), load_all(trio["instruct"]), load_all(trio["target"])
    v = {k: (i[k].float() - b[k].float()).to(torch.bfloat16) for k in b}
    assert_same_bits(load_all(vec), v)
    out = apply_chat_vector(vector=vec, target=trio["target"], out=tmp_path / "out",
                            options=ChatVectorOptions(ratio=0.5, hash_files=False)).out
    assert_same_bits(load_all(out), {k: (t[k].float() + 0.5 * v[k].float()).to(torch.bfloat16) for k in t})


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, r"workers \(--workers\) must be positive, got 0"),
    ({"max_shard_bytes": 0}, r"max_shard_bytes \(--max-shard-gb\) must be positive, got 0"),
    ({"ratio": float("inf")}, r"ratio must be a finite number, got inf"),
    ({"vector_dtype": "int8"}, r"unknown vector dtype 'int8'; choose 'float32' or 'bfloat16'"),
])
def test_out_of_range_options_are_refused_naming_the_flag(
        trio: dict[str, Path], tmp_path: Path, options: dict, message: str) -> None:
    refused(tmp_path, ValueError, message, **options, **trio)
