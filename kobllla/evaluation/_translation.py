"""Translation tasks: lm_eval ``generate_until`` on local held-out sentence pairs, chrF++ and BLEU.

One task per direction, ``kobllla_translation_ko_zh`` and ``kobllla_translation_zh_ko``; the group
``kobllla_translation`` (and the suite ``translation``) runs both. The held-out pairs live in one
directory (``--translation-data DIR``), line-aligned Moses files or one JSON Lines file::

    DIR/test.ko + DIR/test.zh          (one sentence per line, same line count)
    DIR/test.jsonl                     ({"ko": "...", "zh": "..."} per line)

Prompt: the training prompt of :func:`kobllla.datasets.parallel_dataset` with its default
instruction (in the source language, no system prompt), written out in the Llama 3 chat format up
to the assistant header, so the model continues exactly where training taught it to translate;
no ``--apply_chat_template`` is needed and the other tasks of a run are left untouched.
Generation is greedy and stops at ``<|eot_id|>`` or ``<|end_of_text|>`` (at most
``MAX_GEN_TOKS`` new tokens). A hypothesis is put on one line (whitespace runs, line breaks
included, become one space) before scoring, as a line-based scorer would read it.

Metrics, lm_eval's own aggregations over sacrebleu (corpus level):

* ``chrf``: chrF++ (``sacrebleu.corpus_chrf(word_order=2)``, lm_eval's ``chrf++`` aggregation),
  what ``sacrebleu REF -i HYP -m chrf --chrf-word-order 2`` prints;
* ``bleu``: corpus BLEU with sacrebleu's tokenizer for the target script: ``zh`` for Chinese
  (unsegmented text under ``13a`` would score whole sentences as one word), ``13a`` for Korean
  (lm_eval's own ``bleu`` aggregation; Korean is written with spaces).

Both are 0-100, higher is better, and gate like any other metric
(``--gate kobllla_translation_ko_zh/chrf=1.0``). The run record also stores every hypothesis next
to its source and reference (``samples``), so a score can be re-checked with the sacrebleu CLI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TRANSLATION_GROUP = "kobllla_translation"
TRANSLATION_TASKS: dict[str, tuple[str, str]] = {
    "kobllla_translation_ko_zh": ("ko", "zh"),
    "kobllla_translation_zh_ko": ("zh", "ko"),
}
# Bump when the prompt, generation settings or metrics change: scores of different versions
# are never compared (the report refuses).
TRANSLATION_VERSION = 1.0
MAX_GEN_TOKS = 256
SACREBLEU_TOKENIZE = {"zh": "zh", "ko": "13a"}
HOOKS_MODULE = "kobllla_translation_hooks"  # written next to the task YAMLs (lm_eval's !function)


def is_translation_task(name: str) -> bool:
    return name in TRANSLATION_TASKS


def _data_files(data_dir: Path, src: str, tgt: str) -> tuple[str, list[Path]]:
    moses = [data_dir / f"test.{src}", data_dir / f"test.{tgt}"]
    jsonl = data_dir / "test.jsonl"
    if all(p.is_file() for p in moses):
        return "moses", moses
    if jsonl.is_file():
        return "jsonl", [jsonl]
    raise FileNotFoundError(
        f"--translation-data {data_dir}: no held-out pairs for {src}-{tgt}; write {moses[0].name} + {moses[1].name} "
        f"(line-aligned) or {jsonl.name} ({{\"{src}\": ..., \"{tgt}\": ...}} per line) there"
    )


def read_heldout_pairs(data_dir: Path, src: str, tgt: str) -> tuple[list[tuple[str, str]], list[Path]]:
    """(source, reference) pairs of ``DIR/test.*`` for one direction, and the files read.

    Raises:
        FileNotFoundError: neither layout is there.
        ValueError: line counts differ, a missing field, or an empty side (held-out pairs are never dropped).
    """
    from kobllla.datasets._parallel import read_pairs

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--translation-data {data_dir} is not a directory")
    kind, files = _data_files(data_dir, src, tgt)
    if kind == "moses":
        pairs = read_pairs("moses", data_files=str(data_dir / "test"), split="test", src_lang=src, tgt_lang=tgt,
                           src_column=src, tgt_column=tgt)
    else:
        pairs = list(_jsonl_pairs(files[0], src, tgt))
    if not pairs:
        raise ValueError(f"{files[0]}: no pairs; write one sentence pair per line")
    for pair in pairs:
        if not pair.src or not pair.tgt:
            side = src if not pair.src else tgt
            raise ValueError(f"{pair.where}: the {side} side is empty; every held-out pair needs both sentences")
    return [(p.src, p.tgt) for p in pairs], files


def _jsonl_pairs(path: Path, src: str, tgt: str):
    from kobllla.datasets._parallel import Pair
    from kobllla.jsonl import iter_jsonl

    for line_no, row in iter_jsonl(path):
        sides = []
        for lang in (src, tgt):
            value = row.get(lang)
            if not isinstance(value, str):
                found = ", ".join(sorted(map(str, row))) or "none"
                what = type(value).__name__ if lang in row else "missing"
                raise ValueError(
                    f"{path.name} line {line_no}: field {lang!r} is {what} "
                    f"(fields: {found}); every line needs {{\"{src}\": text, \"{tgt}\": text}}"
                )
            sides.append(value.strip())
        yield Pair(f"{path.name} line {line_no}", *sides)


def llama3_prompt(text: str, src: str, tgt: str) -> str:
    """The training prompt of ``parallel_dataset`` for ``text`` (default instruction), as Llama 3 chat text."""
    from kobllla.datasets._parallel import default_template, translation_messages

    messages = translation_messages(text, None, template=default_template(src, tgt), system=None)
    turns = "".join(
        f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.text_content.strip()}<|eot_id|>" for m in messages
    )
    return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


def translation_source(name: str, data_dir: Path | None, max_gen_toks: int | None = None) -> dict:
    """The task's data description for the run record (files, sha256, rows), checked before any model loads.

    ``max_gen_toks`` (default ``MAX_GEN_TOKS``) caps new tokens per hypothesis; a non-default cap is
    part of the task version (``1.0-max8``), so the report never compares it with a default run.
    """
    if max_gen_toks is not None and (isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int)
                                     or max_gen_toks < 1):
        raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    if data_dir is None:
        raise ValueError(
            f"{name} reads local held-out pairs: pass --translation-data DIR (DIR/test.ko + DIR/test.zh, or test.jsonl)"
        )
    src, tgt = TRANSLATION_TASKS[name]
    pairs, files = read_heldout_pairs(Path(data_dir), src, tgt)
    return {
        "source": "local",
        "direction": f"{src}-{tgt}",
        "dir": str(Path(data_dir).resolve()),
        "max_gen_toks": max_gen_toks or MAX_GEN_TOKS,
        "files": {
            f"test.{p.suffix.lstrip('.')}": {
                "path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "rows": len(pairs),
            }
            for p in files
        },
    }


def one_line(resps: list[list[str]], docs) -> list[list[str]]:
    """lm_eval filter: every hypothesis on one line (whitespace runs, line breaks included, -> one space)."""
    return [[" ".join(r.split()) for r in doc_resps] for doc_resps in resps]


def bleu_zh(items: list[tuple[str, str]]) -> float:
    """lm_eval aggregation: corpus BLEU with sacrebleu's ``zh`` tokenizer; items are (reference, hypothesis)."""
    import sacrebleu

    refs, preds = zip(*items, strict=True)
    return sacrebleu.corpus_bleu(list(preds), [list(refs)], tokenize="zh").score


def task_version(max_gen_toks: int) -> str:
    return str(TRANSLATION_VERSION) if max_gen_toks == MAX_GEN_TOKS else f"{TRANSLATION_VERSION}-max{max_gen_toks}"


def _task_yaml(name: str, docs_path: Path, max_gen_toks: int) -> str:
    src, tgt = TRANSLATION_TASKS[name]
    bleu = f"!function {HOOKS_MODULE}.bleu_zh" if SACREBLEU_TOKENIZE[tgt] == "zh" else "bleu"
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(docs_path))}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{reference}}"',
        'target_delimiter: ""',
        "generation_kwargs:",
        f"  until: {json.dumps(['<|eot_id|>', '<|end_of_text|>'])}",
        "  do_sample: false",
        f"  max_gen_toks: {max_gen_toks}",
        "filter_list:",
        "  - name: none",
        "    filter:",
        f"      - {{function: custom, filter_fn: !function {HOOKS_MODULE}.one_line}}",
        "      - {function: take_first}",
        "metric_list:",
        "  - {metric: chrf, aggregation: chrf++, higher_is_better: true}",
        f"  - {{metric: bleu, aggregation: {bleu}, higher_is_better: true}}",
        "metadata:",
        f"  version: {json.dumps(task_version(max_gen_toks))}",
        "",
    ])


def write_translation_yamls(names: list[str], sources: dict[str, dict], include_dir: Path) -> None:
    """Writes each direction's documents (prompt, reference) and task YAML into ``include_dir``."""
    include_dir = Path(include_dir)
    include_dir.mkdir(parents=True, exist_ok=True)
    (include_dir / f"{HOOKS_MODULE}.py").write_text(
        f"from {__name__} import bleu_zh, one_line  # noqa: F401  (lm_eval's !function loads this file)\n",
        encoding="utf-8",
    )
    for name in names:
        src, tgt = TRANSLATION_TASKS[name]
        pairs, _ = read_heldout_pairs(Path(sources[name]["dir"]), src, tgt)
        docs = include_dir / f"{name}.docs.jsonl"
        with open(docs, "w", encoding="utf-8") as handle:
            for text, ref in pairs:
                row = {"source": text, "reference": ref, "prompt": llama3_prompt(text, src, tgt)}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        yaml_text = _task_yaml(name, docs, sources[name]["max_gen_toks"])
        (include_dir / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")


def translation_samples(out: dict, name: str) -> list[dict]:
    """Source, reference and scored hypothesis of every document lm_eval logged for ``name``."""
    rows = sorted(out.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
    return [
        {"source": s["doc"]["source"], "reference": s["doc"]["reference"], "hypothesis": s["filtered_resps"][0]}
        for s in rows
    ]
