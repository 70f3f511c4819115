"""Parallel text (sentence pairs) as translation SFT: the source in a prompt, the target trained.

Two input shapes:

* a table with one column per language: ``csv``, ``tsv``, ``json``/``jsonl``, ``parquet`` (local,
  ``data_files``) or a hub dataset id; ``src_column``/``tgt_column`` (default: the language codes);
* Moses-style pair files, line-aligned (``source: moses``, ``data_files: ./data/train`` reads
  ``./data/train.ko`` and ``./data/train.zh``).

Cleaning, counted in one log line: a pair with an empty side is dropped; so is a pair whose length
ratio is far outside the corpus' own distribution (a misaligned pair). Lengths are counted in
non-space characters, and the corpus sets its own scale (a Chinese sentence has roughly 0.6 times the
characters of its Korean original; another script pair differs): a pair is dropped when
``|log(tgt_chars / src_chars) - median| > max(misaligned_mads * 1.4826 * MAD, log 1.5)`` (MAD: the
median absolute deviation of those log ratios; 1.4826 * MAD estimates a normal spread; the log 1.5
floor keeps a near-constant corpus from dropping ordinary pairs). Corpora under
``MIN_PAIRS_FOR_RATIO`` pairs skip the ratio check. A length filter cannot see two neighbouring
sentences of similar length swapped; it catches the shifted or merged lines that break alignment.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from torchtune.data import Message
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms import Transform
from torchtune.utils import get_logger

from kobllla.datasets._chat import ChatDataset, finish
from kobllla.datasets._sources import iter_rows, require_field

# torchtune's logger: the recipes set it to INFO, so the cleaning line shows in `tune run` output.
log = get_logger()

MIN_PAIRS_FOR_RATIO = 20
RATIO_FLOOR = math.log(1.5)
MAD_TO_SIGMA = 1.4826

# Default instructions, written in the SOURCE language (the model reads a request in the language
# it is about to translate from, as a native user would write it). "{text}" is the source sentence.
_LANG_NAMES = {  # instruction language -> names of languages in it
    "ko": {"ko": "한국어", "zh": "중국어", "en": "영어", "ja": "일본어"},
    "zh": {"ko": "韩语", "zh": "中文", "en": "英语", "ja": "日语"},
    "en": {"ko": "Korean", "zh": "Chinese", "en": "English", "ja": "Japanese"},
}
_INSTRUCTIONS = {
    "ko": "다음 {src} 문장을 {tgt}로 번역하세요.\n\n{{text}}",
    "zh": "请把下面的{src}句子翻译成{tgt}。\n\n{{text}}",
    "en": "Translate the following {src} text into {tgt}.\n\n{{text}}",
}
# A style system prompt for literary text, in the source language (pass it as system_prompt).
LITERARY_SYSTEM_PROMPTS = {
    "ko": "원문의 어조와 감정, 문체를 그대로 살려 자연스럽게 번역하세요.",
    "zh": "请保留原文的语气、情感和文体，译得自然流畅。",
    "en": "Keep the tone, emotion and style of the original, and make the translation read naturally.",
}


@dataclass(frozen=True)
class Pair:
    """One sentence pair and where it came from (``train.ko/train.zh line 12``, ``data.tsv line 13``)."""

    where: str
    src: str
    tgt: str


def default_template(src_lang: str, tgt_lang: str) -> str:
    """The built-in instruction for ``src_lang -> tgt_lang`` in the source language, with ``{text}``.

    Raises:
        ValueError: no built-in instruction for this pair (the message lists the languages that have one).
    """
    names = _LANG_NAMES.get(src_lang, {})
    if src_lang not in _INSTRUCTIONS or tgt_lang not in names:
        raise ValueError(
            f"no built-in instruction for {src_lang}-{tgt_lang} (built in: {', '.join(sorted(_INSTRUCTIONS))} "
            f"to {', '.join(sorted(_LANG_NAMES['en']))}); give templates: {{{src_lang}-{tgt_lang}: '... {{text}}'}}"
        )
    return _INSTRUCTIONS[src_lang].format(src=names[src_lang], tgt=names[tgt_lang])


def check_directions(directions: list[str], src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    """``["ko-zh", "zh-ko"]`` -> ``[("ko", "zh"), ("zh", "ko")]``; only the two languages' directions."""
    valid = [f"{src_lang}-{tgt_lang}", f"{tgt_lang}-{src_lang}"]
    if isinstance(directions, str) or not directions:
        raise ValueError(f"directions must be a non-empty list, e.g. {valid}; got {directions!r}")
    for d in directions:
        if d not in valid:
            raise ValueError(f"unknown direction {d!r}; choose from {valid} (src_lang {src_lang}, tgt_lang {tgt_lang})")
    return [tuple(d.split("-", 1)) for d in dict.fromkeys(directions)]


def resolve_prompts(
    pairs_of_langs: list[tuple[str, str]], templates: Mapping[str, str] | None, system_prompt: str | Mapping | None
) -> dict[tuple[str, str], tuple[str, str | None]]:
    """Direction -> (instruction template with ``{text}``, system prompt or None)."""
    templates = dict(templates or {})
    out = {}
    for src, tgt in pairs_of_langs:
        key = f"{src}-{tgt}"
        template = templates.pop(key, None) or default_template(src, tgt)
        if template.count("{text}") != 1:
            raise ValueError(f"templates[{key!r}] must contain {{text}} exactly once (where the source goes)")
        system = system_prompt.get(key) if isinstance(system_prompt, Mapping) else system_prompt
        out[(src, tgt)] = (template, system or None)
    trained = [f"{s}-{t}" for s, t in out]
    if templates:
        raise ValueError(f"templates for directions not trained: {sorted(templates)}; trained: {trained}")
    extra = sorted(set(system_prompt) - set(trained)) if isinstance(system_prompt, Mapping) else []
    if extra:
        raise ValueError(f"system_prompt for directions not trained: {extra}; trained: {trained}")
    return out


def translation_messages(text: str, target: str | None, *, template: str, system: str | None) -> list[Message]:
    """System (masked), user = the instruction with the source (masked), assistant = the target (trained).

    With ``target=None`` the assistant turn is left out: the prompt an evaluation continues.
    """
    messages = [Message(role="system", content=system, masked=True)] if system else []
    messages.append(Message(role="user", content=template.replace("{text}", text), masked=True))
    if target is not None:
        messages.append(Message(role="assistant", content=target, masked=False))
    return messages


@dataclass(frozen=True)
class LineRef:
    """A physical line of a text file, for error messages: ``data.tsv line 13``."""

    origin: str
    line: int

    def __str__(self) -> str:
        return f"{self.origin} line {self.line}"


def _iter_moses(prefix: str, src_lang: str, tgt_lang: str) -> Iterator[Pair]:
    paths = [Path(f"{prefix}.{lang}").expanduser() for lang in (src_lang, tgt_lang)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file; source: moses reads {prefix}.{src_lang} and {prefix}.{tgt_lang}"
            )
    sides = []
    for path in paths:
        try:
            sides.append(path.read_text(encoding="utf-8").split("\n"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8"
            ) from None
    for side in sides:
        if side and side[-1] == "":
            side.pop()  # the final newline
    if len(sides[0]) != len(sides[1]):
        raise ValueError(
            f"{paths[0]} has {len(sides[0])} lines but {paths[1]} has {len(sides[1])}; "
            "Moses pair files must be line-aligned (one sentence per line on both sides)"
        )
    if not sides[0]:
        raise ValueError(f"{paths[0]}: the file has no lines; point data_files at a non-empty pair")
    where = f"{paths[0].name}/{paths[1].name}"
    for line_no, (src, tgt) in enumerate(zip(*sides, strict=True), start=1):
        yield Pair(f"{where} line {line_no}", src.strip(), tgt.strip())


def _iter_tsv(path: Path) -> Iterator[tuple[LineRef, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check data_files in the dataset config")
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as handle:
        # QUOTE_NONE: literary text has unbalanced quotes; a tab never occurs inside a field.
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            yield LineRef(path.name, reader.line_num), row  # one row per line: QUOTE_NONE


def _iter_table(source: str, data_files, split: str, src_column: str, tgt_column: str) -> Iterator[Pair]:
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    if source == "tsv" or (source not in ("csv", "json", "jsonl", "parquet") and str(source).endswith(".tsv")):
        rows = (r for f in (files if source == "tsv" else [source]) for r in _iter_tsv(Path(f).expanduser()))
    else:
        rows = iter_rows(source, data_files=data_files, split=split)
    for ref, row in rows:
        sides = []
        for column, key in ((src_column, "src_column"), (tgt_column, "tgt_column")):
            value = require_field(ref, row, column, config_key=key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{ref}: field {column!r} is {type(value).__name__}, expected text")
            sides.append((value or "").strip())
        yield Pair(str(ref), *sides)


def read_pairs(
    source: str, *, data_files, split: str, src_lang: str, tgt_lang: str, src_column: str, tgt_column: str
) -> list[Pair]:
    """Every sentence pair of the input, in order (no cleaning)."""
    if source == "moses":
        if not isinstance(data_files, str):
            raise ValueError("source: moses needs data_files: <prefix> (e.g. ./data/train for train.ko + train.zh)")
        return list(_iter_moses(data_files, src_lang, tgt_lang))
    pairs = list(_iter_table(source, data_files, split, src_column, tgt_column))
    if not pairs:
        raise ValueError(f"{source} {data_files or ''}: no rows; point data_files at a non-empty file")
    return pairs


def _describe(source: str, data_files, src_lang: str, tgt_lang: str) -> str:
    if source == "moses":
        return f"{Path(str(data_files)).name}.{src_lang}/{tgt_lang}"
    if not data_files:
        return Path(source).name
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    return ", ".join(Path(str(f)).name for f in files)


def _chars(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def clean_pairs(pairs: list[Pair], *, misaligned_mads: float | None) -> tuple[list[Pair], dict]:
    """Drops empty-sided pairs and length-ratio outliers; returns the kept pairs and what was dropped."""
    full = [p for p in pairs if p.src and p.tgt]
    stats = {"pairs": len(pairs), "empty": len(pairs) - len(full), "misaligned": 0, "band": None}
    if misaligned_mads is None or len(full) < MIN_PAIRS_FOR_RATIO:
        return full, stats
    ratios = [math.log(_chars(p.tgt) / _chars(p.src)) for p in full]
    median = statistics.median(ratios)
    mad = statistics.median(abs(r - median) for r in ratios)
    band = max(misaligned_mads * MAD_TO_SIGMA * mad, RATIO_FLOOR)
    kept = [p for p, r in zip(full, ratios, strict=True) if abs(r - median) <= band]
    stats.update(misaligned=len(full) - len(kept), band=(median, band))
    return kept, stats


def _log_cleaning(where: str, stats: dict, kept: int, directions: int, src_lang: str, tgt_lang: str) -> None:
    if stats["band"] is None:
        ratio = f"ratio check off (under {MIN_PAIRS_FOR_RATIO} pairs or misaligned_mads: null)"
    else:
        median, band = stats["band"]
        ratio = (
            f"{stats['misaligned']} misaligned (log {tgt_lang}/{src_lang} character ratio outside "
            f"{median:.2f} +- {band:.2f}, i.e. x{math.exp(median - band):.2f}..x{math.exp(median + band):.2f})"
        )
    log.info(
        "parallel_dataset(%s): %d pairs; dropped %d with an empty side, %s; %d kept x %d direction(s) = %d samples",
        where, stats["pairs"], stats["empty"], ratio, kept, directions, kept * directions,
    )


def parallel_dataset(
    tokenizer: Transform,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    src_lang: str = "ko",
    tgt_lang: str = "zh",
    src_column: str | None = None,
    tgt_column: str | None = None,
    directions: list[str] | None = None,
    templates: dict[str, str] | None = None,
    system_prompt: str | dict[str, str] | None = None,
    misaligned_mads: float | None = 4.0,
    packed: bool = False,
) -> ChatDataset | PackedDataset:
    """Translation SFT from parallel text: one sample per pair and direction, the target trained only.

    Each sample is a Llama 3 chat: an optional system prompt, a user turn holding the instruction
    (default: in the source language, e.g. "다음 한국어 문장을 중국어로 번역하세요.") followed by the
    source sentence, and the assistant turn holding the translation; only the assistant tokens
    (and its ``<|eot_id|>``) carry labels.

    Args:
        tokenizer (Transform): the model tokenizer (Llama 3 chat format).
        source (str): ``moses`` (line-aligned pair files), ``csv``/``tsv``/``json``/``jsonl``/``parquet``
            with ``data_files``, a local file path, or a hub dataset id.
        data_files (str | list[str] | None): the table file(s), or for ``moses`` the common prefix
            (``./data/train`` -> ``train.ko`` + ``train.zh``).
        split (str): hub split.
        src_lang, tgt_lang (str): language codes of the two sides (``ko``, ``zh``, ``en``, ``ja`` have
            built-in instructions); also the Moses file suffixes.
        src_column, tgt_column (str | None): table columns (default: ``src_lang`` / ``tgt_lang``).
        directions (list[str] | None): ``["ko-zh"]``, ``["zh-ko"]`` or both (default: ``src_lang-tgt_lang``).
        templates (dict[str, str] | None): direction -> instruction with ``{text}`` where the source goes.
        system_prompt (str | dict | None): one system prompt, or one per direction (e.g.
            ``LITERARY_SYSTEM_PROMPTS[src]``: keep the tone, emotion and style of the original).
        misaligned_mads (float | None): drop pairs whose log length ratio is more than this many robust
            standard deviations from the corpus median (see the module docstring); None: keep them.
        packed (bool): pack whole samples into ``tokenizer.max_seq_len`` sequences.

    Returns:
        ChatDataset | PackedDataset: samples ``{"tokens", "labels"}``; ``.cleaning`` holds the counts.

    Raises:
        ValueError: an unknown direction (valid ones listed), a missing column (columns found listed),
            Moses files of different line counts (both counts named), a template without ``{text}``,
            or nothing left after cleaning.
        FileNotFoundError: a local file that does not exist.

    Example (configs/llama3_8b/translation_ko_zh_lora.yaml)::

        dataset:
          _component_: kobllla.datasets.parallel_dataset
          source: moses
          data_files: ./data/literary/train     # train.ko + train.zh
          src_lang: ko
          tgt_lang: zh
          directions: [ko-zh, zh-ko]
          packed: True
    """
    langs = check_directions(directions or [f"{src_lang}-{tgt_lang}"], src_lang, tgt_lang)
    prompts = resolve_prompts(langs, templates, system_prompt)
    pairs = read_pairs(
        source, data_files=data_files, split=split, src_lang=src_lang, tgt_lang=tgt_lang,
        src_column=src_column or src_lang, tgt_column=tgt_column or tgt_lang,
    )
    kept, stats = clean_pairs(pairs, misaligned_mads=misaligned_mads)
    where = _describe(source, data_files, src_lang, tgt_lang)
    _log_cleaning(where, stats, len(kept), len(langs), src_lang, tgt_lang)
    if not kept:
        raise ValueError(
            f"parallel_dataset({where}): all {stats['pairs']} pairs were dropped ({stats['empty']} with an empty side, "
            f"{stats['misaligned']} misaligned); check src_column/tgt_column and the file's quoting"
        )
    conversations = []
    for pair in kept:
        for src, tgt in langs:
            text, target = (pair.src, pair.tgt) if src == src_lang else (pair.tgt, pair.src)
            template, system = prompts[(src, tgt)]
            conversations.append(translation_messages(text, target, template=template, system=system))
    ds = finish(ChatDataset(conversations, tokenizer), tokenizer, packed=packed)
    ds.cleaning = stats
    return ds
