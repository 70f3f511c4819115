"""The runner on a real tiny Llama 3 checkpoint and our fixture files, offline.

Scores are checked against independent computations with transformers: TruthfulQA MC2 as the
normalised probability mass on the true answers, MC1 and KoBEST BoolQ as argmax accuracy, and
held-out perplexity as exp of the model's own loss.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import report as report_cli
from eval import run as run_cli
from kobllla.evaluation import (
    compare_runs,
    evaluate_model,
    load_history,
    load_runs,
    perplexity,
    perplexity_of_texts,
    read_heldout,
    write_report,
)
from kobllla.tiny_model import make_model

ASSETS = Path(__file__).parent / "assets" / "eval"
DATA = ASSETS / "data"
TQA = DATA / "truthfulqa" / "truthful_qa" / "multiple_choice" / "validation.jsonl"
BOOLQ = DATA / "skt" / "kobest_v1" / "boolq" / "test.jsonl"
HELDOUT = {"ko": ASSETS / "heldout" / "ko.txt", "en": ASSETS / "heldout" / "en.txt"}

# TruthfulQA's fixed 6-shot QA preamble (Lin et al. 2021), written out here so the check does
# not read lm_eval's template.
QA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return {
        "base": make_model(root / "base", dtype="float32", seed=0),
        "other": make_model(root / "other", dtype="float32", seed=1),
    }


@pytest.fixture(scope="module")
def results(models, tmp_path_factory) -> Path:
    """One CLI run of the base model on every fixture task plus held-out text, and a small run of another."""
    out = tmp_path_factory.mktemp("eval-results")
    rc = run_cli.main([
        "--model", f"base={models['base']}", "--suite", "english_retention",
        "--task", "kobest_boolq", "--task", "kobest_copa", "--task", "haerae_general_knowledge",
        "--data-dir", str(DATA), "--heldout", f"ko={HELDOUT['ko']}", "--heldout", f"en={HELDOUT['en']}",
        "--device", "cpu", "--batch-size", "4", "--results-dir", str(out),
    ])
    assert rc == 0
    evaluate_model(models["other"], label="other", tasks=["truthfulqa_mc2"], data_dir=DATA, device="cpu",
                   batch_size=4, results_dir=out)
    return out


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(models["base"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_LL_CACHE: dict[tuple[str, str], float] = {}


@torch.inference_mode()
def _loglikelihood(hf, context: str, continuation: str) -> float:
    """log p(continuation | context): BOS + context tokens, then the tokens the whole string adds."""
    if (context, continuation) not in _LL_CACHE:
        model, tok = hf
        ctx = tok(context)["input_ids"]
        whole = tok(context + continuation)["input_ids"]
        assert whole[: len(ctx)] == ctx
        logits = model(torch.tensor([whole])).logits[0, len(ctx) - 1 : len(whole) - 1]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(whole[len(ctx) :])
        _LL_CACHE[(context, continuation)] = logprobs.gather(1, targets[:, None]).sum().item()
    return _LL_CACHE[(context, continuation)]


def _tqa_context(question: str) -> str:
    return f"{QA_PROMPT}\n\nQ: {question}\nA:"


def _base_record(results: Path) -> dict:
    return load_runs([results])["base"]


def test_truthfulqa_mc2_equals_true_answer_probability_mass_from_the_models_own_loglikelihoods(results, hf):
    per_question = []
    for row in _rows(TQA):
        lls = np.array([_loglikelihood(hf, _tqa_context(row["question"]), " " + c)
                        for c in row["mc2_targets"]["choices"]])
        probs = np.exp(lls - lls.max())
        per_question.append(probs[np.array(row["mc2_targets"]["labels"]) == 1].sum() / probs.sum())
    expected = float(np.mean(per_question))
    stored = _base_record(results)["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]
    assert stored["value"] == pytest.approx(expected, abs=1e-5)
    assert stored["stderr"] == pytest.approx(np.std(per_question, ddof=1) / math.sqrt(len(per_question)), abs=1e-5)


def test_truthfulqa_mc1_and_kobest_boolq_are_argmax_accuracy_of_the_same_loglikelihoods(results, hf):
    mc1 = [int(np.argmax([_loglikelihood(hf, _tqa_context(r["question"]), " " + c)
                          for c in r["mc1_targets"]["choices"]]) == 0)
           for r in _rows(TQA)]
    # kobest_boolq prompt "{paragraph} 질문: {question} 답변: "; lm_eval moves its trailing space into the answer
    boolq = [int(np.argmax([_loglikelihood(hf, f"{r['paragraph']} 질문: {r['question']} 답변:", "  " + c)
                            for c in ("아니오", "예")]) == r["label"]) for r in _rows(BOOLQ)]
    tasks = _base_record(results)["tasks"]
    assert tasks["truthfulqa_mc1"]["metrics"]["acc"]["value"] == pytest.approx(np.mean(mc1))
    assert tasks["kobest_boolq"]["metrics"]["acc"]["value"] == pytest.approx(np.mean(boolq))


def test_run_record_carries_versions_nshot_samples_data_hashes_and_the_checkpoint_fingerprint(results, models):
    record = _base_record(results)
    tasks = record["tasks"]
    assert sorted(tasks) == sorted(["truthfulqa_mc2", "truthfulqa_mc1", "kobest_boolq", "kobest_copa",
                                    "haerae_general_knowledge", "heldout_ko", "heldout_en"])
    assert tasks["truthfulqa_mc2"]["version"] == 3.0 and tasks["truthfulqa_mc1"]["version"] == 2.0
    assert tasks["kobest_copa"]["version"] == 1.0 and tasks["haerae_general_knowledge"]["n_shot"] == 0
    assert tasks["truthfulqa_mc2"]["n_samples"] == {"original": 4, "effective": 4}
    assert tasks["kobest_copa"]["n_samples"] == {"original": 3, "effective": 3}
    assert tasks["kobest_boolq"]["data"]["files"]["test"]["rows"] == 4
    assert len(tasks["kobest_boolq"]["data"]["files"]["test"]["sha256"]) == 64
    assert record["versions"]["lm_eval"] == "0.4.13"
    assert record["model"]["spec"] == str(models["base"].resolve())
    assert record["model"]["fingerprint"].startswith("sha256-sampled:") and len(record["model"]["fingerprint"]) == 79
    other = load_runs([results])["other"]
    assert other["model"]["fingerprint"] != record["model"]["fingerprint"]  # seed 1 vs seed 0 weights
    history = load_history(results)
    assert [h["label"] for h in history] == ["base", "other"]
    assert history[0]["scores"]["truthfulqa_mc2/acc"] == tasks["truthfulqa_mc2"]["metrics"]["acc"]["value"]


def test_heldout_perplexity_in_the_run_is_exp_of_the_models_mean_loss_over_each_document(results, hf):
    model, tok = hf
    record = _base_record(results)
    for lang, path in HELDOUT.items():
        nll, n = 0.0, 0
        for doc in read_heldout(path):
            ids = torch.tensor([tok(doc)["input_ids"]])
            with torch.inference_mode():
                loss = model(ids, labels=ids).loss.item()
            nll, n = nll + loss * (ids.shape[1] - 1), n + ids.shape[1] - 1
        entry = record["tasks"][f"heldout_{lang}"]
        assert entry["counts"]["tokens"] == n
        assert entry["metrics"]["token_ppl"]["value"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        n_bytes = len("".join(read_heldout(path)).encode("utf-8"))
        assert entry["metrics"]["bits_per_byte"]["value"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_perplexity_windows_score_each_token_once_and_a_fitting_document_gets_full_context(hf):
    model, tok = hf
    doc = read_heldout(HELDOUT["en"])[0]
    n_ids = len(tok(doc)["input_ids"])
    full = perplexity_of_texts(model, tok, [doc], max_length=n_ids)
    strided = perplexity_of_texts(model, tok, [doc], max_length=n_ids, stride=5)
    short = perplexity_of_texts(model, tok, [doc], max_length=8)
    assert full["tokens"] == strided["tokens"] == short["tokens"] == n_ids - 1
    assert strided["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert short["nll"] != pytest.approx(full["nll"], rel=1e-3)  # 7-token context changes the score


def test_perplexity_library_function_loads_a_checkpoint_and_scores_each_language(models, results):
    scores = perplexity(models["base"], {"ko": HELDOUT["ko"], "en": [read_heldout(HELDOUT["en"])[0]]})
    stored = _base_record(results)["tasks"]["heldout_ko"]["metrics"]["token_ppl"]["value"]
    assert scores["ko"]["token_ppl"] == pytest.approx(stored, rel=1e-5)
    assert scores["en"]["documents"] == 1


def test_report_from_stored_runs_renders_markdown_and_png_and_gates_on_real_scores(results, tmp_path, capsys):
    runs = load_runs([results])
    base = runs["base"]["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]["value"]
    other = runs["other"]["tasks"]["truthfulqa_mc2"]["metrics"]["acc"]["value"]
    drop = base - other
    loose, tight = abs(drop) + 0.001, max(0.0, drop - 0.001)
    rc_loose = report_cli.main([str(results), "--pair", "other=base", "--gate", f"truthfulqa_mc2/acc={loose}",
                                "--out", str(tmp_path / "loose")])
    assert rc_loose == 0
    md = (tmp_path / "loose" / "report.md").read_text(encoding="utf-8")
    assert f"| other | base | {other:.4f} ± " in md and f"({other - base:+.4f})" in md
    assert (tmp_path / "loose" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if drop > 0.001:  # seed 1 scored lower: a tolerance under the drop must fail
        rc_tight = report_cli.main([str(results), "--pair", "other=base", "--gate", f"truthfulqa_mc2/acc={tight}",
                                    "--out", str(tmp_path / "tight")])
        assert rc_tight == 1
    else:  # seed 1 scored higher: swapping the roles makes it a drop
        rc_tight = report_cli.main([str(results), "--pair", "base=other",
                                    "--gate", f"truthfulqa_mc2/acc={max(0.0, -drop - 0.001)}",
                                    "--out", str(tmp_path / "tight")])
        assert rc_tight == 1
    assert "gate FAIL truthfulqa_mc2/acc" in capsys.readouterr().err


def test_a_limit_run_is_refused_against_a_full_run(models, results, tmp_path):
    limited = evaluate_model(models["other"], label="other-limit2", tasks=["truthfulqa_mc2"], data_dir=DATA,
                             device="cpu", batch_size=4, limit=2, results_dir=tmp_path)
    assert limited["tasks"]["truthfulqa_mc2"]["n_samples"] == {"original": 4, "effective": 2}
    runs = load_runs([results, tmp_path])
    with pytest.raises(ValueError, match=r"refusing to compare other-limit2 with base on truthfulqa_mc2: "
                                         r"samples differs \(2 in .* vs 4 in"):
        compare_runs(runs, pairs=[("other-limit2", "base")])


# --- bad input: one line, raised before any model loads, nothing written -----------------------------------


def test_missing_checkpoint_dir_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    rc = run_cli.main(["--model", f"x={tmp_path / 'nope'}", "--suite", "english_retention", "--data-dir", str(DATA),
                       "--results-dir", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"checkpoint dir {tmp_path / 'nope'} does not exist" in err
    assert not (tmp_path / "res").exists()


def test_checkpoint_without_tokenizer_files_is_refused_with_the_fix(models, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(models["base"] / "config.json", bare)
    (bare / "model.safetensors").symlink_to(models["base"] / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files .*cp BASE_DIR/tokenizer\*\.json"):
        evaluate_model(bare, label="bare", suites=["english_retention"], data_dir=DATA, device="cpu")


def test_checkpoint_without_weights_is_refused(models, tmp_path):
    bare = tmp_path / "noweights"
    bare.mkdir()
    shutil.copy(models["base"] / "config.json", bare)
    with pytest.raises(FileNotFoundError, match=r"has no weights \(\*\.safetensors or \*\.bin\)"):
        evaluate_model(bare, label="x", suites=["english_retention"], data_dir=DATA, device="cpu")


def test_unknown_suite_and_task_list_the_valid_names(models):
    with pytest.raises(ValueError, match=r"unknown suite 'englsh'; choose from \['english_retention', 'haerae', "):
        evaluate_model(models["base"], label="x", suites=["englsh"], device="cpu")
    with pytest.raises(ValueError,
                       match=r"unknown task 'kobest_bool'; known tasks: truthfulqa_mc1, truthfulqa_mc2, kobest_boolq"):
        evaluate_model(models["base"], label="x", tasks=["kobest_bool"], device="cpu")


def test_malformed_local_row_names_file_row_and_field(models, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    path = data / "truthfulqa" / "truthful_qa" / "multiple_choice" / "validation.jsonl"
    rows = _rows(path)
    rows[1]["mc2_targets"]["labels"] = rows[1]["mc2_targets"]["labels"][:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError,
                       match=r"validation\.jsonl line 2: field 'mc2_targets\.labels' has 3 labels for 4 choices"):
        evaluate_model(models["base"], label="x", suites=["english_retention"], data_dir=data, device="cpu",
                       results_dir=tmp_path / "res")
    assert not (tmp_path / "res").exists()


def test_missing_local_split_says_where_it_is_expected_and_how_to_write_it(models, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"kobest_wic: no local test split at .*skt/kobest_v1/wic/test\.jsonl; "
                                                r".*load_dataset\('skt/kobest_v1', 'wic'"):
        evaluate_model(models["base"], label="x", tasks=["kobest_wic"], data_dir=DATA, device="cpu")


def test_write_report_library_call_matches_the_cli_output(results, tmp_path):
    runs = load_runs([results])
    comparison = compare_runs(runs, pairs=[("other", "base")], gates={"truthfulqa_mc2/acc": 0.01})
    paths = write_report(comparison, tmp_path / "lib", runs)
    rc = report_cli.main([str(results), "--pair", "other=base", "--gate", "truthfulqa_mc2/acc=0.01",
                          "--out", str(tmp_path / "cli")])
    gate = comparison.gates[0]
    assert comparison.passed == (gate.candidate_value - gate.baseline_value >= -0.01 - 1e-9)
    assert rc == (0 if comparison.passed else 1)
    assert (tmp_path / "cli" / "report.md").read_text() == paths["markdown"].read_text()
    assert json.loads((tmp_path / "cli" / "comparison.json").read_text()) == json.loads(paths["manifest"].read_text())


def test_shared_prefix_scorer_gives_lm_evals_scores_on_every_fixture_task(models, results, tmp_path):
    fast = evaluate_model(models["base"], label="base-fast", suites=["english_retention"],
                          tasks=["kobest_boolq", "kobest_copa", "haerae_general_knowledge"], data_dir=DATA,
                          device="cpu", batch_size=4, scorer="shared_prefix")
    reference = _base_record(results)["tasks"]
    assert fast["model"]["scorer"] == "shared_prefix"
    assert fast["model"]["fingerprint"] == _base_record(results)["model"]["fingerprint"]
    for task, entry in fast["tasks"].items():
        for metric, score in entry["metrics"].items():
            expected = reference[task]["metrics"][metric]["value"]
            assert score["value"] == pytest.approx(expected, abs=1e-6), (task, metric)


def test_packed_row_shares_the_context_and_each_answer_sees_only_itself():
    from kobllla.evaluation._shared_prefix import pack_group, packed_mask

    ids, pos, spans = pack_group([1, 2, 3], [[7, 8], [9]])
    assert ids == [1, 2, 3, 7, 3]  # context[:-1], then [ctx[-1]] + answer[:-1] per answer
    assert pos == [0, 1, 2, 3, 2]
    assert spans == [(2, 2), (4, 1)]
    assert packed_mask(2, spans, 6).int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only
    ]


def test_fingerprint_changes_with_one_byte_and_names_its_mode(tmp_path):
    from kobllla.evaluation._checkpoint import fingerprint_files

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(4096))
    files = [tmp_path / "config.json", weights]
    sampled, full = fingerprint_files(files, tmp_path), fingerprint_files(files, tmp_path, mode="full")
    assert sampled.startswith("sha256-sampled:") and full.startswith("sha256:")
    weights.write_bytes(bytes(4095) + b"\x01")
    assert fingerprint_files(files, tmp_path) != sampled  # files under 64 MiB are hashed whole
    assert fingerprint_files(files, tmp_path, mode="full") != full


def test_plan_evaluates_every_model_then_reports(models, tmp_path):
    from kobllla.evaluation import run_plan

    plan = {"models": {"base": str(models["base"]), "other": str(models["other"])}, "tasks": ["truthfulqa_mc2"],
            "data_dir": str(DATA), "limit": 1, "device": "cpu", "batch_size": 4, "results_dir": str(tmp_path / "res"),
            "report_dir": str(tmp_path / "report"), "compare": {"other": "base"}, "gates": {"truthfulqa_mc2/acc": 1.0}}
    comparison = run_plan(plan)
    assert comparison.passed and [g.candidate for g in comparison.gates] == ["other"]
    assert [h["label"] for h in load_history(tmp_path / "res")] == ["base", "other"]
    assert (tmp_path / "report" / "comparison.json").is_file()


def test_missing_local_files_of_a_suite_are_listed_in_one_error(models):
    with pytest.raises(FileNotFoundError, match=r"12 of 15 tasks have no local data: "
                                                r"kobest_hellaswag \(.*hellaswag/test\.jsonl\), kobest_sentineg"):
        evaluate_model(models["base"], label="x", suites=["korean"], data_dir=DATA, device="cpu")
