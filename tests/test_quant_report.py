"""The quantization report: perplexity, KL and top-1 agreement per quant and language, on real llama.cpp runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import quant_report as cli

pytest_plugins = ["tests._gguf_fixtures"]

HELDOUT = Path(__file__).resolve().parent / "assets" / "eval" / "heldout"


@pytest.fixture(scope="module")
def report(mini_export, trained_mini, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant-report") / "report"
    assert cli.main(["--model", str(trained_mini), "--gguf", str(mini_export), "--heldout", f"ko={HELDOUT / 'ko.txt'}",
                     "--heldout", f"en={HELDOUT / 'en.txt'}", "--out", str(out), "--ctx", "64"]) == 0
    return out


def test_report_scores_every_quant_in_both_languages(report, mini_export):
    result = json.loads((report / "report.json").read_text())
    rows = {(r["quant"], r["lang"]): r for r in result["rows"]}
    assert set(rows) == {(q, lang) for q in ("hf-fp32", "f32", "f16", "q8_0") for lang in ("ko", "en")}
    manifest = json.loads((mini_export / "kobllla_manifest.json").read_text())
    for name, facts in manifest["outputs"].items():
        assert rows[(facts["quant"], "ko")]["bytes"] == facts["bytes"] == (mini_export / name).stat().st_size
    for lang in ("ko", "en"):
        kl = [rows[(q, lang)]["mean_kl"] for q in ("f32", "f16", "q8_0")]
        assert kl[0] < kl[1] < kl[2] < 0.05, kl  # fewer bits, further from the float32 model
        assert rows[("f32", lang)]["top1_agreement"] == 1.0
        assert abs(rows[("f32", lang)]["perplexity_change"]) < 1e-3
        assert rows[("q8_0", lang)]["tokens"] == rows[("hf-fp32", lang)]["tokens"] > 50
    assert sorted(p.name for p in report.iterdir()) == ["report.json", "report.md", "report.png"]
    md = (report / "report.md").read_text()
    assert "| q8_0 |" in md and "## Korean vs English" in md and "**q8_0**: Korean perplexity" in md


def test_reference_perplexity_equals_kobllla_evaluation_on_the_same_windows(report, trained_mini):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kobllla.evaluation import perplexity_of_texts, read_heldout

    result = json.loads((report / "report.json").read_text())
    ref = {r["lang"]: r for r in result["rows"] if r["quant"] == "hf-fp32"}
    model = AutoModelForCausalLM.from_pretrained(trained_mini, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(trained_mini)
    for lang in ("ko", "en"):
        theirs = perplexity_of_texts(model, tok, read_heldout(HELDOUT / f"{lang}.txt"), max_length=64)
        assert theirs["tokens"] == ref[lang]["tokens"]
        assert theirs["token_ppl"] == pytest.approx(ref[lang]["perplexity"], rel=1e-4)


def test_a_barely_trained_reference_is_called_what_it_is(report):
    md = (report / "report.md").read_text()
    ppl = {r["lang"]: r["perplexity"] for r in json.loads((report / "report.json").read_text())["rows"]
           if r["quant"] == "hf-fp32"}
    if max(ppl.values()) > 128256 / 4:
        assert "(near-)random weights and predicts nothing" in md
    assert "Few scored tokens" in md  # the fixtures are ~150 tokens per language


@pytest.mark.parametrize("args, match", [
    (["--heldout", "ko"], r"--heldout ko: expected LANG=FILE"),
    (["--heldout", "ko=/nonexistent/ko.txt"], r"held-out text /nonexistent/ko.txt does not exist"),
    (["--heldout", "ko=X", "--heldout", "ko=Y"], r"--heldout ko given twice"),
    ([], r"no --heldout LANG=FILE given"),
])
def test_bad_input_one_line_exit_2(args, match, mini_export, trained_mini, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["--model", str(trained_mini), "--gguf", str(mini_export), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err
    assert not out.exists()


def test_gguf_dir_without_manifest_is_refused(trained_mini, tmp_path, capsys):
    assert cli.main(["--model", str(trained_mini), "--gguf", str(tmp_path), "--heldout", f"ko={HELDOUT / 'ko.txt'}",
                     "--out", str(tmp_path / "r")]) == 2
    assert "no kobllla_manifest.json; pass the --out directory of tools.export_gguf" in capsys.readouterr().err
