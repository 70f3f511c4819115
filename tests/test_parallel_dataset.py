"""parallel_dataset on the hand-written Korean-Chinese literary pairs, through the real Llama 3 tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.datasets import PackedDataset

from kobllla.datasets import parallel_dataset
from tests.conftest import ASSETS, make_llama3_tokenizer

PAR = ASSETS / "parallel"
BOS, EOS, EOT = 128000, 128001, 128009
START, END, NL2 = 128006, 128007, 271  # <|start_header_id|>, <|end_header_id|>, "\n\n"
USER, ASSISTANT, SYSTEM = 882, 78191, 9125
# "清晨的雾气低低地笼罩在江面上。" (the first pair's Chinese side) through Meta's tokenizer.model.
FIRST_ZH_IDS = [80866, 126915, 9554, 25132, 122, 102146, 103167, 103167, 30590, 17925, 120, 15581, 102, 19000,
                70277, 28190, 17905, 1811]


@pytest.fixture(scope="module")
def tok():
    return make_llama3_tokenizer(max_seq_len=256)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def expected(tok, prompt: str, target: str, system: str | None = None) -> dict[str, list[int]]:
    """BOS, [system], user header + prompt + EOT (masked), assistant header + target + EOT (trained), EOS."""
    enc = lambda s: tok.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    masked = [BOS]
    if system:
        masked += [START, SYSTEM, END, NL2, *enc(system), EOT]
    masked += [START, USER, END, NL2, *enc(prompt), EOT]
    trained = [START, ASSISTANT, END, NL2, *enc(target), EOT]
    return {"tokens": masked + trained + [EOS], "labels": [IGNORE] * len(masked) + trained + [IGNORE]}


def test_both_directions_train_the_target_only_with_a_source_language_instruction(tok):
    ds = parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), directions=["ko-zh", "zh-ko"])
    ko, zh = lines(PAR / "train.ko"), lines(PAR / "train.zh")
    assert len(ds) == 2 * len(ko) == 96
    assert ds[0] == expected(tok, f"다음 한국어 문장을 중국어로 번역하세요.\n\n{ko[0]}", zh[0])
    assert ds[1] == expected(tok, f"请把下面的中文句子翻译成韩语。\n\n{zh[0]}", ko[0])
    # the trained part of the first sample, spelled out: assistant header, the Chinese ids, <|eot_id|>
    assert [t for t in ds[0]["labels"] if t != IGNORE] == [START, ASSISTANT, END, NL2, *FIRST_ZH_IDS, EOT]


def test_moses_tsv_jsonl_csv_and_parquet_inputs_give_the_same_samples(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in lines(PAR / "train.jsonl")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "train.csv").write_text(
        "ko,zh\n" + "".join(f'"{r["ko"]}","{r["zh"]}"\n' for r in rows), encoding="utf-8"
    )
    forms = {
        "moses": dict(source="moses", data_files=str(PAR / "train")),
        "tsv": dict(source="tsv", data_files=str(PAR / "train.tsv")),
        "tsv path": dict(source=str(PAR / "train.tsv")),
        "jsonl": dict(source="json", data_files=str(PAR / "train.jsonl")),
        "csv": dict(source="csv", data_files=str(tmp_path / "train.csv")),
        "parquet": dict(source="parquet", data_files=str(tmp_path / "train.parquet")),
    }
    built = {name: parallel_dataset(tok, directions=["zh-ko"], **kw) for name, kw in forms.items()}
    reference = [built["moses"][i] for i in range(48)]
    for name, ds in built.items():
        assert [ds[i] for i in range(len(ds))] == reference, name


def test_other_column_names_and_languages_are_configurable(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"korean": "달이 밝다.", "english": "The moon is bright."}) + "\n", encoding="utf-8")
    ds = parallel_dataset(tok, source="json", data_files=str(path), src_lang="ko", tgt_lang="en",
                          src_column="korean", tgt_column="english", directions=["en-ko"])
    prompt = "Translate the following English text into Korean.\n\nThe moon is bright."
    assert ds[0] == expected(tok, prompt, "달이 밝다.")


def test_a_style_system_prompt_and_a_custom_template_are_masked_prompt_parts(tok):
    system = {"ko-zh": "원문의 어조와 감정, 문체를 그대로 살려 자연스럽게 번역하세요."}
    ds = parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), system_prompt=system,
                          templates={"ko-zh": "{text}\n\n위 문장을 중국어로 옮겨 주세요."})
    ko, zh = lines(PAR / "train.ko"), lines(PAR / "train.zh")
    assert ds[3] == expected(tok, f"{ko[3]}\n\n위 문장을 중국어로 옮겨 주세요.", zh[3], system=system["ko-zh"])


def write_pair(tmp_path: Path, ko: list[str], zh: list[str]) -> str:
    (tmp_path / "c.ko").write_text("".join(s + "\n" for s in ko), encoding="utf-8")
    (tmp_path / "c.zh").write_text("".join(s + "\n" for s in zh), encoding="utf-8")
    return str(tmp_path / "c")


def test_empty_sides_and_misaligned_pairs_are_dropped_and_counted_in_one_log_line(tok, tmp_path, caplog):
    ko, zh = lines(PAR / "train.ko"), lines(PAR / "train.zh")
    ko_bad = ko + ["", "그는 웃었다.", ko[0]]
    # an empty Korean side; a 5-character sentence "translated" by three merged lines; a truncated target
    zh_bad = zh + ["他笑了。", zh[1] + zh[2] + zh[3], zh[0][:2]]
    caplog.set_level(logging.INFO)
    ds = parallel_dataset(tok, source="moses", data_files=write_pair(tmp_path, ko_bad, zh_bad))
    assert ds.cleaning["pairs"] == 51 and ds.cleaning["empty"] == 1 and ds.cleaning["misaligned"] == 2
    assert len(ds) == 48 and [ds[i] for i in range(48)] == [
        parallel_dataset(tok, source="moses", data_files=str(PAR / "train"))[i] for i in range(48)
    ]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("parallel_dataset(c.ko/zh)")]
    assert len(logged) == 1
    assert "51 pairs; dropped 1 with an empty side, 2 misaligned (log zh/ko character ratio outside" in logged[0]
    assert "48 kept x 1 direction(s) = 48 samples" in logged[0]


def test_a_file_where_every_pair_is_dropped_says_so(tok, tmp_path):
    (tmp_path / "one.tsv").write_text("ko\tzh\n달이 밝다.\n", encoding="utf-8")  # no tab: no Chinese side
    with pytest.raises(ValueError, match=r"all 1 pairs were dropped \(1 with an empty side, 0 misaligned\)"):
        parallel_dataset(tok, source="tsv", data_files=str(tmp_path / "one.tsv"))


def test_the_ratio_check_can_be_switched_off(tok, tmp_path):
    ko, zh = lines(PAR / "train.ko"), lines(PAR / "train.zh")
    ds = parallel_dataset(tok, source="moses", data_files=write_pair(tmp_path, ko + [ko[0]], zh + [zh[0] * 4]),
                          misaligned_mads=None)
    assert len(ds) == 49 and ds.cleaning["misaligned"] == 0


def test_pair_files_of_different_line_counts_are_an_error_naming_both_counts(tok, tmp_path):
    ko, zh = lines(PAR / "train.ko"), lines(PAR / "train.zh")
    prefix = write_pair(tmp_path, ko, zh[:-1])
    with pytest.raises(ValueError, match=r"c\.ko has 48 lines but .*c\.zh has 47; Moses pair files must be line-ali"):
        parallel_dataset(tok, source="moses", data_files=prefix)


def test_an_unknown_direction_lists_the_valid_ones(tok):
    with pytest.raises(ValueError, match=r"unknown direction 'ko-en'; choose from \['ko-zh', 'zh-ko'\]"):
        parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), directions=["ko-zh", "ko-en"])


def test_a_missing_column_lists_the_columns_found(tok):
    with pytest.raises(ValueError, match=r"train\.tsv line 2: no field 'kor' \(fields: ko, zh\); set src_column"):
        parallel_dataset(tok, source="tsv", data_files=str(PAR / "train.tsv"), src_column="kor")


def test_a_missing_moses_side_names_both_expected_files(tok):
    with pytest.raises(FileNotFoundError, match=r"train\.en: no such file; source: moses reads .*train\.ko and .*\.en"):
        parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), tgt_lang="en")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"templates": {"ko-zh": "번역하세요."}}, r"templates\['ko-zh'\] must contain \{text\} exactly once"),
    ({"templates": {"zh-ko": "{text}"}}, r"templates for directions not trained: \['zh-ko'\]"),
    ({"system_prompt": {"zh-ko": "译得自然。"}}, r"system_prompt for directions not trained: \['zh-ko'\]"),
    ({"src_lang": "ko", "tgt_lang": "fr"}, r"no built-in instruction for ko-fr .* give templates"),
    ({"directions": "ko-zh"}, r"directions must be a non-empty list"),
])
def test_bad_prompt_settings_are_one_line_errors(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), **kwargs)


def test_packed_pairs_keep_every_trained_token(tok):
    plain = parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), directions=["ko-zh", "zh-ko"])
    packs = parallel_dataset(tok, source="moses", data_files=str(PAR / "train"), directions=["ko-zh", "zh-ko"],
                             packed=True)
    assert isinstance(packs, PackedDataset)
    trained = sum(sum(1 for x in plain[i]["labels"] if x != IGNORE) for i in range(len(plain)))
    assert sum(int((packs[i]["labels"] != IGNORE).sum()) for i in range(len(packs))) == trained


@pytest.mark.integration
def test_tiny_translation_config_trains_through_the_real_recipe(tiny_instruct, tmp_path):
    """configs/tiny/translation_ko_zh_lora.yaml through torchtune's lora_finetune_single_device, one step."""
    from tests.test_recipes_integration import logged_losses, tune_cpu, wait_ok

    out, log = tmp_path / "mt", tmp_path / "mt.log"
    wait_ok(tune_cpu([
        "lora_finetune_single_device", "--config", "configs/tiny/translation_ko_zh_lora.yaml", f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tiny_instruct}", f"tokenizer.path={tiny_instruct}/original/tokenizer.model",
        "max_steps_per_epoch=1", "gradient_accumulation_steps=1",
    ], log, nproc=None), log)
    text = log.read_text()
    assert "parallel_dataset(train.ko/zh): 48 pairs; dropped 0 with an empty side, 0 misaligned" in text
    assert sorted(logged_losses(out)) == [1]
    assert (out / "epoch_0" / "adapter_model.safetensors").is_file()
