"""Korean text measures: speech level from the sentence-final ending (Kiwi), Hangul share, language.

    >>> speech_level("오늘은 맑고 따뜻한 날씨입니다.")
    'jondaetmal'
    >>> speech_level("밥 먹었어?")
    'banmal'
    >>> speech_level("그가 '가자'라고 말했습니다.")   # the final ending decides, not the quoted one
    'jondaetmal'
    >>> round(hangul_share("Python의 list"), 3)   # 1 Hangul letter vs 10 Latin letters
    0.091

KoLIMA teaches the user to speak *banmal* and the assistant *jondaetmal*, so the rule here is the
listener-facing level of the **last sentence-final ending** (Kiwi's ``EF`` tag), outside quotes:

* ``jondaetmal``: 해요체 (every ending in ``-요``: ``-어요 -세요 -나요 -까요 -네요 -죠 -예요 ...``, and the
  particle ``요`` after a clause, ``먹었는데요``) and 하십시오체 (``-습니다 -ㅂ니다 -습니까 -ㅂ니까 -십시오``),
  plus ``-ㅂ시다`` (``갑시다``), ``-소서`` and 하오체 ``-오``/``-소`` (``들어가시오``).
* ``banmal``: every other final ending: 해체 (``-어 -아 -야 -지 -니 -냐 -자 -래 -게 -네 -군``) **and the
  plain written 해라체** (``-다 -ㄴ다 -는다 -라 -구나``). Plain ``-다`` is what books and articles use, but
  it is not how an assistant addresses its user, and KoLIMA's assistant speaks 해요체/하십시오체, so
  counting it as banmal is what the metric needs. A clause left open by a connective ending
  (``먹었는데``, ``했다고``) is banmal too; with ``요`` after it, jondaetmal.
* One-word answers (no ending; Kiwi tags an interjection ``IC``, an adverb ``MAG``): the yes/no
  interjections carry a level, ``네 예 넵`` jondaetmal and ``응 어 아니 그래 그럼 안녕 웅 엉`` banmal (their
  polite forms are ``아니요 그럼요 안녕하세요``); an interjection that carries the polite ``요`` (``그럼요``,
  ``아니요``) is jondaetmal. A sentence that is one adverb alone (``정말?``, ``진짜?``, ``왜?``) is banmal:
  to a listener owed jondaetmal it would be ``정말요?``. Fillers and exclamations (``음...``, ``아``,
  ``와``) carry no level.
* ``None``: no Korean final ending at all: English only, a noun phrase (``요약:``, ``서울, 부산``), a
  filler interjection, an unfinished quotation.

Honorific ``-시-`` does not change the level: ``선생님 가셨어?`` honours the teacher but speaks banmal
to the listener. Quotes (``"..."``, ``'...'``, ``「...」``) are skipped unless the whole sentence is one.

The Kiwi analyzer (``kiwipiepy`` with the ``kiwipiepy-model`` package, ~1 s to load) is created
once, on first use, and shared.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import Literal

SpeechLevel = Literal["jondaetmal", "banmal"]

# Tags that close nothing: punctuation, brackets, symbols, foreign letters, numbers, emoji, URLs.
# Stripped from the end before the final ending is read (``"감사합니다 :)"``, ``"돼요 (Python)"``).
_TRAILING_PREFIXES = ("S", "W_")
_ENDING_TAGS = ("EF", "EC")
_POLITE_SUFFIXES = ("요", "죠", "ᆸ니다", "습니다", "ᆸ니까", "습니까", "ᆸ시오", "십시오", "시오", "ᆸ시다", "소서")

_HAO_FORMS = frozenset({"오", "으오", "소"})  # 하오체 (예사높임): 들어가시오, 좋소
# One-word yes/no answers and greetings (Kiwi's IC) that carry a level; other interjections carry none.
_POLITE_INTERJECTIONS = frozenset({"네", "예", "넵", "네네", "예예"})
_BANMAL_INTERJECTIONS = frozenset({"응", "어", "아니", "그래", "그럼", "안녕", "웅", "엉", "응응"})

_kiwi = None
_kiwi_lock = threading.Lock()


def kiwi():
    """The shared ``kiwipiepy.Kiwi`` analyzer, created on first use.

    Raises:
        RuntimeError: kiwipiepy or its model package is not installed (names the pip command).
    """
    global _kiwi
    if _kiwi is None:
        with _kiwi_lock:
            if _kiwi is None:
                try:
                    from kiwipiepy import Kiwi

                    _kiwi = Kiwi()
                except (ImportError, OSError, RuntimeError) as exc:
                    raise RuntimeError(f"the Korean analyzer Kiwi is not usable ({exc}); install it with "
                                       "`pip install kiwipiepy kiwipiepy-model`") from exc
    return _kiwi


def _outside_quotes(tokens: list) -> list:
    """The tokens at quote depth 0 (Kiwi tags opening quotes ``SSO`` and closing ones ``SSC``)."""
    depth, outer = 0, []
    for tok in tokens:
        if tok.tag == "SSO":
            depth += 1
        elif tok.tag == "SSC":
            depth = max(0, depth - 1)
        elif depth == 0:
            outer.append(tok)
    return outer


def _final_morpheme(tokens: list):
    """The last token that is not punctuation, a symbol, Latin text or a number; None if there is none."""
    for tok in reversed(tokens):
        if not tok.tag.startswith(_TRAILING_PREFIXES):
            return tok
    return None


def _level_of_ending(form: str) -> SpeechLevel:
    form = unicodedata.normalize("NFC", form)
    decomposed = unicodedata.normalize("NFD", form)  # Kiwi writes -ㅂ니다 with a conjoining ᆸ
    if form in _HAO_FORMS or form.endswith(_POLITE_SUFFIXES) or decomposed.endswith(_POLITE_SUFFIXES):
        return "jondaetmal"
    return "banmal"


def speech_level(sentence: str) -> SpeechLevel | None:
    """The speech level of one sentence, read from its final ending (see the module docstring).

    Args:
        sentence: one sentence; with several, the last one's ending decides (use
            :func:`text_speech_level` for a whole answer).

    Returns:
        ``"jondaetmal"``, ``"banmal"``, or None when the sentence has no Korean final ending.
    """
    if not any(_is_hangul(ch) for ch in sentence):
        return None
    tokens = kiwi().tokenize(sentence)
    last = _final_morpheme(_outside_quotes(tokens)) or _final_morpheme(tokens)
    if last is None:
        return None
    if (last.tag == "JX" and last.form == "요") or (last.tag == "IC" and last.form.endswith("요")):
        return "jondaetmal"  # 먹었는데요, 저요; interjections with the polite 요: 그럼요, 아니요
    if last.tag in _ENDING_TAGS:
        return _level_of_ending(last.form)
    if last.tag == "IC":
        if last.form in _POLITE_INTERJECTIONS:
            return "jondaetmal"
        return "banmal" if last.form in _BANMAL_INTERJECTIONS else None
    words = [t for t in tokens if not t.tag.startswith(_TRAILING_PREFIXES)]
    if len(words) == 1 and last.tag == "MAG":  # 정말? 진짜? 왜?
        return "banmal"
    return None


@dataclass(frozen=True)
class TextSpeechLevel:
    """The speech level of a whole text: counts over its sentences that have a final ending.

    ``level`` is the level of more than half of those sentences, ``"mixed"`` when neither has a
    majority, None when no sentence has a Korean final ending.
    """

    level: SpeechLevel | Literal["mixed"] | None
    jondaetmal: int
    banmal: int
    sentences: int  # all sentences, with or without a final ending

    @property
    def jondaetmal_share(self) -> float | None:
        classified = self.jondaetmal + self.banmal
        return self.jondaetmal / classified if classified else None


def split_sentences(text: str) -> list[str]:
    """Kiwi's sentence split, line by line (a Markdown list item is a sentence of its own)."""
    sentences = []
    for line in text.splitlines():
        if line.strip():
            sentences.extend(s.text for s in kiwi().split_into_sents(line) if s.text.strip())
    return sentences


def text_speech_level(text: str) -> TextSpeechLevel:
    """Classifies every sentence of ``text`` and returns the counts and the majority level."""
    sentences = split_sentences(text)
    levels = [speech_level(s) for s in sentences]
    jon, ban = levels.count("jondaetmal"), levels.count("banmal")
    if jon + ban == 0:
        level = None
    elif jon * 2 > jon + ban:
        level = "jondaetmal"
    elif ban * 2 > jon + ban:
        level = "banmal"
    else:
        level = "mixed"
    return TextSpeechLevel(level=level, jondaetmal=jon, banmal=ban, sentences=len(sentences))


_FENCED = re.compile(r"^[ \t]*(```|~~~).*?(^[ \t]*\1[ \t]*$|\Z)", re.S | re.M)
_INLINE = re.compile(r"`[^`\n]+`")


def strip_code(text: str) -> str:
    """``text`` without Markdown code: fenced blocks (```` ``` ```` / ``~~~``, an unclosed one to the end) and
    inline spans, each replaced by a space. A Korean answer that shows Python code is still Korean prose."""
    return _INLINE.sub(" ", _FENCED.sub(" ", text))


def _is_hangul(ch: str) -> bool:
    code = ord(ch)
    return (0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F
            or 0xA960 <= code <= 0xA97F or 0xD7B0 <= code <= 0xD7FF)


def _is_latin(ch: str) -> bool:
    return ch.isalpha() and ord(ch) < 0x250  # Basic Latin, Latin-1, Latin Extended-A/B


def letter_counts(text: str) -> tuple[int, int]:
    """(Hangul letters, Latin letters) in ``text``; a Hangul syllable block counts as one letter."""
    hangul = sum(1 for ch in text if _is_hangul(ch))
    latin = sum(1 for ch in text if _is_latin(ch))
    return hangul, latin


def hangul_share(text: str) -> float | None:
    """Hangul letters / (Hangul + Latin letters); None when the text has neither (digits, emoji)."""
    hangul, latin = letter_counts(text)
    return hangul / (hangul + latin) if hangul + latin else None


def word_counts(text: str) -> tuple[int, int]:
    """(Korean words, Latin words) in ``text``: a whitespace-separated word with any Hangul in it is a
    Korean word (an eojeol: ``request를`` is a Korean word built on an English noun); a word with Latin
    letters and no Hangul is a Latin word. Digits, symbols and other scripts count as neither."""
    korean = latin = 0
    for word in text.split():
        if any(_is_hangul(ch) for ch in word):
            korean += 1
        elif any(_is_latin(ch) for ch in word):
            latin += 1
    return korean, latin


def answer_lang(text: str) -> Literal["ko", "en"] | None:
    """The language a reader sees in an answer: ``"ko"`` when its Korean words (eojeols) are at least as
    many as its Latin words, ``"en"`` when fewer, None with neither.

    The rule counts words, not letters, because a Korean sentence keeps its Korean grammar around the
    English terms it names: ``"네, HTTP request를 보내려면 requests library를 쓰세요."`` has 5 Korean words
    (``request를`` and ``library를`` among them) and 2 Latin ones, so it is Korean, where the letter share
    of :func:`detect_lang` (10 Hangul vs 26 Latin letters) calls it English. An English answer that names
    one Korean word (``"The word 사랑 means love."``: 1 vs 4) stays English.
    """
    korean, latin = word_counts(text)
    if korean + latin == 0:
        return None
    return "ko" if korean >= latin else "en"


def detect_lang(text: str, *, threshold: float = 0.5) -> Literal["ko", "en"] | None:
    """``"ko"`` when at least ``threshold`` of the letters are Hangul, ``"en"`` below, None with no letters.

    A syllable block is one letter while an English word is several, so a Korean answer that names
    a few English terms (``"Python의 list comprehension은 ... 있어요."``) stays ``"ko"`` only while
    its Hangul outnumbers those letters; that is the intended strictness for a language-match metric.
    """
    share = hangul_share(text)
    if share is None:
        return None
    return "ko" if share >= threshold else "en"
