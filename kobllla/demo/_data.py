"""The demo's data, all from installed packages: nothing is downloaded.

English prose (``pydoc_data.topics``) pretrains the base; English Q/A pairs derived from it make
the instruct sibling; Korean text (konlpy's Constitution and bills) is stage 1's corpus; KoLIMA
pairs derived from the Constitution and the hand-written parallel BiLIMA rows shipped in
``kobllla/data/bilima_demo.jsonl`` are stage 3's; held-out parts of each are the evaluation's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from kobllla.corpora import (
    constitution_articles,
    english_documents,
    english_qa_pairs,
    kobill_documents,
    korean_qa_pairs,
    split_heldout,
    truthfulqa_rows,
    write_text_csv,
)

BILIMA_DEMO = Path(__file__).resolve().parent.parent / "data" / "bilima_demo.jsonl"
# lm_eval's truthfulqa_mc2 reads truthful_qa/multiple_choice; kobllla.evaluation's --data-dir layout:
TRUTHFULQA_FILE = Path("truthfulqa") / "truthful_qa" / "multiple_choice" / "validation.jsonl"


@dataclass(frozen=True)
class DemoData:
    """Paths of everything the demo trains and evaluates on."""

    root: Path
    en_train: Path
    ko_train: Path
    en_heldout: Path
    ko_heldout: Path
    en_qa_train: Path
    en_qa_heldout: Path
    kolima_train: Path
    bilima: Path
    eval_dir: Path

    @classmethod
    def at(cls, root: Path) -> "DemoData":
        root = Path(root)
        return cls(
            root=root, en_train=root / "en_train.csv", ko_train=root / "ko_train.csv",
            en_heldout=root / "en_heldout.txt", ko_heldout=root / "ko_heldout.txt",
            en_qa_train=root / "en_qa_train.jsonl", en_qa_heldout=root / "en_qa_heldout.jsonl",
            kolima_train=root / "kolima_train.jsonl", bilima=root / "bilima_demo.jsonl", eval_dir=root / "eval",
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _write_heldout(path: Path, texts: list[str], *, max_chars: int) -> None:
    kept, total = [], 0
    for text in texts:
        if total + len(text) > max_chars and kept:
            break
        kept.append(text)
        total += len(text)
    path.write_text("\n\n".join(kept) + "\n", encoding="utf-8")


def prepare_data(root: Path, *, heldout_chars: int = 6000) -> tuple[DemoData, dict[str, int]]:
    """Writes every demo data file under ``root``; returns the paths and row counts."""
    data = DemoData.at(root)
    data.root.mkdir(parents=True, exist_ok=True)
    en_train, en_held = split_heldout(english_documents(), every=10)
    ko_train, ko_held = split_heldout(constitution_articles() + kobill_documents(), every=10)
    write_text_csv(data.en_train, en_train)
    write_text_csv(data.ko_train, ko_train)
    _write_heldout(data.en_heldout, [d.text for d in en_held], max_chars=heldout_chars)
    _write_heldout(data.ko_heldout, [d.text for d in ko_held], max_chars=heldout_chars // 2)  # Korean: ~2x tokens/char
    qa_train, qa_held = english_qa_pairs(en_train), english_qa_pairs(en_held)
    _write_jsonl(data.en_qa_train, [{"conversations": list(p)} for p in qa_train])
    _write_jsonl(data.en_qa_heldout, [{"conversations": list(p)} for p in qa_held])
    ko_pairs = korean_qa_pairs([d for d in ko_train if d.name.startswith("constitution/")])
    _write_jsonl(data.kolima_train, [{"conversations": list(p)} for p in ko_pairs])
    shutil.copyfile(BILIMA_DEMO, data.bilima)
    tqa = data.eval_dir / TRUTHFULQA_FILE
    tqa.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(tqa, truthfulqa_rows(qa_held + qa_train[: max(0, 16 - len(qa_held))]))
    counts = {
        "en_train_docs": len(en_train), "ko_train_docs": len(ko_train), "en_qa_train": len(qa_train),
        "en_qa_heldout": len(qa_held), "kolima_train": len(ko_pairs),
        "bilima_rows": sum(1 for _ in open(BILIMA_DEMO, encoding="utf-8")),
        "truthfulqa_questions": max(16, len(qa_held)),
    }
    return data, counts
