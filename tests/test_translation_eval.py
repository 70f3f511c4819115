"""Translation tasks through the real eval.run / lm_eval on tiny models, checked against the sacrebleu CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.run import main as eval_run
from kobllla.evaluation import SUITES, resolve_tasks
from kobllla.evaluation._translation import llama3_prompt
from tests.conftest import ASSETS, REPO, make_llama3_tokenizer

PAR = ASSETS / "parallel"
SACREBLEU = str(Path(sys.executable).parent / "sacrebleu")
KO_ZH, ZH_KO = "kobllla_translation_ko_zh", "kobllla_translation_zh_ko"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from kobllla.tiny_model import make_model

    root = tmp_path_factory.mktemp("mt-models")
    return {
        name: make_model(root / name, preset="mini", flavor="instruct", seed=seed, dtype="float32")
        for name, seed in (("a", 0), ("b", 1))
    }


@pytest.fixture(scope="module")
def run_records(models, tmp_path_factory) -> dict[str, dict]:
    """One real eval.run of both tiny models on the 8 held-out pairs, both directions, 8 new tokens each."""
    results = tmp_path_factory.mktemp("mt-results")
    proc = subprocess.run(
        [sys.executable, "-m", "eval.run", "--model", f"a={models['a']}", "--model", f"b={models['b']}",
         "--task", "kobllla_translation", "--translation-data", str(PAR), "--max-gen-toks", "8",
         "--device", "cpu", "--batch-size", "8", "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {}
    for path in sorted((results / "runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        records[record["label"]] = record
    records["_dir"] = results
    return records


def test_the_group_and_the_suite_name_both_directions():
    assert resolve_tasks(tasks=["kobllla_translation"]) == [KO_ZH, ZH_KO]
    assert SUITES["translation"] == [KO_ZH, ZH_KO]
    assert resolve_tasks(tasks=[ZH_KO]) == [ZH_KO]


def test_the_eval_prompt_is_the_training_prompt_token_for_token(models):
    """lm_eval's own encoding of our prompt == parallel_dataset's tokens up to the first trained one."""
    from lm_eval.models.huggingface import HFLM

    from kobllla.datasets import parallel_dataset

    lm = HFLM(pretrained=str(models["a"]), device="cpu", dtype="float32", batch_size=1)
    train = parallel_dataset(make_llama3_tokenizer(), source="moses", data_files=str(PAR / "train"),
                             directions=["ko-zh", "zh-ko"])
    ko, zh = (PAR / "train.ko").read_text("utf-8").splitlines(), (PAR / "train.zh").read_text("utf-8").splitlines()
    for index, prompt in ((0, llama3_prompt(ko[0], "ko", "zh")), (1, llama3_prompt(zh[0], "zh", "ko"))):
        sample = train[index]
        first_trained = next(i for i, x in enumerate(sample["labels"]) if x >= 0)
        # training's trained part starts with the assistant header; the prompt ends with it
        expected = sample["tokens"][: first_trained + 4]
        assert lm.tok_batch_encode([prompt])[0][0].tolist() == expected
        assert lm.tok_encode(prompt) == expected


def test_stored_chrf_and_bleu_equal_the_sacrebleu_cli_on_the_stored_hypotheses(run_records, tmp_path):
    for label in ("a", "b"):
        for task, tgt, tokenize in ((KO_ZH, "zh", "zh"), (ZH_KO, "ko", "13a")):
            entry = run_records[label]["tasks"][task]
            samples = entry["samples"]
            src = "ko" if tgt == "zh" else "zh"
            assert [s["source"] for s in samples] == (PAR / f"test.{src}").read_text("utf-8").splitlines()
            assert [s["reference"] for s in samples] == (PAR / f"test.{tgt}").read_text("utf-8").splitlines()
            assert any(s["hypothesis"] for s in samples)
            assert all("\n" not in s["hypothesis"] for s in samples)
            hyp, ref = tmp_path / f"{label}-{task}.hyp", PAR / f"test.{tgt}"
            hyp.write_text("".join(s["hypothesis"] + "\n" for s in samples), encoding="utf-8")
            chrf = subprocess.run([SACREBLEU, str(ref), "-i", str(hyp), "-m", "chrf", "--chrf-word-order", "2",
                                   "-b", "-w", "6"], capture_output=True, text=True, check=True).stdout
            bleu = subprocess.run([SACREBLEU, str(ref), "-i", str(hyp), "-m", "bleu", "-tok", tokenize,
                                   "-b", "-w", "6"], capture_output=True, text=True, check=True).stdout
            assert entry["metrics"]["chrf"]["value"] == pytest.approx(float(chrf), abs=1e-6)
            assert entry["metrics"]["bleu"]["value"] == pytest.approx(float(bleu), abs=1e-6)
            assert entry["metrics"]["chrf"]["higher_is_better"] is True
            assert entry["version"] == "1.0-max8" and entry["n_samples"]["effective"] == 8
            assert entry["data"]["files"][f"test.{tgt}"]["rows"] == 8


def test_translation_metrics_gate_like_any_other(run_records, tmp_path):
    # zh -> ko: random tiny models still match some Korean characters and punctuation (ko -> zh scores 0)
    a = run_records["a"]["tasks"][ZH_KO]["metrics"]["chrf"]["value"]
    b = run_records["b"]["tasks"][ZH_KO]["metrics"]["chrf"]["value"]
    assert a != b
    for tolerance in ("1.0", "0"):
        out = tmp_path / f"report-{tolerance}"
        proc = subprocess.run(
            [sys.executable, "-m", "eval.report", str(run_records["_dir"]), "--pair", "b=a", "--out", str(out),
             "--gate", f"{ZH_KO}/chrf={tolerance}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        failed = a - b > float(tolerance)
        assert proc.returncode == (1 if failed else 0), proc.stdout + proc.stderr
        assert f"gate {'FAIL' if failed else 'PASS'} {ZH_KO}/chrf" in (out / "report.md").read_text("utf-8")


def test_heldout_pairs_may_be_one_jsonl_file_and_its_hash_is_recorded(tmp_path):
    from kobllla.evaluation._translation import translation_source

    ko, zh = (PAR / "test.ko").read_text("utf-8").splitlines(), (PAR / "test.zh").read_text("utf-8").splitlines()
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps({"ko": k, "zh": z}, ensure_ascii=False) + "\n" for k, z in zip(ko, zh, strict=True)),
        encoding="utf-8")
    source = translation_source(ZH_KO, tmp_path)
    assert source["direction"] == "zh-ko" and source["max_gen_toks"] == 256
    assert list(source["files"]) == ["test.jsonl"] and source["files"]["test.jsonl"]["rows"] == 8
    (tmp_path / "test.jsonl").write_text(json.dumps({"ko": ko[0]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.jsonl line 1: field 'zh' is missing \(fields: ko\); every line needs"):
        translation_source(ZH_KO, tmp_path)


def copy_heldout(tmp_path: Path, ko: list[str] | None = None, zh: list[str] | None = None) -> Path:
    data = tmp_path / "heldout"
    data.mkdir()
    for lang, lines in (("ko", ko), ("zh", zh)):
        if lines is None:
            shutil.copy(PAR / f"test.{lang}", data / f"test.{lang}")
        else:
            (data / f"test.{lang}").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return data


@pytest.mark.parametrize(("case", "message"), [
    ("no-dir", r"kobllla_translation_ko_zh reads local held-out pairs: pass --translation-data DIR"),
    ("empty-dir", r"no held-out pairs for ko-zh; write test\.ko \+ test\.zh \(line-aligned\) or test\.jsonl"),
    ("short", r"test\.ko has 8 lines but .*test\.zh has 7; Moses pair files must be line-aligned"),
    ("empty-side", r"test\.ko/test\.zh line 3: the zh side is empty; every held-out pair needs both sentences"),
    ("max-gen", r"max_gen_toks must be a positive integer, got 0"),
])
def test_bad_translation_input_is_one_line_before_any_model_loads(models, tmp_path, capsys, case, message):
    zh = (PAR / "test.zh").read_text("utf-8").splitlines()
    args = ["--model", f"a={models['a']}", "--task", "kobllla_translation", "--device", "cpu",
            "--results-dir", str(tmp_path / "results")]
    if case == "empty-dir":
        (tmp_path / "nothing").mkdir()
        args += ["--translation-data", str(tmp_path / "nothing")]
    elif case == "short":
        args += ["--translation-data", str(copy_heldout(tmp_path, zh=zh[:-1]))]
    elif case == "empty-side":
        args += ["--translation-data", str(copy_heldout(tmp_path, zh=zh[:2] + [""] + zh[3:]))]
    elif case == "max-gen":
        args += ["--translation-data", str(PAR), "--max-gen-toks", "0"]
    assert eval_run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "results").exists()
