"""Speech level (Kiwi's sentence-final ending) on a hand-labelled fixture, and the language measures."""

from __future__ import annotations

import csv

import pytest

from kobllla.korean import (
    answer_lang,
    detect_lang,
    hangul_share,
    kiwi,
    letter_counts,
    speech_level,
    strip_code,
    text_speech_level,
    word_counts,
)


def _fixture_rows(assets) -> list[dict]:
    with open(assets / "speech_level.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_fixture_covers_both_levels_questions_requests_quotes_and_english(assets):
    rows = _fixture_rows(assets)
    labels = [r["label"] for r in rows]
    assert len(rows) >= 40
    assert set(labels) == {"jondaetmal", "banmal", "none"}
    sentences = [r["sentence"] for r in rows]
    assert any(s.rstrip().endswith("?") for s in sentences)
    assert any("요" in s for s in sentences) and any("습니다" in s for s in sentences)
    assert any("'" in s or '"' in s for s in sentences)
    assert any(ch.isascii() and ch.isalpha() for s in sentences if "요" in s or "다" in s for ch in s)


def test_speech_level_classifies_the_hand_labelled_fixture_at_95_percent(assets):
    rows = _fixture_rows(assets)
    wrong = []
    for row in rows:
        got = speech_level(row["sentence"]) or "none"
        if got != row["label"]:
            wrong.append(f"{row['sentence']!r}: labelled {row['label']}, got {got} ({row['note']})")
    accuracy = 1 - len(wrong) / len(rows)
    print(f"speech level accuracy: {accuracy:.1%} ({len(rows) - len(wrong)}/{len(rows)} sentences)")
    assert accuracy >= 0.95, f"accuracy {accuracy:.1%} < 95 %; misclassified: " + "; ".join(wrong)


def test_the_final_ending_decides_not_the_quoted_one():
    assert speech_level("그가 '가자'라고 말했습니다.") == "jondaetmal"
    assert speech_level("엄마가 \"조심하세요\"라고 말했어.") == "banmal"


def test_kiwi_is_loaded_once():
    assert kiwi() is kiwi()


def test_text_speech_level_counts_sentences_and_takes_the_majority():
    answer = "안녕하세요. 반가워요!\n- 첫째, 물을 끓인다.\n- 둘째, 면을 넣어요.\nOK"
    result = text_speech_level(answer)
    assert (result.level, result.jondaetmal, result.banmal, result.sentences) == ("jondaetmal", 3, 1, 5)
    assert result.jondaetmal_share == pytest.approx(0.75)
    assert text_speech_level("밥 먹었어? 응, 먹었어요.").level == "mixed"
    assert text_speech_level("Hello there. How are you?").level is None
    assert text_speech_level("").jondaetmal_share is None


def test_hangul_share_counts_syllable_blocks_against_latin_letters():
    assert letter_counts("Python의 list 123!") == (1, 10)
    assert hangul_share("Python의 list") == pytest.approx(1 / 11)
    assert hangul_share("안녕하세요") == 1.0
    assert hangul_share("café") == 0.0  # Latin-1 letters are Latin
    assert hangul_share("123 😊 ...") is None


def test_detect_lang_splits_at_half_the_letters():
    assert detect_lang("서울은 한국의 수도입니다.") == "ko"
    assert detect_lang("Seoul is the capital of Korea.") == "en"
    assert detect_lang("서울 is") == "ko"  # 2 Hangul vs 2 Latin letters: a share of 0.5 is Korean
    assert detect_lang("서울 isn't") == "en"
    assert detect_lang("서울 is", threshold=0.6) == "en"
    assert detect_lang("", threshold=0.5) is None


def test_strip_code_drops_fenced_blocks_and_inline_spans_only():
    assert strip_code("앞\n```py\nx = 1\n```\n뒤 `y` 끝") == "앞\n \n뒤   끝"
    assert strip_code("앞\n~~~\nunclosed to the end") == "앞\n "
    assert strip_code("no fence here: a ``` b") == "no fence here: a ``` b"


def test_one_word_yes_no_answers_carry_a_level_and_fillers_none():
    assert [speech_level(w) for w in ("네.", "예.", "아니요.")] == ["jondaetmal"] * 3
    assert [speech_level(w) for w in ("응.", "어.", "아니.", "그래.", "안녕", "정말?")] == ["banmal"] * 6
    assert speech_level("음...") is None and speech_level("요약:") is None and speech_level("서울, 부산, 대구") is None
    assert speech_level("네, 알겠습니다.") == "jondaetmal" and speech_level("응, 알았어.") == "banmal"


def test_answer_lang_counts_korean_words_against_latin_words_as_a_korean_reader_would():
    mixed = "네, HTTP request를 보내려면 requests library를 쓰세요."
    assert word_counts(mixed) == (5, 2)
    assert answer_lang(mixed) == "ko"
    assert detect_lang(mixed) == "en"  # the letter share alone gets it wrong: 10 Hangul vs 26 Latin letters
    assert answer_lang("The Korean word 사랑 means love.") == "en"
    assert answer_lang("서울은 한국의 수도입니다.") == "ko" and answer_lang("Seoul is the capital.") == "en"
    assert answer_lang("123 😊") is None


def test_answer_metrics_give_a_mixed_korean_answer_lang_ko_and_its_speech_level():
    from kobllla.evaluation._samples import answer_metrics

    m = answer_metrics("네, HTTP request를 보내려면 requests library를 쓰세요.", "ko")
    assert (m["lang"], m["lang_match"], m["speech_level"]) == ("ko", True, "jondaetmal")
    e = answer_metrics("The Korean word 사랑 means love, you know.", "en")
    assert (e["lang"], e["lang_match"], e["speech_level"]) == ("en", True, None)
    assert answer_metrics("Use requests. 그렇게 하면 돼.", "en")["speech_level"] == "banmal"
