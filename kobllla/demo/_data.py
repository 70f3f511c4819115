"""The demo's data, all from installed packages: nothing is downloaded.

English prose (``pydoc_data.topics``) plus every ``KOREAN_IN_BASE_EVERY``-th Korean training
document pretrains the base (English-first, ~8 % Korean tokens, like Llama 3's mostly-English
mix); English Q/A pairs derived from the prose make the instruct sibling; Korean text (konlpy's
Constitution and bills) is stage 1's corpus, with the opening ``ENGLISH_REPLAY_CHARS`` characters
of every English training document replayed (~25 % of its tokens) so the mini model keeps its
English; KoLIMA
pairs derived from the Constitution and the hand-written parallel BiLIMA rows shipped in
``kobllla/data/bilima_demo.jsonl`` are stage 3's;
held-out parts of each (every 10th document, never trained on by any stage) are the evaluation's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from kobllla.corpora import (
    Document,
    constitution_articles,
    english_documents,
    english_qa_pairs,
    kobill_documents,
    korean_qa_pairs,
    split_heldout,
    truthfulqa_rows,
    write_text_csv,
)
from kobllla.jsonl import iter_jsonl

KOREAN_IN_BASE_EVERY = 3  # every 3rd Korean training document goes into the base's pretraining text
# Stage 1 replays the opening of every English training document (~25 % of its tokens): a replay of
# a few whole documents (24 % or 55 % of the tokens) raised English held-out perplexity by 29 % or
# more (measured; configs/demo/stage1_kowiki_lora.yaml), as it fits those documents' words, not English.
ENGLISH_REPLAY_CHARS = 800

BILIMA_DEMO = Path(__file__).resolve().parent.parent / "data" / "bilima_demo.jsonl"
# lm_eval's truthfulqa_mc2 reads truthful_qa/multiple_choice; kobllla.evaluation's --data-dir layout:
TRUTHFULQA_FILE = Path("truthfulqa") / "truthful_qa" / "multiple_choice" / "validation.jsonl"


@dataclass(frozen=True)
class DemoData:
    """Paths of everything the demo trains and evaluates on."""

    root: Path
    base_train: Path
    stage1_train: Path
    en_train: Path
    ko_train: Path
    en_heldout: Path
    ko_heldout: Path
    en_qa_train: Path
    en_qa_heldout: Path
    kolima_train: Path
    kolima_heldout: Path
    bilima: Path
    eval_dir: Path

    @classmethod
    def at(cls, root: Path) -> DemoData:
        root = Path(root)
        return cls(
            root=root, base_train=root / "base_train.csv", stage1_train=root / "stage1_train.csv",
            en_train=root / "en_train.csv", ko_train=root / "ko_train.csv",
            en_heldout=root / "en_heldout.txt", ko_heldout=root / "ko_heldout.txt",
            en_qa_train=root / "en_qa_train.jsonl", en_qa_heldout=root / "en_qa_heldout.jsonl",
            kolima_train=root / "kolima_train.jsonl", kolima_heldout=root / "kolima_heldout.jsonl",
            bilima=root / "bilima_demo.jsonl", eval_dir=root / "eval",
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
    ko_in_base = ko_train[KOREAN_IN_BASE_EVERY - 1 :: KOREAN_IN_BASE_EVERY]
    write_text_csv(data.base_train, en_train + ko_in_base)
    replay = [Document(d.name, d.text[:ENGLISH_REPLAY_CHARS]) for d in en_train]
    write_text_csv(data.stage1_train, ko_train + replay)
    _write_heldout(data.en_heldout, [d.text for d in en_held], max_chars=heldout_chars)
    _write_heldout(data.ko_heldout, [d.text for d in ko_held], max_chars=heldout_chars // 2)  # Korean: ~2x tokens/char
    qa_train, qa_held = english_qa_pairs(en_train), english_qa_pairs(en_held)
    _write_jsonl(data.en_qa_train, [{"conversations": list(p)} for p in qa_train])
    _write_jsonl(data.en_qa_heldout, [{"conversations": list(p)} for p in qa_held])
    ko_pairs = korean_qa_pairs([d for d in ko_train if d.name.startswith("constitution/")])
    _write_jsonl(data.kolima_train, [{"conversations": list(p)} for p in ko_pairs])
    ko_pairs_held = korean_qa_pairs([d for d in ko_held if d.name.startswith("constitution/")])
    _write_jsonl(data.kolima_heldout, [{"conversations": list(p)} for p in ko_pairs_held])
    shutil.copyfile(BILIMA_DEMO, data.bilima)
    tqa = data.eval_dir / TRUTHFULQA_FILE
    tqa.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(tqa, truthfulqa_rows(qa_held + qa_train[: max(0, 16 - len(qa_held))]))
    en_tokens, ko_tokens = _token_count(en_train), _token_count(ko_in_base)
    bilima_rows = [row for _, row in iter_jsonl(BILIMA_DEMO)]
    stage3_ko = _token_count([Document("", " ".join(p)) for p in ko_pairs]) + 2 * sum(
        _token_count([Document("", " ".join(row["en"] + row["ko"]))]) for row in bilima_rows)
    stage3_en = _token_count([Document("", " ".join(p)) for p in qa_train])
    ko_all, replay_tokens = _token_count(ko_train), _token_count(replay)
    counts = {
        "en_train_docs": len(en_train), "ko_train_docs": len(ko_train), "ko_in_base_docs": len(ko_in_base),
        "base_en_tokens": en_tokens, "base_ko_tokens": ko_tokens,
        "base_ko_share": round(ko_tokens / (en_tokens + ko_tokens), 4), "kolima_heldout": len(ko_pairs_held),
        "stage1_ko_tokens": ko_all, "stage1_en_replay_tokens": replay_tokens,
        "stage1_en_replay_share": round(replay_tokens / (ko_all + replay_tokens), 4),
        "stage3_en_replay_share": round(stage3_en / (stage3_ko + stage3_en), 4), "en_qa_train": len(qa_train),
        "en_qa_heldout": len(qa_held), "kolima_train": len(ko_pairs),
        "bilima_rows": len(bilima_rows),
        "truthfulqa_questions": max(16, len(qa_held)),
    }
    return data, counts


def _token_count(docs: list) -> int:
    """Llama 3 tokens of the documents' text (as the base's dataset counts them: no BOS/EOS)."""
    from tokenizers import Tokenizer

    from kobllla.assets import llama3_tokenizer_json_path

    tok = Tokenizer.from_file(str(llama3_tokenizer_json_path()))
    return sum(len(tok.encode(d.text, add_special_tokens=False).ids) for d in docs)
