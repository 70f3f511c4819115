"""Real text that ships inside installed packages, for offline tests and the demo.

* Korean: the Constitution of the Republic of Korea and ten National Assembly bills that
  ``konlpy`` bundles under ``konlpy/data/corpus/`` (plain UTF-8 files; no JVM needed).
* English: the Python reference's topic prose in the standard library's ``pydoc_data.topics``.

Documents are split into a train and a held-out part deterministically (every k-th document),
and written in the shape ``kowikitext_dataset`` reads (a CSV with a ``text`` column).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from kobllla.atomic import refuse_output_over_inputs

_ARTICLE = re.compile(r"^\s*(제\d+조(?:의\d+)?)\s", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One document: where it came from and its text."""

    name: str
    text: str


def _konlpy_corpus_dir() -> Path:
    try:
        import konlpy
    except ImportError as exc:
        raise ImportError(
            "the Korean demo corpus ships in konlpy: pip install 'kobllla[demo]' (konlpy==0.6.0)"
        ) from exc
    return Path(konlpy.__file__).parent / "data" / "corpus"


def constitution_articles() -> list[Document]:
    """The Constitution's preamble and each article (제1조 ... 부칙), one document each."""
    text = (_konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")
    starts = [m.start() for m in _ARTICLE.finditer(text)]
    pieces = [text[: starts[0]], *(text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True))]
    docs = []
    for i, piece in enumerate(pieces):
        lines = [ln.strip() for ln in piece.splitlines() if ln.strip()]
        # chapter headings (제1장 총강) belong to the next article, not the end of this one
        while lines and re.match(r"^제\d+장|^제\d+절|^부칙", lines[-1]) and i + 1 < len(pieces):
            lines.pop()
        if lines:
            docs.append(Document(f"constitution/{i:03d}", "\n".join(lines)))
    return docs


def kobill_documents() -> list[Document]:
    """The ten National Assembly bills, whitespace tidied, one document each."""
    docs = []
    for path in sorted((_konlpy_corpus_dir() / "kobill").glob("*.txt")):
        lines = [re.sub(r"\s+", " ", ln).strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        docs.append(Document(f"kobill/{path.stem}", "\n".join(ln for ln in lines if ln)))
    return docs


def korean_documents() -> list[Document]:
    """All Korean documents konlpy ships (147 documents, ~140 KB of text)."""
    return constitution_articles() + kobill_documents()


def english_documents() -> list[Document]:
    """The Python reference's topics (``pydoc_data.topics``), one document per topic."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc/{key}", text.strip()) for key, text in sorted(topics.items()) if text.strip()]


def split_heldout(docs: list[Document], *, every: int = 10) -> tuple[list[Document], list[Document]]:
    """Every ``every``-th document (by position) is held out; the rest is for training."""
    if every < 2:
        raise ValueError(f"every must be at least 2, got {every}")
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held


def write_text_csv(path: Path, docs: list[Document], *, repeat: int = 1) -> Path:
    """Writes a ``text``-column CSV (the seed's kowikitext shape), documents repeated ``repeat`` times."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        for _ in range(repeat):
            writer.writerows([d.text] for d in docs)
    tmp.replace(path)
    return path


CORPUS_FILES = ("ko_train.csv", "ko_heldout.csv", "en_train.csv", "en_heldout.csv")


def write_demo_corpora(
    out_dir: Path, *, heldout_every: int = 10, overwrite: bool = False
) -> dict[str, tuple[int, int]]:
    """Writes ``ko_{train,heldout}.csv`` and ``en_{train,heldout}.csv`` into ``out_dir``.

    Returns:
        dict: language -> (train documents, held-out documents).

    Raises:
        FileExistsError: one of the four files exists (perhaps edited by hand) and not ``overwrite``.
        ValueError: ``heldout_every`` below 2, or ``out_dir`` inside konlpy's corpus (an input).
    """
    out_dir = Path(out_dir)
    if heldout_every < 2:
        raise ValueError(f"--heldout-every must be at least 2 (every k-th document is held out), got {heldout_every}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; pass a directory for the four CSV files")
    existing = [name for name in CORPUS_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pick another --out or pass "
                              "--overwrite to replace them")
    refuse_output_over_inputs(out_dir, [_konlpy_corpus_dir()])
    counts = {}
    for lang, docs in (("ko", korean_documents()), ("en", english_documents())):
        train, held = split_heldout(docs, every=heldout_every)
        write_text_csv(out_dir / f"{lang}_train.csv", train)
        write_text_csv(out_dir / f"{lang}_heldout.csv", held)
        counts[lang] = (len(train), len(held))
    return counts


def _first_paragraph(text: str) -> tuple[str, str]:
    """(title, first prose paragraph) of a pydoc topic: the heading and the text under it."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    title = blocks[0].splitlines()[0].strip()
    for block in blocks[1:]:
        underlined = any(re.fullmatch(r"[*=\-~^]{3,}", ln.strip()) for ln in block.splitlines())
        if block.startswith(" ") or underlined or block.startswith(("New in version", "Changed in version")):
            continue
        return title, " ".join(line.strip() for line in block.splitlines())
    return title, ""


def english_qa_pairs(docs: list[Document]) -> list[tuple[str, str]]:
    """Question/answer pairs from pydoc topics: the topic's heading asked about, its first paragraph."""
    pairs = []
    for doc in docs:
        title, answer = _first_paragraph(doc.text)
        if answer:
            subject = title[0].lower() + title[1:] if title.startswith("The ") else title
            pairs.append((f"What does the Python reference say about {subject}?", answer))
    return pairs


def korean_qa_pairs(articles: list[Document]) -> list[tuple[str, str]]:
    """KoLIMA-style pairs from the Constitution: a banmal question, a jondaetmal answer."""
    pairs = []
    for doc in articles:
        m = re.match(r"(제\d+조(?:의\d+)?)\s*(.*)", doc.text, re.DOTALL)
        if not m:
            continue
        article, body = m.group(1), " ".join(m.group(2).split())
        pairs.append((f"헌법 {article}는 무슨 내용이야?", f"헌법 {article}는 다음과 같이 정하고 있습니다. {body}"))
    return pairs


def truthfulqa_rows(pairs: list[tuple[str, str]], *, distractors: int = 3) -> list[dict]:
    """TruthfulQA ``multiple_choice`` rows: each question's own answer is true, others' are false.

    Answers are cut to their first sentence; distractors are the next questions' answers, so
    the file is deterministic.
    """
    if len(pairs) <= distractors:
        raise ValueError(f"need more than {distractors} pairs to draw distractors from, got {len(pairs)}")
    firsts = [re.split(r"(?<=[.:])\s", a, maxsplit=1)[0] for _, a in pairs]
    rows = []
    for i, (question, _) in enumerate(pairs):
        choices = [firsts[i]] + [firsts[(i + k) % len(pairs)] for k in range(1, distractors + 1)]
        labels = [1] + [0] * distractors
        rows.append({
            "question": question,
            "mc1_targets": {"choices": choices, "labels": labels},
            "mc2_targets": {"choices": choices, "labels": labels},
        })
    return rows
