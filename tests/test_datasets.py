"""Dataset builders on the real Llama 3 tokenizer: exact tokens, labels, masks and errors."""

from __future__ import annotations

import csv
import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.data import Message
from torchtune.datasets import ConcatDataset, PackedDataset

from kobllla.datasets import bilima_dataset, kolima_dataset, kowikitext_dataset
from kobllla.datasets._windows import document_windows, pack_windows
from tests.conftest import make_llama3_tokenizer

BOS, EOS = 128000, 128001
# "대한민국은 민주공화국이다." through Meta's Llama 3 tokenizer.model.
ARTICLE_1_IDS = [113760, 108709, 34804, 127444, 79225, 57390, 100654, 101568, 13]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def targets_after_shift(samples: list[dict]) -> Counter:
    """What the recipe trains on: labels[1:] of each sample, ignore index dropped."""
    counts: Counter = Counter()
    for s in samples:
        labels = [int(x) for x in s["labels"]]
        for pos, label in enumerate(labels[1:], start=1):
            if label != IGNORE:
                counts[(s.get("_origin", 0), pos, label)] += 1
    return counts


# ---------------------------------------------------------------- windows


def test_document_windows_overlap_by_one_token_and_never_end_on_a_lone_token():
    assert document_windows(0, 10, 4) == [(0, 4), (3, 7), (6, 10)]
    assert document_windows(0, 4, 4) == [(0, 4)]
    assert document_windows(0, 5, 4) == [(0, 4), (3, 5)]
    assert document_windows(10, 12, 4) == [(10, 12)]


def test_pack_windows_overlap_only_when_cutting_inside_a_document():
    # documents [0,3) [3,10): first pack ends at 4 (inside doc 2) -> next starts at 3
    assert pack_windows([3, 10], 4) == [(0, 4), (3, 7), (6, 10)]
    # documents [0,4) [4,6): first pack ends exactly at a boundary -> no overlap
    assert pack_windows([4, 6], 4) == [(0, 4), (4, 6)]


# ---------------------------------------------------------------- kowikitext


def test_short_article_is_bos_text_eos_with_labels_equal_to_tokens(tmp_path, llama3_tok):
    f = write_csv(tmp_path / "wiki.csv", ["text"], [["대한민국은 민주공화국이다."]])
    ds = kowikitext_dataset(llama3_tok, source="csv", data_files=str(f), max_seq_len=64)
    assert len(ds) == 1
    assert ds[0]["tokens"] == [BOS, *ARTICLE_1_IDS, EOS]
    # torchtune 0.6.1 convention: labels == tokens, the recipe shifts. Never shift twice.
    assert ds[0]["labels"] == ds[0]["tokens"]


def test_chunking_keeps_every_token_of_a_long_article(assets, llama3_tok):
    ds = kowikitext_dataset(llama3_tok, source=str(assets / "kowiki_tiny.csv"), max_seq_len=16)
    with open(assets / "kowiki_tiny.csv", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["text"].strip()]
    expected = [[BOS, *llama3_tok.encode(t, add_bos=False, add_eos=False), EOS] for t in texts]
    assert max(len(e) for e in expected) > 16 * 4  # the fixture really has a long article
    samples = [ds[i]["tokens"] for i in range(len(ds))]
    assert all(len(s) <= 16 for s in samples)
    # Windows of one article chain by one shared token; undo that and the articles come back.
    rebuilt, current = [], None
    for s in samples:
        if current is not None and s[0] == current[-1] and s[0] != BOS:
            current.extend(s[1:])
        else:
            current = list(s)
            rebuilt.append(current)
    assert rebuilt == expected
    # Every token except each article's BOS is a prediction target exactly once.
    trained = sum(len(s) - 1 for s in samples)
    assert trained == sum(len(e) - 1 for e in expected)


def test_empty_and_whitespace_rows_are_skipped_and_counted(assets, llama3_tok):
    ds = kowikitext_dataset(llama3_tok, source="csv", data_files=str(assets / "kowiki_tiny.csv"), max_seq_len=4096)
    assert (ds.stats.rows, ds.stats.skipped_empty, ds.stats.documents) == (5, 2, 3)
    assert len(ds) == 3


def test_text_is_nfc_normalised(tmp_path, llama3_tok):
    nfd = unicodedata.normalize("NFD", "대한민국은 민주공화국이다.")
    assert nfd != "대한민국은 민주공화국이다."
    f = write_jsonl(tmp_path / "wiki.jsonl", [{"text": nfd}])
    ds = kowikitext_dataset(llama3_tok, source=str(f), max_seq_len=64)
    assert ds[0]["tokens"] == [BOS, *ARTICLE_1_IDS, EOS]


def test_packed_text_fills_every_pack_and_trains_each_token_once(assets, llama3_tok):
    ds = kowikitext_dataset(llama3_tok, source=str(assets / "kowiki_tiny.csv"), max_seq_len=32, packed=True)
    assert isinstance(ds, PackedDataset)  # ConcatDataset and the recipe see it as packed
    packs = [ds[i] for i in range(len(ds))]
    for p in packs:
        assert p["tokens"].shape == (32,) and int(p["seq_lens"].sum()) == 32
    n_pad = [int((p["labels"] == IGNORE).sum()) for p in packs]
    assert all(int((p["tokens"] == llama3_tok.pad_id).sum()) == 0 for p in packs[:-1])  # padding only at the end
    # The targets the recipe trains (labels shifted by one, ignore dropped) are every token of
    # every article except its BOS, each once.
    trained = Counter()
    for p in packs:
        for label in p["labels"].tolist()[1:]:
            if label != IGNORE:
                trained[label] += 1
    with open(assets / "kowiki_tiny.csv", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["text"].strip()]
    expected = Counter()
    for t in texts:
        expected.update([*llama3_tok.encode(t, add_bos=False, add_eos=False), EOS])
    assert trained == expected
    assert n_pad[-1] > 0
    # input_pos restarts at 0 for every piece
    first = packs[0]
    assert first["input_pos"][: int(first["seq_lens"][0])].tolist() == list(range(int(first["seq_lens"][0])))


def test_window_length_defaults_to_the_tokenizers_max_seq_len(assets):
    tok = make_llama3_tokenizer(max_seq_len=24)
    ds = kowikitext_dataset(tok, source=str(assets / "kowiki_tiny.csv"))
    assert max(len(ds[i]["tokens"]) for i in range(len(ds))) == 24


# ---------------------------------------------------------------- kolima


def user_assistant_expected(tok, turns: list[str], system: str | None = None, train_on_input=False):
    parts = [([BOS], True)]
    if system:
        parts.append((tok.tokenize_message(Message(role="system", content=system)), not train_on_input))
    for i, t in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        parts.append((tok.tokenize_message(Message(role=role, content=t)), role == "user" and not train_on_input))
    parts.append(([EOS], True))
    tokens = [t for ids, _ in parts for t in ids]
    labels = [IGNORE if masked else t for ids, masked in parts for t in ids]
    return tokens, labels


def test_chat_masking_covers_exactly_system_and_user_tokens(assets, llama3_tok):
    ds = kolima_dataset(llama3_tok, source=str(assets / "kolima_tiny.jsonl"))
    rows = [json.loads(line) for line in (assets / "kolima_tiny.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(rows):
        tokens, labels = user_assistant_expected(llama3_tok, row["conversations"])
        assert ds[i] == {"tokens": tokens, "labels": labels}
    # The header "<|start_header_id|>user<|end_header_id|>\n\n" of a user turn is masked, the
    # assistant's header and its <|eot_id|> are trained: spelled out for the first row.
    user = llama3_tok.tokenize_message(Message(role="user", content=rows[0]["conversations"][0]))
    assert user[:4] == [128006, 882, 128007, 271] and user[-1] == 128009
    assert ds[0]["labels"][: 1 + len(user)] == [IGNORE] * (1 + len(user))
    assert ds[0]["labels"][1 + len(user)] == 128006 and ds[0]["labels"][-2] == 128009


def test_seed_csv_rows_equal_lima_rows_and_carry_their_system_prompt(assets, llama3_tok):
    seed = kolima_dataset(llama3_tok, source="csv", data_files=str(assets / "kolima_seed.csv"))
    lima = kolima_dataset(llama3_tok, source="json", data_files=str(assets / "kolima_tiny.jsonl"))
    rows = [json.loads(line) for line in (assets / "kolima_tiny.jsonl").read_text(encoding="utf-8").splitlines()]
    tokens, labels = user_assistant_expected(llama3_tok, rows[0]["conversations"],
                                             system="당신은 친절한 한국어 도우미입니다.")
    assert seed[0] == {"tokens": tokens, "labels": labels}
    assert seed[1] == lima[1]  # no system in that CSV row


def test_system_prompt_fills_rows_without_one_and_train_on_input_unmasks_them(assets, llama3_tok):
    ds = kolima_dataset(
        llama3_tok, source=str(assets / "kolima_tiny.jsonl"), system_prompt="한국어로 답하세요.", train_on_input=True
    )
    rows = [json.loads(line) for line in (assets / "kolima_tiny.jsonl").read_text(encoding="utf-8").splitlines()]
    tokens, labels = user_assistant_expected(llama3_tok, rows[2]["conversations"], system="한국어로 답하세요.",
                                             train_on_input=True)
    assert ds[2] == {"tokens": tokens, "labels": labels}
    # everything but BOS and the closing EOS is trained
    assert labels == [IGNORE, *tokens[1:-1], IGNORE]


def test_packed_chat_keeps_whole_samples(assets):
    tok = make_llama3_tokenizer(max_seq_len=256)
    plain = kolima_dataset(tok, source=str(assets / "kolima_tiny.jsonl"))
    packed = kolima_dataset(tok, source=str(assets / "kolima_tiny.jsonl"), packed=True)
    assert isinstance(packed, PackedDataset)
    pack = packed[0]
    n = sum(len(plain[i]["tokens"]) for i in range(len(plain)))
    assert pack["tokens"][:n].tolist() == [t for i in range(len(plain)) for t in plain[i]["tokens"]]
    assert pack["seq_lens"].tolist()[:3] == [len(plain[i]["tokens"]) for i in range(3)]


# ---------------------------------------------------------------- bilima


@pytest.mark.parametrize("mode", ["en_ko", "ko_en"])
def test_bilima_puts_each_language_on_its_side(assets, llama3_tok, mode):
    ds = bilima_dataset(
        llama3_tok, mode=mode,
        en_source=str(assets / "lima_en_tiny.jsonl"), ko_source=str(assets / "kolima_tiny.jsonl"),
    )
    en = [json.loads(line)["conversations"]
          for line in (assets / "lima_en_tiny.jsonl").read_text(encoding="utf-8").splitlines()]
    ko = [json.loads(line)["conversations"]
          for line in (assets / "kolima_tiny.jsonl").read_text(encoding="utf-8").splitlines()]
    user, assistant = (en, ko) if mode == "en_ko" else (ko, en)
    # row 1 has two exchanges: user turns 0 and 2, assistant turns 1 and 3
    turns = [user[1][0], assistant[1][1], user[1][2], assistant[1][3]]
    tokens, labels = user_assistant_expected(llama3_tok, turns)
    assert ds[1] == {"tokens": tokens, "labels": labels}
    assert len(ds) == 3


def test_bilima_paired_file_equals_two_aligned_files(assets, llama3_tok):
    two = bilima_dataset(
        llama3_tok, mode="ko_en",
        en_source=str(assets / "lima_en_tiny.jsonl"), ko_source=str(assets / "kolima_tiny.jsonl"),
    )
    paired = bilima_dataset(llama3_tok, mode="ko_en", source=str(assets / "bilima_paired.jsonl"))
    assert [two[i] for i in range(3)] == [paired[i] for i in range(3)]


def test_bilima_mixes_with_kolima_as_a_list_of_packed_datasets(assets):
    tok = make_llama3_tokenizer(max_seq_len=256)
    parts = [
        kolima_dataset(tok, source=str(assets / "kolima_tiny.jsonl"), packed=True),
        bilima_dataset(tok, mode="en_ko", source=str(assets / "bilima_paired.jsonl"), packed=True),
        bilima_dataset(tok, mode="ko_en", source=str(assets / "bilima_paired.jsonl"), packed=True),
    ]
    mixed = ConcatDataset(parts)
    assert mixed.packed and len(mixed) == sum(len(p) for p in parts)


# ---------------------------------------------------------------- bad input


def test_missing_text_column_names_file_row_and_columns(tmp_path, llama3_tok):
    f = write_csv(tmp_path / "wiki.csv", ["body"], [["가나다"]])
    with pytest.raises(ValueError, match=r"wiki\.csv line 2: no field 'text' \(fields: body\); set column:"):
        kowikitext_dataset(llama3_tok, source=str(f), max_seq_len=16)


def test_empty_file_is_refused(tmp_path, llama3_tok):
    f = tmp_path / "empty.jsonl"
    f.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file has no rows"):
        kolima_dataset(llama3_tok, source=str(f))


def test_unreadable_path_is_refused(tmp_path, llama3_tok):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file"):
        kowikitext_dataset(llama3_tok, source="csv", data_files=str(tmp_path / "nope.csv"), max_seq_len=16)


def test_odd_turn_count_names_the_row(tmp_path, llama3_tok):
    f = write_jsonl(tmp_path / "k.jsonl", [{"conversations": ["a", "b"]}, {"conversations": ["a", "b", "c"]}])
    with pytest.raises(ValueError,
                       match=r"k\.jsonl line 2: field 'conversations' has 3 turns; expected user/assistant pairs"):
        kolima_dataset(llama3_tok, source=str(f))


def test_empty_turn_names_the_row_and_turn(tmp_path, llama3_tok):
    f = write_csv(tmp_path / "seed.csv", ["system", "conversations"], [["", "질문 [sep]  "]])
    with pytest.raises(ValueError, match=r"seed\.csv line 2: conversations\[1\] is empty"):
        kolima_dataset(llama3_tok, source=str(f))


def test_missing_conversation_column(tmp_path, llama3_tok):
    f = write_jsonl(tmp_path / "k.jsonl", [{"messages": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"k\.jsonl line 1: no field 'conversations' \(fields: messages\); "
                                         r"set conversation_column:"):
        kolima_dataset(llama3_tok, source=str(f))


def test_unknown_mode_lists_the_valid_ones(assets, llama3_tok):
    with pytest.raises(ValueError, match=r"unknown mode 'fr_ko'; choose one of \['en_ko', 'ko_en'\]"):
        bilima_dataset(llama3_tok, mode="fr_ko", source=str(assets / "bilima_paired.jsonl"))


def test_bilima_turn_count_mismatch_is_an_error_or_skipped_and_counted(tmp_path, llama3_tok):
    rows = [{"en": ["q", "a"], "ko": ["질문", "답"]}, {"en": ["q", "a", "q2", "a2"], "ko": ["질문", "답"]}]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 2 has 4 English turns but pairs\.jsonl line 2 has "
                                         r"2 Korean turns; .*on_mismatch: skip"):
        bilima_dataset(llama3_tok, mode="en_ko", source=str(f))
    ds = bilima_dataset(llama3_tok, mode="en_ko", source=str(f), on_mismatch="skip")
    assert (len(ds), ds.skipped_rows) == (1, 1)


def test_bilima_row_counts_must_align(tmp_path, assets, llama3_tok):
    short = write_jsonl(tmp_path / "ko_short.jsonl", [{"conversations": ["질문", "답"]}])
    with pytest.raises(ValueError, match=r"English source has 3 rows .* Korean source has 1 .*align row by row"):
        bilima_dataset(llama3_tok, mode="en_ko", en_source=str(assets / "lima_en_tiny.jsonl"), ko_source=str(short))


def test_malformed_jsonl_line_is_named(tmp_path, llama3_tok):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"conversations": ["a", "b"]}\n{"conversations": [\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        kolima_dataset(llama3_tok, source=str(f))


def test_window_length_is_required(assets, llama3_tok):
    with pytest.raises(ValueError, match=r"needs a window length: set tokenizer.max_seq_len or dataset.max_seq_len"):
        kowikitext_dataset(llama3_tok, source=str(assets / "kowiki_tiny.csv"))


def test_rows_are_named_by_the_physical_line_they_start_on_whatever_the_file_looks_like(tmp_path):
    from kobllla.rows import iter_rows

    csv_file = tmp_path / "bom.csv"  # a BOM, CRLF, a quoted field over two lines, a blank line
    csv_file.write_bytes('\ufefftext\r\n"가나\r\n다"\r\n\r\n라마\r\n'.encode())
    assert [(str(ref), row) for ref, row in iter_rows(str(csv_file))] == [
        ("bom.csv line 2", {"text": "가나\r\n다"}), ("bom.csv line 5", {"text": "라마"})]
    jsonl = tmp_path / "crlf.jsonl"
    jsonl.write_bytes('\ufeff{"a": 1}\r\n\r\n{"a": 2}\r\n'.encode())
    assert [(str(ref), row) for ref, row in iter_rows(str(jsonl))] == [("crlf.jsonl line 1", {"a": 1}),
                                                                      ("crlf.jsonl line 3", {"a": 2})]
    f = write_jsonl(tmp_path / "k.jsonl", [{"conversations": ["a", "b"]}])
    f.write_text(f.read_text(encoding="utf-8") + '\n\n{"conversations": ["a"]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^k\.jsonl line 4: field 'conversations' has 1 turns"):
        kolima_dataset(make_llama3_tokenizer(), source=str(f))


def test_a_header_only_csv_or_a_directory_is_refused(tmp_path, llama3_tok):
    (tmp_path / "h.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"h\.csv: the file has no rows \(empty, blank lines or a header only\)"):
        kowikitext_dataset(llama3_tok, source=str(tmp_path / "h.csv"), max_seq_len=16)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.csv: is a directory; point data_files/source at a file in it"):
        kowikitext_dataset(llama3_tok, source="csv", data_files=str(tmp_path / "d.csv"), max_seq_len=16)
