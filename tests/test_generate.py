"""tools.generate and kobllla.generation against transformers' own generate, on real tiny Llama 3 models.

The reference is ``model.generate`` of transformers itself (same fp32 weights, same left-padded batch),
plus each row generated alone. A stop is a real stop: the ``<|eot_id|>`` row of lm_head is edited so
that eot becomes the model's argmax at a chosen step, then generation must end there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kobllla.chat_format import END_OF_TEXT_ID, EOT_ID
from kobllla.generation import (
    GenerationOptions,
    decode,
    encode_row,
    generate_file,
    generate_rows,
    load_model,
    read_prompts,
)
from kobllla.model_dir import resolve_model_dir
from kobllla.tiny_model import make_model
from tests.conftest import REPO

MINI = dict(vocab_size=128256, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=64, max_seq_len=2048,
            intermediate_dim=256, norm_eps=1e-5, rope_base=500000.0)

ROWS = [
    {"id": "ko", "messages": [{"role": "user", "content": "안녕? 오늘 날씨 어때?"}]},
    {"id": 2, "prompt": "The capital of France is"},
    {"id": "sys", "messages": [{"role": "system", "content": "Answer in Korean."},
                               {"role": "user", "content": "What is the longest river in Korea? Tell me more."}]},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a one-file HF model dir whose tensors ``edit(dict)`` changed."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-models")
    return {"base": make_model(root / "mini-base", preset="mini", seed=5, dtype="float32"),
            "instruct": make_model(root / "mini-instruct", preset="mini", flavor="instruct", seed=6,
                                   dtype="float32")}


@pytest.fixture(scope="module")
def loaded(models):
    loaded = load_model(models["instruct"])
    yield loaded
    loaded.close()


def hf_generate(loaded, prompts: list[list[int]], max_new_tokens: int, eos: list[int] | None = None) -> list[list[int]]:
    """transformers' generate(do_sample=False) on the same left-padded batch; each row cut after its stop."""
    width = max(map(len, prompts))
    ids = torch.tensor([[loaded.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = loaded.stop_ids if eos is None else eos
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos, pad_token_id=loaded.pad_id)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_equals_transformers_generate_batch_1_and_a_left_padded_batch(loaded):
    rows = [dict(r) for r in ROWS]
    prompts = [encode_row(loaded, r) for r in rows]
    assert len({len(p) for p in prompts}) == 3  # really padded
    batched = list(generate_rows(loaded, rows, GenerationOptions(max_new_tokens=12, batch_size=3)))
    assert [r["token_ids"] for r in batched] == hf_generate(loaded, prompts, 12)
    for row, prompt, got in zip(rows, prompts, batched, strict=True):
        alone = list(generate_rows(loaded, [row], GenerationOptions(max_new_tokens=12, batch_size=1)))[0]
        assert alone["token_ids"] == hf_generate(loaded, [prompt], 12)[0] == got["token_ids"]
        assert got["stop_reason"] == "max_new_tokens" and got["new_tokens"] == 12
        assert got["text"] == loaded.tokenizer.decode(got["token_ids"], skip_special_tokens=True)


def test_messages_get_the_models_chat_template_and_prompts_get_bos(loaded):
    ids = encode_row(loaded, ROWS[0])
    text = loaded.tokenizer.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕? 오늘 날씨 어때?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_row(loaded, ROWS[1])[:1] == [128000] and encode_row(loaded, ROWS[1]).count(128000) == 1


def test_generation_stops_at_eot_whatever_the_checkpoints_eos_says(models, tmp_path):
    """A base-flavour checkpoint (eos <|end_of_text|> only) whose lm_head makes eot the argmax at step 4."""
    first = load_model(models["base"])
    prompt = encode_row(first, ROWS[2])
    greedy = decode(first, [prompt], GenerationOptions(max_new_tokens=8))[0].token_ids
    first.close()
    k = 3  # the 4th new token becomes <|eot_id|>

    def edit(t):
        t["lm_head.weight"][EOT_ID] = t["lm_head.weight"][greedy[k]] * 1.001

    eot_dir = edited_copy(models["base"], tmp_path / "eot-at-4", edit)
    assert json.loads((eot_dir / "config.json").read_text())["eos_token_id"] == END_OF_TEXT_ID
    m = load_model(eot_dir)
    prompts = [prompt, encode_row(m, ROWS[0]), encode_row(m, ROWS[1])]
    out = list(generate_rows(m, [ROWS[2], ROWS[0], ROWS[1]], GenerationOptions(max_new_tokens=8, batch_size=3)))
    assert out[0]["token_ids"] == greedy[:k] + [EOT_ID]
    assert out[0]["stop_reason"] == "eos" and out[0]["new_tokens"] == k + 1
    assert out[0]["text"] == m.tokenizer.decode(greedy[:k])
    assert [r["token_ids"] for r in out] == hf_generate(m, prompts, 8, eos=[EOT_ID, END_OF_TEXT_ID])
    # transformers with the checkpoint's own eos would not stop there: the bug this guards against
    with torch.no_grad():
        plain = m.model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                 pad_token_id=END_OF_TEXT_ID)[0, len(prompt):].tolist()
    assert plain[k] == EOT_ID and len(plain) == 8
    m.close()


def test_sampling_is_reproducible_and_independent_of_batch_size(loaded):
    opts = dict(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    a = [r["token_ids"] for r in generate_rows(loaded, ROWS, GenerationOptions(batch_size=3, **opts))]
    b = [r["token_ids"] for r in generate_rows(loaded, ROWS, GenerationOptions(batch_size=1, **opts))]
    c = [r["token_ids"] for r in generate_rows(loaded, ROWS, GenerationOptions(batch_size=3, **{**opts, "seed": 8}))]
    greedy = [r["token_ids"] for r in generate_rows(loaded, ROWS, GenerationOptions(max_new_tokens=5))]
    assert a == b
    assert a != c and a != greedy


def test_generate_file_resumes_after_a_killed_run_and_matches_a_full_run(models, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", ROWS)
    opts = GenerationOptions(max_new_tokens=6, batch_size=2)
    full = generate_file(model=models["instruct"], prompts=prompts, out=tmp_path / "full.jsonl", options=opts,
                         progress=False)
    assert (full.rows, full.generated, full.skipped, full.new_tokens) == (3, 3, 0, 18)
    lines = (tmp_path / "full.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    # a killed run: the first row whole, the second cut mid-line
    (tmp_path / "resumed.jsonl").write_text(lines[0] + lines[1][:25], encoding="utf-8")
    again = generate_file(model=models["instruct"], prompts=prompts, out=tmp_path / "resumed.jsonl", options=opts,
                          progress=False)
    assert (again.generated, again.skipped) == (2, 1)
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]
    got = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
           for x in (tmp_path / "resumed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert got == strip
    assert set(strip[0]) == {"id", "text", "token_ids", "stop_reason", "new_tokens"}
    third = generate_file(model=models["instruct"], prompts=prompts, out=tmp_path / "resumed.jsonl", options=opts,
                          progress=False)
    assert (third.generated, third.skipped) == (0, 3)


def test_a_resume_with_other_generation_flags_is_refused_and_the_file_kept(models, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", ROWS[:1])
    out = tmp_path / "out.jsonl"
    generate_file(model=models["instruct"], prompts=prompts, out=out, options=GenerationOptions(max_new_tokens=3),
                  progress=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"out.jsonl was written with --max-new-tokens 3, not 4 .*same --max-new"):
        generate_file(model=models["instruct"], prompts=prompts, out=out,
                      options=GenerationOptions(max_new_tokens=4), progress=False)
    with pytest.raises(ValueError, match=r"written with --model .*pick a new --out"):
        generate_file(model=models["base"], prompts=prompts, out=out, options=GenerationOptions(max_new_tokens=3),
                      progress=False)
    assert out.read_bytes() == before
    again = generate_file(model=models["instruct"], prompts=prompts, out=out,
                          options=GenerationOptions(max_new_tokens=3, batch_size=4), progress=False)
    assert (again.generated, again.skipped) == (0, 1)


@pytest.fixture(scope="module")
def lora_epoch(models, tmp_path_factory) -> dict[str, Path]:
    """A real torchtune LoRA save (FullModelHFCheckpointer, as the recipes call it) from the instruct dir."""
    from torchtune.models.llama3 import lora_llama3
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt
    from torchtune.training import FullModelHFCheckpointer

    out = tmp_path_factory.mktemp("tt-lora")
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(models["instruct"]), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3", output_dir=str(out))
    modules = ["q_proj", "k_proj", "v_proj", "output_proj"]
    model = lora_llama3(lora_attn_modules=modules, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8, **MINI)
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # trained adapters are not zero
            p.data.normal_(0.0, 0.05, generator=gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = {k: v.clone() for k, v in get_adapter_state_dict(state).items()}
    merged = get_merged_lora_ckpt(state, rank=4, alpha=8)
    config = {"r": 4, "lora_alpha": 8, "target_modules": get_lora_module_names(modules, True, False),
              "peft_type": "LORA"}
    ckpt.save_checkpoint({"model": merged, "adapter": adapter, "adapter_config": config}, epoch=0)
    full = out / "epoch_0"
    adapter_only = out / "adapter-only"
    shutil.copytree(full, adapter_only, ignore=shutil.ignore_patterns("model-*.safetensors", "*.index.json"))
    return {"full": full, "adapter_only": adapter_only}


def test_adapter_only_epoch_merges_into_torchtunes_own_merged_weights(lora_epoch, models, tmp_path):
    assert (lora_epoch["adapter_only"] / "adapter_model.safetensors").is_file()
    merged = resolve_model_dir(lora_epoch["adapter_only"], base=models["instruct"], scratch=tmp_path)
    assert merged.parent == tmp_path
    theirs = load_file(str(next(lora_epoch["full"].glob("model-*.safetensors"))))
    ours = load_file(str(merged / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-6, msg=name)
    changed = [n for n in theirs if "q_proj" in n or "down_proj" in n]
    base = load_file(str(models["instruct"] / "model.safetensors"))
    assert all(not torch.equal(base[n], ours[n]) for n in changed)
    assert resolve_model_dir(lora_epoch["full"]) == lora_epoch["full"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (merged / name).read_bytes() == (lora_epoch["adapter_only"] / name).read_bytes()


def test_adapter_only_epoch_needs_a_base_that_fits(lora_epoch, models, tmp_path):
    with pytest.raises(ValueError, match=r"holds only a LoRA adapter .*pass --base DIR"):
        resolve_model_dir(lora_epoch["adapter_only"])
    wrong = make_model(tmp_path / "tiny", preset="tiny", seed=0, dtype="float32")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: model.layers.0.\S+.weight: lora_B \(\d+, 4\) @ "
                                         r"lora_A \(4, \d+\) does not match the base tensor \(\d+, \d+\)"):
        resolve_model_dir(lora_epoch["adapter_only"], base=wrong, scratch=tmp_path / "s")
    assert not list((tmp_path / "s").glob("merged-*"))


@pytest.mark.parametrize("row, message", [
    ({"id": 1}, r"line 2: row 1 has neither of 'messages' and 'prompt'"),
    ({"id": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, r"line 2: row 1 has both"),
    ({"id": 1, "messages": [{"role": "bot", "content": "x"}]},
     r"line 2: field 'messages\[0\].role' is \"bot\"; use one of system, user, assistant"),
    ({"id": 1, "messages": [{"role": "user", "content": "  "}]}, r"line 2: field 'messages\[0\].content' must be"),
    ({"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"line 2: field 'messages\[1\].role' is 'assistant'; the last message must be the user's"),
    ({"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "user",
                                                                                                 "content": "u"}]},
     r"messages\[1\].role': a system message may only come first"),
    ({"id": 1, "messages": "hello"}, r"field 'messages' must be a non-empty list"),
    ({"id": 1, "prompt": 5}, r"field 'prompt' must be a non-empty string"),
    ({"id": None, "prompt": "x"}, r"field 'id' must be a non-empty string or an integer"),
    ({"prompt": "x"}, r"field 'id' is missing"),
    ({"id": "a", "prompt": "dup"}, r"line 2: field 'id' \"a\" repeats line 1"),
])
def test_bad_prompt_rows_are_refused_with_file_line_and_field(tmp_path, row, message):
    path = write_rows(tmp_path / "p.jsonl", [{"id": "a", "prompt": "fine"}, row])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'p.jsonl'}: {message}" if message.startswith("line")
                       else message):
        read_prompts(path)


def test_malformed_json_and_empty_files_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n\n{"id": 2, "prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad}: line 3: not valid JSON"):
        read_prompts(bad)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        read_prompts(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no prompt rows"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'bin.jsonl'}: line 1: not UTF-8 text"):
        read_prompts(tmp_path / "bin.jsonl")


def test_model_dirs_without_config_or_tokenizer_are_refused(models, tmp_path):
    no_tok = tmp_path / "no-tok"
    shutil.copytree(models["instruct"], no_tok, ignore=shutil.ignore_patterns("tokenizer.json", "original"))
    with pytest.raises(FileNotFoundError, match=r"no-tok: no tokenizer files \(tokenizer.json or tokenizer.model\)"):
        resolve_model_dir(no_tok)
    meta_only = tmp_path / "meta-only"
    shutil.copytree(models["instruct"], meta_only, ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"has original/tokenizer.model but no tokenizer.json"):
        resolve_model_dir(meta_only)
    no_cfg = tmp_path / "no-cfg"
    shutil.copytree(models["instruct"], no_cfg, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(FileNotFoundError, match=r"no-cfg: no config.json"):
        resolve_model_dir(no_cfg)
    cfg_only = tmp_path / "cfg-only"
    cfg_only.mkdir()
    shutil.copyfile(models["instruct"] / "config.json", cfg_only / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*cfg-only: expected model.safetensors"):
        resolve_model_dir(cfg_only)
    with pytest.raises(FileNotFoundError, match=r"model .*missing does not exist"):
        resolve_model_dir(tmp_path / "missing")


def test_bad_options_are_refused():
    for kwargs, message in [({"max_new_tokens": 0}, "--max-new-tokens 0"), ({"temperature": -1}, "--temperature"),
                            ({"top_p": 0}, "--top-p 0"), ({"batch_size": 0}, "--batch-size"),
                            ({"dtype": "int8"}, "--dtype 'int8'"), ({"device": "tpu"}, "--device 'tpu'")]:
        with pytest.raises(ValueError, match=message):
            GenerationOptions(**kwargs)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.generate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240)


def test_cli_writes_rows_and_refuses_bad_input_in_one_line(models, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", ROWS[:2])
    out = tmp_path / "answers" / "a.jsonl"
    done = run_cli("--model", str(models["instruct"]), "--prompts", str(prompts), "--out", str(out),
                   "--max-new-tokens", "4", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 rows" in done.stdout
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["ko", 2] and all(r["new_tokens"] == 4 for r in rows)
    before = prompts.read_bytes()
    bad = run_cli("--model", str(models["instruct"]), "--prompts", str(prompts), "--out", str(prompts))
    assert bad.returncode == 2 and "would overwrite or replace input" in bad.stderr
    assert prompts.read_bytes() == before
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "messages": [{"role": "robot", "content": "hi"}]}\n', encoding="utf-8")
    bad = run_cli("--model", str(models["instruct"]), "--prompts", str(broken), "--out", str(tmp_path / "x.jsonl"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (f"error: {broken}: line 1: field 'messages[0].role' is \"robot\"; "
                                                   "use one of system, user, assistant")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.jsonl").exists()
    other = write_rows(tmp_path / "other.jsonl", [{"id": "zz", "prompt": "x"}])
    with pytest.raises(ValueError, match=r"a.jsonl: line 1: field 'id' \"ko\" is not in .*other.jsonl; this --out "
                                         r"belongs to another prompts file: pick another --out"):
        generate_file(model=models["instruct"], prompts=other, out=out, options=GenerationOptions(max_new_tokens=4),
                      progress=False)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_a_prompt_too_long_for_the_model_is_refused_before_out_is_touched(models, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", [ROWS[1], {"id": "long", "prompt": "가" * 2100}])
    with pytest.raises(ValueError, match=r"row 'long' \(line 2, field 'prompt'\): 2101 prompt tokens \+ "
                                         r"--max-new-tokens 4 exceed the model's max_position_embeddings 2048"):
        generate_file(model=models["instruct"], prompts=prompts, out=tmp_path / "o.jsonl",
                      options=GenerationOptions(max_new_tokens=4), progress=False)
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- H-qa defects (broken weights, flags, BOM, timing)


def test_a_zero_byte_or_truncated_weights_file_is_refused_in_one_line_before_anything_loads(models, tmp_path):
    from kobllla.evaluation import write_samples

    zero, cut = (shutil.copytree(models["instruct"], tmp_path / n) for n in ("zero", "cut"))
    (zero / "model.safetensors").write_bytes(b"")
    whole = (models["instruct"] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[:5000])
    with pytest.raises(ValueError, match=r"zero/model.safetensors: 0 bytes is too short for a safetensors file "
                                         r"\(truncated\?\); re-download or re-save it$"):
        resolve_model_dir(zero)
    with pytest.raises(ValueError, match=r"cut/model.safetensors: truncated: tensor .* but the file has 5000 bytes"):
        load_model(cut)
    prompts = write_rows(tmp_path / "p.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match=r"^model b: .*cut/model.safetensors: truncated"):
        write_samples({"a": models["instruct"], "b": cut}, [{**ROWS[1], "expect_lang": "ko"}],
                      GenerationOptions(max_new_tokens=2), tmp_path / "samples", prompts=prompts)
    assert not (tmp_path / "samples").exists()  # refused before model a generated
    done = run_cli("--model", str(zero), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("zero/model.safetensors: 0 bytes is too short for a "
                                                         "safetensors file (truncated?); re-download or re-save it")
    assert not (tmp_path / "o.jsonl").exists()


def test_base_given_with_full_weights_is_refused_not_ignored(models, tmp_path):
    from kobllla.evaluation import write_samples

    with pytest.raises(ValueError, match=r"--base .*mini-base is given but model .*mini-instruct holds full weights "
                                         r"\(no adapter to merge\); drop --base"):
        load_model(models["instruct"], base=models["base"])
    with pytest.raises(ValueError, match=r"--base .*mini-base is given but every model holds full weights"):
        write_samples({"a": models["instruct"]}, [{**ROWS[1], "expect_lang": "ko"}], GenerationOptions(),
                      tmp_path / "samples", base=models["base"])
    assert not (tmp_path / "samples").exists()


def test_non_finite_temperature_and_malformed_or_missing_cuda_devices_are_refused(models):
    for kwargs, message in [({"temperature": float("inf")}, r"--temperature inf: must be finite and >= 0"),
                            ({"temperature": float("nan")}, r"--temperature nan: must be finite"),
                            ({"device": "cuda:x"}, r"--device 'cuda:x': must be cpu, cuda or cuda:N"),
                            ({"device": "cudax"}, r"--device 'cudax'")]:
        with pytest.raises(ValueError, match=message):
            GenerationOptions(**kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda: this torch has no CUDA device; use --device cpu$"):
            load_model(models["instruct"], device="cuda")


def test_a_bom_prompts_file_is_read_as_kobllla_jsonl_reads_it(tmp_path):
    from kobllla.jsonl import iter_jsonl

    plain = write_rows(tmp_path / "plain.jsonl", ROWS)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_prompts(bom) == read_prompts(plain)
    assert [r for _, r in iter_jsonl(bom)] == [r for _, r in iter_jsonl(plain)]


def test_row_seconds_are_each_rows_share_of_its_batch_and_an_unwritable_out_names_the_path(models, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "a.jsonl"
    summary = generate_file(model=models["instruct"], prompts=prompts, out=out,
                            options=GenerationOptions(max_new_tokens=3, batch_size=2), progress=False)
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["seconds"] == rows[1]["seconds"] > 0  # one batch of two: equal shares
    assert sum(r["seconds"] for r in rows) <= summary.seconds + 1e-3
    with pytest.raises(OSError, match=r"^--out /sys/x.jsonl: cannot write there \(.*\); pick a writable path$"):
        generate_file(model=models["instruct"], prompts=prompts, out=Path("/sys/x.jsonl"),
                      options=GenerationOptions(), progress=False)


def test_a_dir_without_weights_points_at_original_only_when_it_holds_metas_pth(models, tmp_path):
    bare = tmp_path / "bare"
    (bare / "original").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(models["instruct"] / name, bare / name)
    (bare / "original" / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"^no weights in .*bare: expected model.safetensors"):
        resolve_model_dir(bare)
    (bare / "original" / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds no weights at top level; pass .*original for Meta's .pth"):
        resolve_model_dir(bare)
