"""The offline corpora are real text from installed packages, split deterministically."""

from __future__ import annotations

import csv

import pytest

from kobllla.corpora import constitution_articles, english_documents, kobill_documents, split_heldout, write_text_csv


def test_constitution_is_split_into_its_articles():
    docs = constitution_articles()
    assert docs[0].text.startswith("대한민국헌법\n유구한 역사와 전통에 빛나는 우리 대한국민은")
    assert docs[1].text.startswith("제1조 ① 대한민국은 민주공화국이다.")
    assert len(docs) == 137 and len(kobill_documents()) == 10


def test_english_documents_come_from_pydoc_topics():
    docs = english_documents()
    assert len(docs) > 50 and any(d.name == "pydoc/with" for d in docs)


def test_heldout_split_is_every_kth_document_and_written_as_a_text_csv(tmp_path):
    docs = constitution_articles()
    train, held = split_heldout(docs, every=10)
    assert len(held) == 13 and held[0] == docs[9] and not set(held) & set(train)
    path = write_text_csv(tmp_path / "ko.csv", held, repeat=2)
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [d.text for d in held] * 2
    with pytest.raises(ValueError, match="every must be at least 2"):
        split_heldout(docs, every=1)
