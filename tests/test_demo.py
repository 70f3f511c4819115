"""The main job end to end: `run_demo` on a fresh directory, then the method's predictions.

One run of every stage (real recipes, real chat vector, real lm-eval, real generation) on the mini
model, seed 0 (docs/benchmarks.md records seeds 0-2). The predictions are asserted as the method
states them; if one fails at this scale the report says so and this test fails with the numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kobllla.corpora import english_documents, korean_documents, split_heldout
from kobllla.demo import run_demo
from kobllla.demo._pipeline import MARKER
from kobllla.jsonl import iter_jsonl

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
STAGES = ["data", "init", "base", "instruct", "stage1", "chat_vector", "stage3", "eval", "samples"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    return run_dir, run_demo(run_dir, config_dir=REPO / "configs" / "demo")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "report" / "summary.json").read_text(encoding="utf-8"))


def _csv_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def test_demo_writes_a_readable_report_with_plots_and_samples(demo):
    run_dir, result = demo
    report = result.report.read_text(encoding="utf-8")
    for heading in ("## Did the method do what it predicts?", "## Scores", "## Samples", "## What each stage did",
                    "## Commands"):
        assert heading in report
    for png in ("losses.png", "metrics.png", "gate/report.png"):
        assert (run_dir / "report" / png).stat().st_size > 10_000
    assert [s["name"] for s in _summary(run_dir)["stages"]] == STAGES


def test_the_method_moves_the_numbers_the_way_it_predicts(demo):
    _, result = demo
    failed = [f"{c.claim}: {c.detail}" for c in result.checks if not c.passed]
    assert not failed, "\n".join(failed)
    assert len(result.checks) == 5


def test_the_mc2_gate_passes_for_all_three_pairs(demo):
    run_dir, result = demo
    gates = _summary(run_dir)["gate"]
    assert len(gates) == 3 and result.gate_passed, "\n".join(gates)


def test_the_base_is_english_first_with_a_small_korean_share_and_no_stage_saw_held_out_text(demo):
    run_dir, _ = demo
    info = _summary(run_dir)["stages"][0]["info"]
    assert 0.05 <= info["base_ko_share"] <= 0.10
    data = run_dir / "data"
    texts = _csv_texts(data / "base_train.csv") + _csv_texts(data / "stage1_train.csv")
    for name in ("kolima_train.jsonl", "en_qa_train.jsonl"):
        texts += [turn for _, row in iter_jsonl(data / name) for turn in row["conversations"]]
    texts += [turn for _, row in iter_jsonl(data / "bilima_demo.jsonl") for turn in row["en"] + row["ko"]]
    trained = "\n".join(texts)
    _, ko_held = split_heldout(korean_documents())
    _, en_held = split_heldout(english_documents())
    scored = "".join((data / f"{lang}_heldout.txt").read_text(encoding="utf-8") for lang in ("ko", "en"))
    held = [d.text for d in ko_held + en_held if d.text in scored]
    assert len(held) >= 4 and not [h[:60] for h in held if h in trained]
    answers = [row["conversations"][1] for _, row in iter_jsonl(data / "kolima_heldout.jsonl")]
    assert answers and not [a[:60] for a in answers if a in trained]


def test_chat_models_stop_at_eot_and_answer_in_samples(demo):
    run_dir, _ = demo
    for stage in ("instruct", "chat_vector", "stage3"):
        ckpt = Path(json.loads((run_dir / stage / MARKER).read_text())["outputs"]["checkpoint"])
        assert json.loads((ckpt / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>"
        assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] == 128009
    records = [row for _, row in iter_jsonl(run_dir / "samples" / "samples" / "samples.jsonl")]
    assert {r["model"] for r in records} == {"base", "stage1", "instruct", "chat_vector", "stage3"}
    chat = ("instruct", "chat_vector", "stage3")
    chat_stops = [r for r in records if r["model"] in chat and r["stop_reason"] == "eos"]
    assert chat_stops and all(r["token_ids"][-1] == 128009 for r in chat_stops)  # <|eot_id|>: the template's turn end
    assert all(r["lang"] in ("ko", "en", None) and "speech_level" in r for r in records)


def test_every_training_setting_comes_from_the_shipped_yaml(demo):
    run_dir, _ = demo
    for stage, name in (("base", "stage0_pretrain_en_full"), ("instruct", "stage0_instruct_en_full"),
                        ("stage1", "stage1_kowiki_lora"), ("stage3", "stage3_kolima_bilima_lora")):
        shipped = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "demo" / f"{name}.yaml"))
        used = OmegaConf.to_container(OmegaConf.load(run_dir / stage / "config.yaml"))
        for key in ("model", "optimizer", "lr_scheduler", "epochs", "max_steps_per_epoch", "batch_size"):
            assert used[key] == shipped[key], (stage, key)
    stage1 = OmegaConf.load(run_dir / "stage1" / "config.yaml")
    replay = (run_dir / "data" / "stage1_train.csv").resolve()  # the Korean text + the English replay
    assert Path(stage1.dataset.data_files) == replay


def test_training_stages_lowered_their_loss(demo):
    run_dir, _ = demo
    for name in ("base", "instruct", "stage1", "stage3"):
        losses = json.loads((run_dir / name / MARKER).read_text())["info"]["losses"]
        assert losses[-1][1] < losses[0][1], f"{name}: {losses[0]} -> {losses[-1]}"


def test_a_rerun_reuses_finished_stages_and_redoes_an_unfinished_one_with_the_same_answers(demo):
    run_dir, _ = demo
    samples = run_dir / "samples" / "samples" / "samples.jsonl"
    answers = lambda: [{k: v for k, v in row.items() if k != "seconds"} for _, row in iter_jsonl(samples)]  # noqa: E731
    before = answers()
    (run_dir / "samples" / MARKER).unlink()  # as if killed while the models were answering
    run_demo(run_dir, config_dir=REPO / "configs" / "demo")
    reused = {s["name"]: s["reused"] for s in _summary(run_dir)["stages"]}
    assert reused == {**{name: True for name in STAGES[:-1]}, "samples": False}
    assert answers() == before  # sampled with a seed per prompt: the same answers again
    run_demo(run_dir, config_dir=REPO / "configs" / "demo")
    assert all(s["reused"] for s in _summary(run_dir)["stages"])


def test_a_run_dir_of_another_seed_is_refused(demo):
    run_dir, _ = demo
    with pytest.raises(ValueError, match="holds the run of seed 0, not 1"):
        run_demo(run_dir, seed=1, config_dir=REPO / "configs" / "demo")
