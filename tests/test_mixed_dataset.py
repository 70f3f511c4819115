"""mixed_dataset on real alpaca fixtures through torchtune's own alpaca_dataset and the Llama 3 tokenizer."""

from __future__ import annotations

import logging

import pytest
from torch.utils.data import DistributedSampler
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.datasets import PackedDataset, alpaca_dataset

from kobllla.datasets import mixed_dataset
from kobllla.datasets._mixed import interleave_schedule
from tests.conftest import ASSETS, make_llama3_tokenizer

EN = {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "train_on_input": False,
      "data_files": str(ASSETS / "alpaca_en_tiny.jsonl")}  # 8 rows
ZH = {**EN, "data_files": str(ASSETS / "alpaca_zh_tiny.jsonl")}  # 6 rows


@pytest.fixture(scope="module")
def tok():
    return make_llama3_tokenizer(max_seq_len=256)


@pytest.fixture(scope="module")
def sources(tok):
    return [alpaca_dataset(tok, source="json", data_files=c["data_files"], train_on_input=False) for c in (EN, ZH)]


def test_a_3_to_1_weighting_over_4000_samples_takes_75_percent_from_the_first_source(tok, sources):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[3, 1], stop=4000, seed=7)
    assert len(mix) == 4000
    first = sum(1 for i in range(4000) if mix[i]["tokens"] in [s["tokens"] for s in [sources[0][j] for j in range(8)]])
    assert abs(first / 4000 - 0.75) <= 0.01
    assert mix.sample_counts() == [3000, 1000]
    # and every prefix stays within one sample of the share
    counts = [0, 0]
    for n, (src, _) in enumerate(mix.schedule, start=1):
        counts[src] += 1
        assert abs(counts[0] - 0.75 * n) <= 1


def test_every_sample_is_the_scheduled_row_of_its_source(tok, sources):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 1], stop="all_exhausted")
    for i, (src, row) in enumerate(mix.schedule):
        assert mix[i]["tokens"] == sources[src][row]["tokens"]
        assert mix[i]["labels"] == sources[src][row]["labels"]


def test_first_exhausted_never_repeats_and_stops_when_a_source_runs_out(tok):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 1], stop="first_exhausted", seed=3)
    rows = [tuple(r) for r in mix.schedule]
    assert len(set(rows)) == len(rows)  # interleave_under: no repeats
    # A B A B ... A: the 14th sample would be a 7th Chinese row of 6, so the mix ends at 13
    assert mix.sample_counts() == [7, 6]


def test_all_exhausted_repeats_the_smaller_source_until_every_source_was_seen_whole(tok):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 3], stop="all_exhausted", seed=3)
    en, zh = mix.sample_counts()
    # B A B B, B A B B, ...: the 8th English row is sample 30, so the mix ends there
    assert en == 8 and zh == 22
    zh_rows = [r for s, r in mix.schedule if s == 1]
    for k in range(3):  # each full pass over the Chinese rows is a permutation
        assert sorted(zh_rows[6 * k: 6 * k + 6]) == list(range(6))
    assert zh_rows[:6] != zh_rows[6:12]  # a fresh order per pass


def test_the_schedule_is_deterministic_and_the_seed_only_orders_rows():
    a = interleave_schedule([8, 6], [0.5, 0.5], "all_exhausted", seed=1)
    b = interleave_schedule([8, 6], [0.5, 0.5], "all_exhausted", seed=1)
    c = interleave_schedule([8, 6], [0.5, 0.5], "all_exhausted", seed=2)
    assert (a == b).all()
    assert (a[:, 0] == c[:, 0]).all() and not (a[:, 1] == c[:, 1]).all()


def test_a_zero_weight_switches_a_source_off(tok):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 0], stop="all_exhausted")
    assert mix.sample_counts() == [8, 0]


def test_distributed_ranks_get_disjoint_shards_of_the_mix(tok):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[3, 1], stop=400, seed=5)
    again = mixed_dataset(tok, datasets=[EN, ZH], weights=[3, 1], stop=400, seed=5)  # what the other rank builds
    shards = []
    for rank, ds in enumerate((mix, again)):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        shards.append(list(sampler))
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(400))
    for shard in shards:  # each rank still trains on both sources near 3:1
        first = sum(1 for i in shard if mix.schedule[i][0] == 0)
        assert 0.68 <= first / len(shard) <= 0.82


def test_packed_mix_is_a_torchtune_packed_dataset_of_every_trained_token(tok):
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 1], stop="all_exhausted")
    packs = mixed_dataset(tok, datasets=[EN, ZH], weights=[1, 1], stop="all_exhausted", packed=True)
    assert isinstance(packs, PackedDataset)
    trained = sum(sum(1 for x in mix[i]["labels"] if x != IGNORE) for i in range(len(mix)))
    packed_trained = sum(int((packs[i]["labels"] != IGNORE).sum()) for i in range(len(packs)))
    assert packed_trained == trained
    assert all(len(packs[i]["tokens"]) == 256 for i in range(len(packs)))


def test_start_log_names_each_sources_share_of_samples_and_trained_tokens(tok, sources, caplog):
    caplog.set_level(logging.INFO)
    mix = mixed_dataset(tok, datasets=[EN, ZH], weights=[3, 1], stop=40)
    trained = [sum(sum(1 for x in s[i]["labels"] if x != IGNORE) for i in range(len(s))) for s in sources]
    # 30 English samples (8 rows: passes 3.75), 10 Chinese (6 rows)
    tokens = [0, 0]
    for src, row in mix.schedule:
        tokens[src] += sum(1 for x in sources[src][row]["labels"] if x != IGNORE)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("mixed_dataset: 40 samples"))
    assert "30 samples (75.0 %; 3.75 passes over 8 rows)" in line
    assert "10 samples (25.0 %; 1.67 passes over 6 rows)" in line
    assert f"{100 * tokens[0] / sum(tokens):.1f} % of trained tokens" in line
    assert sum(trained) > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": [3, -1]}, r"weights\[1\] is -1; weights must be numbers >= 0"),
    ({"weights": [1]}, r"2 datasets but 1 weights; give one weight per dataset"),
    ({"weights": [0, 0]}, r"every weight is 0"),
    ({"weights": "3:1"}, r"weights must be a list of numbers"),
    ({"weights": [1, 1], "stop": "longest"}, r"stop must be 'first_exhausted', 'all_exhausted' or a positive"),
    ({"weights": [1, 1], "stop": 0}, r"positive sample count, got 0"),
])
def test_bad_weights_or_stop_are_one_line_errors(tok, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        mixed_dataset(tok, datasets=[EN, ZH], **kwargs)
    assert "\n" not in str(info.value)


def test_a_source_that_is_neither_a_config_nor_a_dataset_is_refused(tok):
    with pytest.raises(ValueError, match=r"datasets\[1\] is str; expected a dataset config"):
        mixed_dataset(tok, datasets=[EN, "tests/assets/alpaca_zh_tiny.jsonl"], weights=[1, 1])


def test_a_packed_source_is_refused_with_the_fix(tok):
    with pytest.raises(ValueError, match=r"datasets\[1\] .* is packed; set packed: False on it and packed: True"):
        mixed_dataset(tok, datasets=[EN, {**ZH, "packed": True}], weights=[1, 1])


def test_a_source_error_names_its_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        mixed_dataset(tok, datasets=[EN, {**ZH, "data_files": str(tmp_path / "missing.jsonl")}], weights=[1, 1])


@pytest.mark.integration
def test_tiny_alpaca_mix_trains_packed_through_the_real_recipe_and_logs_its_shares(tiny_instruct, tmp_path):
    from tests.test_recipes_integration import logged_losses, tune_cpu, wait_ok

    out, log = tmp_path / "alpaca", tmp_path / "alpaca.log"
    wait_ok(tune_cpu([
        "lora_finetune_single_device", "--config", "configs/tiny/alpaca_en_zh_lora.yaml", f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tiny_instruct}", f"tokenizer.path={tiny_instruct}/original/tokenizer.model",
        "max_steps_per_epoch=1",
    ], log, nproc=None), log)
    text = log.read_text()
    assert "mixed_dataset: 15 samples (stop=all_exhausted, seed 2024)" in text
    assert "alpaca_dataset(tests/assets/alpaca_en_tiny.jsonl): 8 samples (53.3 %; 1.00 passes over 8 rows)" in text
    assert sorted(logged_losses(out)) == [1]


@pytest.mark.integration
def test_tiny_stage3_with_english_replay_trains_on_two_distributed_ranks(tiny_instruct, tmp_path):
    """The stage-3 twin with its replay share on: mixed_dataset under lora_finetune_distributed's sampler."""
    from tests.test_recipes_integration import logged_losses, tune_cpu, wait_ok

    out, log = tmp_path / "stage3", tmp_path / "stage3.log"
    wait_ok(tune_cpu([
        "lora_finetune_distributed", "--config", "configs/tiny/stage3_kolima_bilima_lora.yaml", f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tiny_instruct}", f"tokenizer.path={tiny_instruct}/original/tokenizer.model",
        "dataset.weights=[1,1,1,1]", "max_steps_per_epoch=1",
    ], log), log)
    text = log.read_text()
    # each rank builds the same mix (and tools.tune_cpu's pre-flight check builds it once more)
    assert text.count("mixed_dataset: 12 samples (stop=all_exhausted, seed 2024)") >= 2
    assert "kolima_dataset(tests/assets/lima_en_tiny.jsonl): 3 samples (25.0 %" in text
    assert sorted(logged_losses(out)) == [1]
