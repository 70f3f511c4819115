"""Side-by-side samples: every model answers the same prompts; language, speech level, length, stop.

    from kobllla.evaluation import read_sample_prompts, write_samples
    from kobllla.generation import GenerationOptions

    rows = read_sample_prompts(Path("eval/prompts"))
    summary = write_samples({"chatvec": Path("runs/chatvec"), "stage3": Path("runs/stage3/epoch_2")}, rows,
                            GenerationOptions(max_new_tokens=256), Path("reports/samples"))
    summary["models"]["stage3"]["jondaetmal_rate"]

A prompt row is a ``kobllla.generation`` prompt row (``id`` + ``messages`` or ``prompt``) with
``expect_lang`` (``ko`` / ``en``: the language the answer should be in) and optionally ``kind``
(``ko``, ``en``, ``en_ko``, ``ko_en``: the BiLIMA direction, question_answer). A row without
``expect_lang`` takes it from ``kind`` (the answer side: ``ko``, ``en_ko`` -> ``ko``; ``en``, ``ko_en`` ->
``en``); a row with neither is refused, so no answer is ever scored against a guessed language.

Per answer (its Markdown code left out): the Hangul share of its letters
(:func:`kobllla.korean.hangul_share`), the detected language (:func:`kobllla.korean.answer_lang`:
``ko`` when its Korean words, eojeols such as ``request를`` included, are at least as many as its Latin
words) and whether it matches ``expect_lang``, the speech level of any answer with Hangul
(:func:`kobllla.korean.text_speech_level`, the majority of its sentences with a Korean final ending), the new
tokens and the stop reason. Per model: the rate of answers in the expected language, the rate of
Korean answers (detected ``ko``) whose level is jondaetmal (a Korean answer with no final ending
counts as not jondaetmal), and the rate that stopped at a stop token (``eos``).

Outputs (built aside, renamed when whole): ``samples.md``, ``samples.html`` (one table per prompt,
a column per model), ``samples.jsonl`` (one row per prompt and model, with the token ids) and
``summary.json`` (rates, options, prompts, models).
"""

from __future__ import annotations

import gc
import html
from pathlib import Path

from kobllla.atomic import atomic_output_dir, refuse_output_over_inputs, write_json
from kobllla.evaluation._store import check_label
from kobllla.korean import answer_lang, hangul_share, strip_code, text_speech_level

KIND_LANG = {"ko": "ko", "en": "en", "en_ko": "ko", "ko_en": "en"}  # kind -> language of the answer
LANGS = ("ko", "en")
FILES = ("samples.md", "samples.html", "samples.jsonl", "summary.json")


def _check_sample_row(row: dict, *, where: str) -> dict:
    kind, lang = row.get("kind"), row.get("expect_lang")
    if kind is not None and kind not in KIND_LANG:
        raise ValueError(f"{where}field 'kind' is {kind!r}; use one of {', '.join(KIND_LANG)}")
    if lang is None:
        if kind is None:
            raise ValueError(f"{where}field 'expect_lang' is missing (and no 'kind' to take it from); add "
                             "\"expect_lang\": \"ko\" or \"en\", the language the answer should be in")
        lang = KIND_LANG[kind]
    if lang not in LANGS:
        raise ValueError(f"{where}field 'expect_lang' is {lang!r}; use \"ko\" or \"en\"")
    return {**row, "expect_lang": lang, "kind": kind}


def prompt_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.jsonl`` files of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise FileNotFoundError(f"prompts directory {path} holds no *.jsonl files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"prompts {path} does not exist; pass a .jsonl file or a directory of them")
    return [path]


def read_sample_prompts(path: Path) -> list[dict]:
    """Validated sample prompts from a ``.jsonl`` file or a directory of them (ids unique across files).

    Raises:
        FileNotFoundError: no such file, or a directory without ``*.jsonl``.
        ValueError: ``FILE: line N: field ...`` (see :func:`kobllla.generation.read_prompts`, plus
            ``expect_lang`` / ``kind``), or an id that two files share.
    """
    from kobllla.generation import read_prompts, row_key

    rows, seen = [], {}
    for file in prompt_files(path):
        for row in read_prompts(file):
            where = f"{file}: line {row['line']}: "
            key = row_key(row["id"])
            if key in seen:
                raise ValueError(f"{where}field 'id' {key} is also used at {seen[key]}; ids must be unique "
                                 "across the prompt files")
            seen[key] = f"{file}: line {row['line']}"
            rows.append({**_check_sample_row(row, where=where), "source": file.name})
    return rows


def prompt_text(row: dict) -> str:
    """What the model answers: the last user message, or the raw prompt."""
    return row["messages"][-1]["content"] if "messages" in row else row["prompt"]


def answer_metrics(text: str, expect_lang: str) -> dict:
    """Language and speech-level measures of one answer (see the module docstring).

    Markdown code (fenced blocks, inline spans) is left out of both measures when the rest has letters:
    the language of an answer is the language of its prose.
    """
    prose = strip_code(text)
    if hangul_share(prose) is not None:
        text = prose
    share = hangul_share(text)
    lang = answer_lang(text)
    level = text_speech_level(text) if share else None  # any Hangul: the level of its Korean final endings
    return {
        "hangul_share": None if share is None else round(share, 4),
        "lang": lang,
        "lang_match": lang == expect_lang,
        "speech_level": level.level if level else None,
        "jondaetmal_sentences": level.jondaetmal if level else None,
        "banmal_sentences": level.banmal if level else None,
    }


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def summarize(records: list[dict], names: list[str]) -> dict[str, dict]:
    """Per model: answers, rates of expected language / jondaetmal Korean answers / eos stops, mean tokens."""
    out = {}
    for name in names:
        mine = [r for r in records if r["model"] == name]
        korean = [r for r in mine if r["lang"] == "ko"]
        out[name] = {
            "answers": len(mine),
            "expected_lang": sum(r["lang_match"] for r in mine),
            "expected_lang_rate": _rate(sum(r["lang_match"] for r in mine), len(mine)),
            "korean_answers": len(korean),
            "jondaetmal": sum(r["speech_level"] == "jondaetmal" for r in korean),
            "jondaetmal_rate": _rate(sum(r["speech_level"] == "jondaetmal" for r in korean), len(korean)),
            "stopped": sum(r["stop_reason"] == "eos" for r in mine),
            "stopped_rate": _rate(sum(r["stop_reason"] == "eos" for r in mine), len(mine)),
            "mean_new_tokens": round(sum(r["new_tokens"] for r in mine) / len(mine), 1) if mine else None,
        }
    return out


def parse_named_dirs(specs: list[str], *, flag: str = "--model") -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> ``{NAME: Path(DIR)}``; names unique labels, dirs existing.

    Raises:
        ValueError: a spec without ``NAME=``, a bad or repeated name.
        FileNotFoundError: a DIR that is not a directory.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {spec!r}: expected NAME=DIR (e.g. {flag} stage3=runs/stage3/epoch_2)")
        try:
            check_label(name)
        except ValueError as exc:
            raise ValueError(f"{flag} {spec!r}: {exc}") from None
        if name in out:
            raise ValueError(f"{flag} {spec!r}: the name {name!r} is given twice; every model needs its own name")
        if not Path(path).is_dir():
            what = "is not a directory" if Path(path).exists() else "does not exist"
            raise FileNotFoundError(f"{flag} {spec!r}: {path} {what}; give a model directory")
        out[name] = Path(path)
    if not out:
        raise ValueError(f"no models; pass {flag} NAME=DIR at least once")
    return out


def check_model_dir(name: str, model: Path, *, base: Path | None = None) -> None:
    """Refuses (cheaply, before any generation) a dir :func:`kobllla.generation.load_model` would refuse.

    Raises:
        FileNotFoundError / ValueError: ``model NAME: ...`` and the fix (missing config or tokenizer files,
            no weights, an adapter-only ``epoch_N/`` without ``base``).
    """
    from kobllla.model_dir import (
        adapter_weights_file,
        check_loadable_files,
        check_weight_headers,
        has_full_weights,
        resolve_model_dir,
    )

    try:
        if not has_full_weights(model) and model.is_dir() and adapter_weights_file(model) and base is not None:
            check_loadable_files(base, role="base")  # the adapter is merged into it when the model loads
            check_weight_headers(base)
        else:
            resolve_model_dir(model)  # no merge without a base: checks files and weight headers only
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"model {name}: {exc}") from None


def _adapter_only(model: Path) -> bool:
    from kobllla.model_dir import adapter_weights_file, has_full_weights

    return model.is_dir() and not has_full_weights(model) and adapter_weights_file(model) is not None


def generate_answers(name: str, model_dir: Path, rows: list[dict], options, *, base: Path | None = None,
                     progress: bool = True) -> list[dict]:
    """One model's answer records (generation output + metrics), in prompt order."""
    from tqdm import tqdm

    from kobllla.generation import generate_rows, load_model

    loaded = load_model(model_dir, base=base, device=options.device, dtype=options.dtype)
    records = []
    try:
        for row, out in zip(rows, tqdm(generate_rows(loaded, rows, options), total=len(rows), desc=name,
                                       unit="prompt", disable=not progress), strict=True):
            records.append({
                "id": row["id"], "model": name, "kind": row["kind"], "expect_lang": row["expect_lang"],
                "prompt": prompt_text(row), "text": out["text"], "stop_reason": out["stop_reason"],
                "new_tokens": out["new_tokens"], "seconds": out["seconds"],
                **answer_metrics(out["text"], row["expect_lang"]), "token_ids": out["token_ids"],
            })
    finally:
        loaded.close()
        del loaded
        gc.collect()
    return records


def write_samples(models: dict[str, Path], rows: list[dict], options, out_dir: Path, *,
                  base: Path | None = None, overwrite: bool = False, prompts: Path | None = None,
                  progress: bool = True) -> dict:
    """Every model answers ``rows``; writes ``out_dir`` (see the module docstring) and returns the summary.

    Args:
        models: name -> model dir (anything :func:`kobllla.generation.load_model` loads), in column order.
        rows: prompt rows from :func:`read_sample_prompts` (or any validated rows with ``expect_lang``).
        options: a :class:`kobllla.generation.GenerationOptions`.
        out_dir: the output directory, written atomically.
        base: the one base model of every adapter-only ``epoch_N/`` dir (full-weight models do not use it;
            refused when no model is adapter-only).
        overwrite: replace an existing ``out_dir``.
        prompts: where the rows came from (recorded, and guarded against being overwritten).

    Returns:
        ``{"models": {name: rates}, "prompts": n, "out_dir": str, ...}`` as written to ``summary.json``.

    Raises:
        ValueError / FileNotFoundError: an output over an input, an existing output, a bad model dir.
    """
    from dataclasses import asdict

    for name in models:
        check_label(name)
    rows = [_check_sample_row(r, where=f"prompt row {r.get('id')!r}: ") for r in rows]
    if not rows or not models:
        raise ValueError("write_samples needs at least one model and one prompt row")
    out_dir = Path(out_dir)
    refuse_output_over_inputs(out_dir, [*models.values(), base, prompts])
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; the samples output is a directory: pick another path")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pick another --out or pass --overwrite to replace it")
    for name, model_dir in models.items():
        check_model_dir(name, Path(model_dir), base=base)  # every model before the first one generates
    adapter_only = {name for name, d in models.items() if _adapter_only(Path(d))}
    if base is not None and not adapter_only:
        raise ValueError(f"--base {base} is given but every model holds full weights (no adapter-only epoch_N/ "
                         "to merge it into); drop --base")
    records = []
    for name, model_dir in models.items():
        records.extend(generate_answers(name, Path(model_dir), rows, options,
                                        base=base if name in adapter_only else None, progress=progress))
    summary = {
        "models": summarize(records, list(models)),
        "model_dirs": {name: str(path) for name, path in models.items()},
        "prompts": len(rows), "prompts_source": None if prompts is None else str(prompts),
        "options": asdict(options), "out_dir": str(out_dir),
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_jsonl(tmp / "samples.jsonl", records)
        (tmp / "samples.md").write_text(render_markdown(records, rows, summary), encoding="utf-8")
        (tmp / "samples.html").write_text(render_html(records, rows, summary), encoding="utf-8")
        write_json(tmp / "summary.json", summary)
    return summary


def _write_jsonl(path: Path, records: list[dict]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _summary_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, s in summary["models"].items():
        rows.append([name, f"{_pct(s['expected_lang_rate'])} ({s['expected_lang']}/{s['answers']})",
                     f"{_pct(s['jondaetmal_rate'])} ({s['jondaetmal']}/{s['korean_answers']})",
                     f"{_pct(s['stopped_rate'])} ({s['stopped']}/{s['answers']})", str(s["mean_new_tokens"])])
    return rows


SUMMARY_HEADER = ["model", "answers in the expected language", "Korean answers in jondaetmal",
                  "stopped (eos)", "mean new tokens"]


def _answer_facts(rec: dict) -> str:
    share = "n/a" if rec["hangul_share"] is None else f"{rec['hangul_share']:.0%}"
    match = "match" if rec["lang_match"] else "MISMATCH"
    level = f", {rec['speech_level'] or 'no final ending'}" if rec["lang"] == "ko" else ""
    return (f"lang {rec['lang'] or 'none'} ({match}; Hangul {share}){level}; "
            f"{rec['new_tokens']} tokens, {rec['stop_reason']}")


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or " "


def _by_prompt(records: list[dict], rows: list[dict], names: list[str]):
    index = {(r["id"], r["model"]): r for r in records}
    for row in rows:
        yield row, [index[(row["id"], name)] for name in names]


def render_markdown(records: list[dict], rows: list[dict], summary: dict) -> str:
    """``samples.md``: the summary table, then per prompt a table with one column per model."""
    names = list(summary["models"])
    lines = ["# Samples", "", f"{summary['prompts']} prompts, {len(names)} models, "
             f"max_new_tokens {summary['options']['max_new_tokens']}, temperature {summary['options']['temperature']}.",
             "", "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + " --- |" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in _summary_rows(summary)]
    for row, recs in _by_prompt(records, rows, names):
        lines += ["", f"## {_md_cell(str(row['id']))} ({row['kind'] or 'no kind'}, answer expected in "
                      f"{row['expect_lang']})", "", "> " + _md_cell(prompt_text(row)), "",
                  "| " + " | ".join(_md_cell(n) for n in names) + " |", "|" + " --- |" * len(names),
                  "| " + " | ".join(_md_cell(r["text"]) for r in recs) + " |",
                  "| " + " | ".join(_md_cell(_answer_facts(r)) for r in recs) + " |"]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:100%}table{border-collapse:collapse;
margin:1em 0;width:100%;table-layout:fixed}td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;
text-align:left}td.answer{white-space:pre-wrap}td.facts{font-size:.85em;color:#444}.bad{color:#b00}
blockquote{white-space:pre-wrap;background:#f6f6f6;margin:0;padding:.5em 1em}"""


def _tr(cells: list[str], tag: str = "td", cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return "<tr>" + "".join(f"<{tag}{attr}>{c}</{tag}>" for c in cells) + "</tr>"


def render_html(records: list[dict], rows: list[dict], summary: dict) -> str:
    """``samples.html``: the same tables as the Markdown, text HTML-escaped, answers wrapped."""
    esc = html.escape
    names = list(summary["models"])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Samples</title>",
             f"<style>{_CSS}</style></head><body><h1>Samples</h1>",
             f"<p>{summary['prompts']} prompts, {len(names)} models, max_new_tokens "
             f"{summary['options']['max_new_tokens']}, temperature {summary['options']['temperature']}.</p>",
             "<table>", _tr([esc(h) for h in SUMMARY_HEADER], "th"),
             *(_tr([esc(c) for c in r]) for r in _summary_rows(summary)), "</table>"]
    for row, recs in _by_prompt(records, rows, names):
        parts += [f"<h2>{esc(str(row['id']))} ({esc(row['kind'] or 'no kind')}, answer expected in "
                  f"{esc(row['expect_lang'])})</h2>", f"<blockquote>{esc(prompt_text(row))}</blockquote>",
                  "<table>", _tr([esc(n) for n in names], "th"), _tr([esc(r["text"]) for r in recs], cls="answer"),
                  "<tr>" + "".join(f"<td class='facts{'' if r['lang_match'] else ' bad'}'>{esc(_answer_facts(r))}"
                                   "</td>" for r in recs) + "</tr>", "</table>"]
    return "\n".join(parts) + "\n</body></html>\n"


# ---- eval.plan: ``samples:`` runs after the scores -------------------------------------------------------

PLAN_DEFAULTS: dict = {"prompts": "eval/prompts", "models": None, "out_dir": None, "base": None,
                       "max_new_tokens": 256, "temperature": 0.0, "batch_size": 8}


def check_plan_samples(samples: object, plan: dict, *, where: str) -> dict | None:
    """The plan's ``samples:`` mapping with defaults filled in (None: no samples).

    Raises:
        ValueError: not a mapping, unknown keys, a model label the plan does not define.
    """
    if samples is None or samples is False:
        return None
    if samples is True:
        samples = {}
    if not isinstance(samples, dict):
        raise ValueError(f"{where}: 'samples' must be a mapping (keys {sorted(PLAN_DEFAULTS)}) or null")
    unknown = sorted(set(samples) - set(PLAN_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: samples: unknown key(s) {unknown}; valid keys: {sorted(PLAN_DEFAULTS)}")
    full = {**PLAN_DEFAULTS, **samples}
    labels = [str(m) for m in plan["models"]]
    full["models"] = [str(m) for m in (full["models"] or labels)]
    for label in full["models"]:
        if label not in labels:
            raise ValueError(f"{where}: samples: models names {label!r}, which is not in models {labels}")
    return full


def _local_dir(spec: str) -> Path:
    """A plan model as a directory: a local path as is, a hub id through the Hugging Face cache."""
    from kobllla.evaluation._checkpoint import _looks_local

    if _looks_local(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def run_plan_samples(plan: dict) -> dict:
    """Writes the plan's samples (``samples.out_dir``, default ``REPORT_DIR/samples``, replaced each run)."""
    import torch

    from kobllla.generation import GenerationOptions

    cfg = plan["samples"]
    device = plan["device"] if plan["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    options = GenerationOptions(max_new_tokens=int(cfg["max_new_tokens"]), temperature=float(cfg["temperature"]),
                                batch_size=int(cfg["batch_size"]), device=device, dtype=plan["dtype"])
    by_label = {str(label): spec for label, spec in plan["models"].items()}
    models = {label: _local_dir(str(by_label[label])) for label in cfg["models"]}
    out_dir = Path(cfg["out_dir"] or Path(plan["report_dir"]) / "samples")
    prompts = Path(cfg["prompts"])
    return write_samples(models, read_sample_prompts(prompts), options, out_dir, prompts=prompts, overwrite=True,
                         base=None if cfg["base"] is None else Path(cfg["base"]))
