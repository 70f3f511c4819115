"""eval.samples: every model answers the same prompts; the metrics come from the real answers."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from kobllla.evaluation import answer_metrics, parse_named_dirs, read_sample_prompts, summarize, write_samples
from kobllla.korean import speech_level

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "eval" / "prompts"
HELDOUT_KO = REPO / "tests" / "assets" / "eval" / "heldout" / "ko.txt"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict[str, Path]:
    from kobllla.tiny_model import make_model

    root = tmp_path_factory.mktemp("sample-models")
    return {f"m{seed}": make_model(root / f"m{seed}", preset="mini", flavor="instruct", seed=seed, dtype="float32")
            for seed in (0, 1)}


def _write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


THREE = [
    {"id": "k1", "kind": "ko", "messages": [{"role": "user", "content": "한국의 수도가 어디야?"}]},
    {"id": "e1", "expect_lang": "en", "messages": [{"role": "user", "content": "What is the capital of Korea?"}]},
    {"id": "r1", "kind": "ko_en", "prompt": "Seoul is"},
]


# --- the shipped prompts -----------------------------------------------------------------------------------


def test_shipped_prompts_cover_four_kinds_and_ask_korean_in_banmal():
    rows = read_sample_prompts(PROMPTS)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"ko", "en", "en_ko", "ko_en"}
    assert {r["kind"]: r["expect_lang"] for r in rows} == {"ko": "ko", "en": "en", "en_ko": "ko", "ko_en": "en"}
    korean_questions = [r["messages"][-1]["content"] for r in rows if r["kind"] in ("ko", "ko_en")]
    assert korean_questions and all(speech_level(q) == "banmal" for q in korean_questions)  # KoLIMA's user


# --- metrics on fixed strings ------------------------------------------------------------------------------


def test_answer_metrics_of_a_jondaetmal_korean_answer():
    m = answer_metrics("서울입니다. 한국의 수도예요.", "ko")
    assert m == {"hangul_share": 1.0, "lang": "ko", "lang_match": True, "speech_level": "jondaetmal",
                 "jondaetmal_sentences": 2, "banmal_sentences": 0}


def test_answer_metrics_of_banmal_and_of_english_answers():
    assert answer_metrics("서울이야. 진짜 커.", "ko")["speech_level"] == "banmal"
    english = answer_metrics("Seoul is the capital.", "ko")
    assert english["lang"] == "en" and english["lang_match"] is False and english["speech_level"] is None
    assert answer_metrics("Seoul (서울)", "en")["hangul_share"] == pytest.approx(2 / 7, abs=1e-4)
    assert answer_metrics("", "en") == {"hangul_share": None, "lang": None, "lang_match": False,
                                         "speech_level": None, "jondaetmal_sentences": None, "banmal_sentences": None}


def test_markdown_code_is_left_out_of_the_language_and_speech_level():
    answer = "슬라이스를 쓰면 돼요.\n\n```python\nreversed_numbers = numbers[::-1]\nprint(reversed_numbers)\n```\n" \
             "`reversed()` 함수도 있어요."
    m = answer_metrics(answer, "ko")
    assert (m["hangul_share"], m["lang"], m["speech_level"], m["jondaetmal_sentences"]) == (1.0, "ko", "jondaetmal", 2)
    assert answer_metrics("`print(1)`", "en")["lang"] == "en"  # code only: measured on the code


def test_summary_rates_count_korean_answers_without_a_final_ending_as_not_jondaetmal():
    texts = [("서울입니다.", "ko", "eos"), ("서울이야.", "ko", "eos"), ("서울", "ko", "max_new_tokens"),
             ("Seoul.", "ko", "eos")]
    recs = [{"model": "a", "stop_reason": stop, "new_tokens": 3, **answer_metrics(t, lang)} for t, lang, stop in texts]
    s = summarize(recs, ["a"])["a"]
    assert (s["expected_lang"], s["korean_answers"], s["jondaetmal"], s["stopped"]) == (3, 3, 1, 3)
    assert s["expected_lang_rate"] == 0.75 and s["jondaetmal_rate"] == pytest.approx(0.3333)
    assert s["stopped_rate"] == 0.75


# --- real generation on two tiny models --------------------------------------------------------------------


def _hangul_latin_by_unicode_names(text: str) -> tuple[int, int]:
    """An independent count: Unicode character names, not code point ranges."""
    names = [unicodedata.name(ch, "") for ch in text if ch.isalpha()]
    return sum(n.startswith("HANGUL") for n in names), sum(n.startswith("LATIN") for n in names)


def test_samples_of_two_models_side_by_side_with_metrics_from_the_real_answers(two_models, tmp_path):
    from transformers import AutoTokenizer

    from kobllla.generation import GenerationOptions

    prompts = _write_prompts(tmp_path / "p.jsonl", THREE)
    rows = read_sample_prompts(prompts)
    out = tmp_path / "samples"
    summary = write_samples(two_models, rows, GenerationOptions(max_new_tokens=6, batch_size=2), out,
                            prompts=prompts, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["samples.html", "samples.jsonl", "samples.md", "summary.json"]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["model"], r["id"]) for r in records] == [(m, i) for m in ("m0", "m1") for i in ("k1", "e1", "r1")]
    tok = AutoTokenizer.from_pretrained(str(two_models["m0"]))
    checked = 0
    for rec in records:
        body = rec["token_ids"][:-1] if rec["stop_reason"] == "eos" else rec["token_ids"]
        assert rec["text"] == tok.decode(body, skip_special_tokens=True)
        assert rec["new_tokens"] == len(rec["token_ids"]) and 1 <= rec["new_tokens"] <= 6
        if "`" in rec["text"] or "~~~" in rec["text"]:
            continue  # Markdown code is left out of the measure: tested on fixed strings
        checked += 1
        hangul, latin = _hangul_latin_by_unicode_names(rec["text"])
        expected = None if hangul + latin == 0 else round(hangul / (hangul + latin), 4)
        assert rec["hangul_share"] == expected, rec["text"]
    assert checked >= 4
    assert {r["expect_lang"] for r in records if r["id"] == "r1"} == {"en"}  # taken from kind ko_en
    assert summary["models"] == summarize(records, ["m0", "m1"])
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    md = (out / "samples.md").read_text(encoding="utf-8")
    assert "| m0 | m1 |" in md and "## k1 (ko, answer expected in ko)" in md and "> 한국의 수도가 어디야?" in md
    html = (out / "samples.html").read_text(encoding="utf-8")
    assert html.count("<h2>") == 3 and "<th>m0</th><th>m1</th>" in html
    for rec in records:
        cell = rec["text"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert cell.replace('"', "&quot;").replace("'", "&#x27;") in html


def test_html_and_markdown_escape_the_answers(tmp_path):
    from kobllla.evaluation._samples import render_html, render_markdown, summarize

    row = {"id": "x", "kind": "en", "expect_lang": "en", "messages": [{"role": "user", "content": "<b>hi</b>"}]}
    rec = {"id": "x", "model": "a", "text": "<script>alert(1)</script> a|b\nline 2", "stop_reason": "eos",
           "new_tokens": 5, **answer_metrics("<script>", "en")}
    summary = {"models": summarize([rec], ["a"]), "prompts": 1, "options": {"max_new_tokens": 5, "temperature": 0}}
    page = render_html([rec], [row], summary)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;hi" in page
    md = render_markdown([rec], [row], summary)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a\\|b<br>line 2" in md


def test_cli_writes_the_samples_of_two_named_models(two_models, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", THREE[:2])
    out = tmp_path / "cli-out"
    proc = subprocess.run([sys.executable, "-m", "eval.samples", "--model", f"a={two_models['m0']}", "--model",
                           f"b={two_models['m1']}", "--prompts", str(prompts), "--max-new-tokens", "3",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "a: expected language" in proc.stdout and (out / "samples.html").is_file()
    assert len((out / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == 4


# --- bad input ---------------------------------------------------------------------------------------------


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from eval.samples import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": 1, "messages": [{"role": "user", "content": "hi"}]}],
         r"p\.jsonl: line 1: field 'expect_lang' is missing \(and no 'kind' to take it from\); add"),
        ([{"id": 1, "expect_lang": "fr", "prompt": "x"}], r"p\.jsonl: line 1: field 'expect_lang' is 'fr'; use"),
        ([{"id": 1, "kind": "ko"}, ], r"p\.jsonl: line 1: row 1 has neither of 'messages' and 'prompt'"),
        ([{"id": 1, "kind": "ja", "prompt": "x"}], r"p\.jsonl: line 1: field 'kind' is 'ja'; use one of ko, en, "),
    ],
)
def test_bad_prompt_rows_are_refused_in_one_line(tmp_path, capsys, two_models, rows, message):
    prompts = _write_prompts(tmp_path / "p.jsonl", rows)
    before = prompts.read_bytes()
    code, err = _cli(["--model", f"a={two_models['m0']}", "--prompts", str(prompts), "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert prompts.read_bytes() == before and not (tmp_path / "o").exists()


def test_an_id_used_by_two_prompt_files_is_refused(tmp_path):
    _write_prompts(tmp_path / "a.jsonl", [THREE[0]])
    _write_prompts(tmp_path / "b.jsonl", [{**THREE[1], "id": "k1"}])
    with pytest.raises(ValueError, match=r"b\.jsonl: line 1: field 'id' \"k1\" is also used at .*a\.jsonl: line 1"):
        read_sample_prompts(tmp_path)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["runs/x"], r"--model 'runs/x': expected NAME=DIR \(e\.g\. --model stage3=runs/stage3/epoch_2\)"),
        (["=runs/x"], r"expected NAME=DIR"),
        (["a b=."], r"--model 'a b=\.': label 'a b' must start with a letter or digit"),
        (["a=.", "a=."], r"the name 'a' is given twice"),
        (["a=/no/such/dir"], r"--model 'a=/no/such/dir': /no/such/dir does not exist; give a model directory"),
    ],
)
def test_bad_model_specs_are_refused(specs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_named_dirs(specs)


def test_every_model_dir_is_checked_before_the_first_model_generates(two_models, tmp_path):
    import shutil

    from kobllla.generation import GenerationOptions

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(two_models["m1"], broken)
    for f in broken.glob("tokenizer*"):
        f.unlink()
    rows = read_sample_prompts(_write_prompts(tmp_path / "p.jsonl", THREE[:1]))
    with pytest.raises(FileNotFoundError, match=r"^model b: model .*no-tokenizer: has original/tokenizer\.model but "
                                                r"no tokenizer\.json"):
        write_samples({"a": two_models["m0"], "b": broken}, rows, GenerationOptions(max_new_tokens=2),
                      tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_cli_refuses_a_model_without_name_and_an_output_over_an_input(tmp_path, capsys, two_models):
    code, err = _cli(["--model", str(two_models["m0"]), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "expected NAME=DIR" in err and "Traceback" not in err
    inside = two_models["m0"] / "samples"
    code, err = _cli(["--model", f"a={two_models['m0']}", "--prompts", str(PROMPTS), "--out", str(inside)], capsys)
    assert code == 2 and "would overwrite or replace input" in err and not inside.exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    code, err = _cli(["--model", f"a={two_models['m0']}", "--out", str(existing)], capsys)
    assert code == 2 and "already exists; pick another --out or pass --overwrite" in err


# --- eval.plan ---------------------------------------------------------------------------------------------


def test_plan_samples_default_to_every_model_and_refuse_unknown_labels_and_keys():
    from kobllla.evaluation import check_plan

    base = {"models": {"a": "x", "b": "y"}, "results_dir": "r", "report_dir": "o"}
    assert check_plan(base)["samples"] is None
    filled = check_plan({**base, "samples": {"max_new_tokens": 8}})["samples"]
    assert filled["models"] == ["a", "b"] and filled["prompts"] == "eval/prompts" and filled["max_new_tokens"] == 8
    with pytest.raises(ValueError, match=r"plan: samples: models names 'c', which is not in models \['a', 'b'\]"):
        check_plan({**base, "samples": {"models": ["c"]}})
    with pytest.raises(ValueError, match=r"plan: samples: unknown key\(s\) \['max_tokens'\]; valid keys"):
        check_plan({**base, "samples": {"max_tokens": 8}})


def test_a_plan_writes_its_samples_under_the_report_dir_after_the_scores(two_models, tmp_path):
    from kobllla.evaluation import load_history, run_plan

    prompts = _write_prompts(tmp_path / "p.jsonl", THREE[:1])
    plan = {"models": {k: str(v) for k, v in two_models.items()}, "heldout": {"ko": str(HELDOUT_KO)},
            "device": "cpu", "results_dir": str(tmp_path / "res"), "report_dir": str(tmp_path / "rep"),
            "samples": {"prompts": str(prompts), "models": ["m1"], "max_new_tokens": 2}}
    assert run_plan(plan) is None  # compares nothing
    assert [h["label"] for h in load_history(tmp_path / "res")] == ["m0", "m1"]  # the scores came first
    summary = json.loads((tmp_path / "rep" / "samples" / "summary.json").read_text(encoding="utf-8"))
    assert list(summary["models"]) == ["m1"] and summary["models"]["m1"]["answers"] == 1
    assert (tmp_path / "rep" / "samples" / "samples.html").is_file()
