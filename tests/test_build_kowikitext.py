"""ko-wikitext builder on MediaWiki exports that the tests write: exact text, counts, splits, errors."""

from __future__ import annotations

import bz2
import csv
import hashlib
import http.server
import json
import threading
import unicodedata
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kobllla.wiki import (
    DumpReader,
    build_kowikitext,
    download_dump,
    dump_url,
    split_of,
    wikitext_to_text,
)
from tests._wikidump_fixture import (
    FOOTER,
    HEADER,
    WikiPage,
    page_xml,
    realistic_pages,
    write_dump,
)
from tools.build_kowikitext import main

SEOUL_WIKITEXT = """{{다른 뜻|서울 (동음이의)}}
{{정보상자 대한민국의 도시
| 이름 = 서울특별시
| 인구 = {{formatnum:9386034}}
}}
'''서울특별시'''(서울特別市, {{llang|en|Seoul}})는 [[대한민국]]의 [[수도 (도시)|수도]]이다.\
<ref name="헌법">{{웹 인용|url=https://example.org/a|제목=자료}}</ref> 인구는 약 940만 명이다.<!-- 2024년 기준 -->
[[파일:Seoul skyline.jpg|섬네일|서울의 [[스카이라인]]]]

서울은 [https://www.seoul.go.kr 서울시청]이 관리하며 자세한 내용은 https://example.org 에 있다. A&amp;B&nbsp;C

== 역사 ==
백제의 수도 [[위례성]]이 있었다.<ref>출처</ref>
{| class="wikitable"
! 연도 !! 사건
|-
| 1394 || 한양 천도
|}
* 조선의 수도
** 한성부
<math>x^2</math>

=== 근대 ===
1946년 서울특별시가 되었다.

== 빈 절 ==
{{본문|서울의 행정 구역}}

== 각주 ==
{{각주}}

=== 주석 ===
각주 아래의 하위 절은 버려진다.

== 외부 링크 ==
* [https://www.seoul.go.kr 공식 웹사이트]

[[분류:대한민국의 특별시]]
[[en:Seoul]]
"""

SEOUL_BODIES = (  # lead, 역사, 근대: each section body with its own paragraph breaks
    "서울특별시(서울特別市)는 대한민국의 수도이다. 인구는 약 940만 명이다.\n\n"
    "서울은 서울시청이 관리하며 자세한 내용은 에 있다. A&B C",
    "백제의 수도 위례성이 있었다.\n\n조선의 수도\n한성부",
    "1946년 서울특별시가 되었다.",
)
SEOUL_TEXT = (
    f" = 서울특별시 =\n\n{SEOUL_BODIES[0]}\n\n = = 역사 = =\n\n{SEOUL_BODIES[1]}\n\n"
    f" = = = 근대 = = =\n\n{SEOUL_BODIES[2]}"
)
LONG_KO = "한국어 위키백과는 한국어로 운영되는 위키백과로, 누구나 문서를 고칠 수 있는 자유 백과사전이다. " * 3


def rule_pages() -> list[WikiPage]:
    """One page a rule; ids chosen so that 11 and 7 land in train, 1 in test (see split test)."""
    return [
        WikiPage(11, "서울특별시", SEOUL_WIKITEXT),
        WikiPage(12, "서울시", "#넘겨주기 [[서울특별시]]", redirect="서울특별시"),
        WikiPage(13, "Seoul", "#REDIRECT [[서울특별시]]"),  # no <redirect/> element: caught by its text
        WikiPage(14, "틀:정보상자", LONG_KO, ns=10),
        WikiPage(15, "분류:서울", LONG_KO, ns=14),
        WikiPage(16, "토막", "'''토막'''은 짧다.\n\n{{토막글}}"),
        WikiPage(7, unicodedata.normalize("NFD", "위키백과"),
                 "== 개요 ==\n" + unicodedata.normalize("NFD", LONG_KO)),
        WikiPage(17, "위키백과 (사본)", "== 개요 ==\n" + LONG_KO),  # same body as page 7
    ]


def read_split(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def no_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- wikitext -> text


def test_article_text_keeps_prose_and_headings_and_drops_every_non_text_part():
    page = wikitext_to_text("서울특별시", SEOUL_WIKITEXT)
    assert page.text == SEOUL_TEXT
    assert page.body_chars == sum(len(b) for b in SEOUL_BODIES) == 122


def test_reference_sections_are_configurable_and_take_their_subsections_along():
    wikitext = "본문이다.\n== 역사 ==\n옛날.\n=== 각주 ===\n아래.\n== 참고 자료 ==\n자료.\n=== 책 ===\n책들."
    assert wikitext_to_text("T", wikitext).text == (
        " = T =\n\n본문이다.\n\n = = 역사 = =\n\n옛날.\n\n = = 참고 자료 = =\n\n자료.\n\n = = = 책 = = =\n\n책들."
    )
    assert wikitext_to_text("T", wikitext, drop_sections=("참고 자료",)).text == (
        " = T =\n\n본문이다.\n\n = = 역사 = =\n\n옛날.\n\n = = = 각주 = = =\n\n아래."
    )


def test_labels_and_parentheses_emptied_by_removed_templates_go_and_magic_words_go():
    wikitext = (
        "'''서울'''(영어: {{lang|en|Seoul}}, 한자: 서울特別市)은 __NOTOC__ 도시이다. "
        "비(영어: {{lang|en|rain}})가 온다. 그({{llang|en|he}}, )는 간다.__목차숨김__"
    )
    assert wikitext_to_text("서울", wikitext).text == (
        " = 서울 =\n\n서울(한자: 서울特別市)은 도시이다. 비가 온다. 그는 간다."
    )


def test_text_is_nfc_even_when_the_dump_is_decomposed():
    page = wikitext_to_text(unicodedata.normalize("NFD", "한글"), unicodedata.normalize("NFD", "한글 문서이다."))
    assert page.text == " = 한글 =\n\n한글 문서이다."
    assert unicodedata.is_normalized("NFC", page.text)


# ---------------------------------------------------------------- streaming reader


@pytest.mark.parametrize("compress", ["bz2", "multistream", "none"])
def test_reader_streams_every_page_of_each_dump_layout(tmp_path, compress):
    pages = realistic_pages(250, seed=3)
    dump = write_dump(tmp_path / "kowiki.xml.bz2", pages, compress=compress)
    reader = DumpReader(dump)
    got = [(p.id, p.ns, p.title, p.text, p.redirect) for p in reader]
    assert got == [(p.id, p.ns, p.title, p.text, p.redirect is not None) for p in pages]
    assert reader.pages_read == 250
    assert reader.sha1 == hashlib.sha1(dump.read_bytes()).hexdigest()


# ---------------------------------------------------------------- builder


def test_build_writes_exact_text_counts_every_page_by_reason_and_keeps_the_first_duplicate(tmp_path):
    dump = write_dump(tmp_path / "kowiki-20240501-pages-articles.xml.bz2", rule_pages())
    m = build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=1, progress=False)
    rows = {r["id"]: r for s in ("train", "dev", "test") for r in read_split(tmp_path / "out", s)}
    assert sorted(rows) == [7, 11]
    assert rows[11] == {"id": 11, "title": "서울특별시", "text": SEOUL_TEXT}
    assert rows[7]["text"] == " = 위키백과 =\n\n = = 개요 = =\n\n" + LONG_KO.strip()
    assert m["pages"] == {
        "read": 8, "kept": 2,
        "dropped": {"not_article": 2, "redirect": 2, "too_short": 1, "duplicate": 1, "parse_error": 0},
    }
    assert m["characters"] == len(SEOUL_TEXT) + len(rows[7]["text"])
    assert m["dump"]["date"] == "20240501"
    assert m["dump"]["sha1"] == hashlib.sha1(dump.read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dev.parquet", "manifest.json", "test.parquet", "train.parquet"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8")) == m


def test_min_chars_counts_body_characters_only(tmp_path):
    body = "가" * 50
    dump = write_dump(tmp_path / "d.xml", [WikiPage(1, "긴 제목" * 20, body)], compress="none")
    kept = build_kowikitext(dump=dump, out_dir=tmp_path / "a", min_chars=50, workers=1, progress=False)
    assert kept["pages"]["kept"] == 1
    # one character short: nothing left to train on is an error naming the drop counts, not an empty split
    with pytest.raises(ValueError, match=r"^d\.xml: no page kept for the train split \(1 pages read, 0 kept; dropped: "
                       r"not_article 0, redirect 0, too_short 1, duplicate 0, parse_error 0; too_short means under "
                       r"--min-chars 51\); nothing was written: lower --min-chars"):
        build_kowikitext(dump=dump, out_dir=tmp_path / "b", min_chars=51, workers=1, progress=False)
    assert not (tmp_path / "b").exists() and no_leftovers(tmp_path) == []


def test_split_depends_only_on_the_page_id_with_the_requested_shares():
    splits = [split_of(i, dev_fraction=0.05, test_fraction=0.05) for i in range(1, 20001)]
    assert 900 < splits.count("dev") < 1100 and 900 < splits.count("test") < 1100
    assert [split_of(i, dev_fraction=0.05, test_fraction=0.05) for i in range(1, 20001)] == splits
    assert {split_of(i, dev_fraction=0.0, test_fraction=0.0) for i in range(1000)} == {"train"}


def test_every_page_lands_in_the_split_its_id_names_and_output_is_the_same_for_one_or_two_workers(tmp_path):
    pages = realistic_pages(400, seed=5)
    single = write_dump(tmp_path / "single.xml.bz2", pages, compress="bz2")
    multi = write_dump(tmp_path / "multi.xml.bz2", pages, compress="multistream")
    kwargs = {"dev_fraction": 0.1, "test_fraction": 0.1, "progress": False}
    m1 = build_kowikitext(dump=single, out_dir=tmp_path / "w1", workers=1, **kwargs)
    m2 = build_kowikitext(dump=multi, out_dir=tmp_path / "w2", workers=2, batch_size=7, **kwargs)
    for split in ("train", "dev", "test"):
        rows = read_split(tmp_path / "w1", split)
        assert rows == read_split(tmp_path / "w2", split)
        assert {split_of(r["id"], dev_fraction=0.1, test_fraction=0.1) for r in rows} == {split}
        assert m1["splits"][split]["rows"] == len(rows) > 0
    assert m1["pages"] == m2["pages"]
    assert m1["pages"]["read"] == 400 == m1["pages"]["kept"] + sum(m1["pages"]["dropped"].values())
    assert min(m1["pages"]["dropped"][r] for r in ("not_article", "redirect", "too_short", "duplicate")) > 0


def test_csv_output_is_the_seeds_single_text_column(tmp_path):
    dump = write_dump(tmp_path / "d.xml.bz2", rule_pages())
    m = build_kowikitext(dump=dump, out_dir=tmp_path / "csv", fmt="csv", workers=1, progress=False)
    with open(tmp_path / "csv" / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["text"], [SEOUL_TEXT], [" = 위키백과 =\n\n = = 개요 = =\n\n" + LONG_KO.strip()]]
    assert m["splits"]["train"] == {"file": "train.csv", "rows": 2, "chars": m["characters"]}


def test_both_formats_feed_kowikitext_dataset(tmp_path, llama3_tok):
    from kobllla.datasets import kowikitext_dataset

    dump = write_dump(tmp_path / "d.xml.bz2", rule_pages())
    for fmt in ("parquet", "csv"):
        build_kowikitext(dump=dump, out_dir=tmp_path / fmt, fmt=fmt, workers=1, progress=False)
        ds = kowikitext_dataset(llama3_tok, source=str(tmp_path / fmt / f"train.{fmt}"), max_seq_len=4096)
        first = ds[0]["tokens"]
        assert llama3_tok.decode(list(first), skip_special_tokens=True) == SEOUL_TEXT


# ---------------------------------------------------------------- bad input


def build_expecting(tmp_path: Path, dump: Path, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path) == []


def test_missing_dump_names_the_path_and_the_download_option(tmp_path):
    build_expecting(tmp_path, tmp_path / "nope.xml.bz2", FileNotFoundError,
                    r"dump not found: .*nope.xml.bz2; .*--download")


def test_truncated_bz2_fails_naming_the_page_count_and_leaves_no_output(tmp_path):
    dump = write_dump(tmp_path / "d.xml.bz2", realistic_pages(200, seed=1))
    data = dump.read_bytes()
    dump.write_bytes(data[: len(data) // 2])
    build_expecting(tmp_path, dump, ValueError,
                    r"d.xml.bz2: compressed data ends early after \d+ pages .*download it again")


def test_corrupt_bz2_block_is_refused(tmp_path):
    dump = write_dump(tmp_path / "d.xml.bz2", realistic_pages(200, seed=1))
    data = bytearray(dump.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    dump.write_bytes(bytes(data))
    build_expecting(tmp_path, dump, ValueError, r"d.xml.bz2: corrupt compressed data after \d+ pages")


def test_truncated_plain_xml_is_refused_with_line_and_column(tmp_path):
    dump = write_dump(tmp_path / "d.xml", realistic_pages(50, seed=1), compress="none")
    dump.write_text(dump.read_text(encoding="utf-8")[:-200], encoding="utf-8")
    build_expecting(tmp_path, dump, ValueError, r"d.xml: broken XML at line \d+, column \d+ .*after \d+ pages")


def test_xml_that_is_not_a_mediawiki_export_is_refused(tmp_path):
    dump = tmp_path / "feed.xml"
    dump.write_text('<?xml version="1.0"?><rss><channel><title>x</title></channel></rss>', encoding="utf-8")
    build_expecting(tmp_path, dump, ValueError, r"feed.xml: root element is <rss>, expected <mediawiki>")


def test_a_file_that_is_not_xml_at_all_is_refused(tmp_path):
    dump = tmp_path / "kowiki.xml.bz2"
    dump.write_bytes(b"PK\x03\x04 a zip file")
    build_expecting(tmp_path, dump, ValueError, r"kowiki.xml.bz2: not a MediaWiki dump \(starts with bytes b'PK")


def test_a_page_without_an_id_is_refused_naming_the_page(tmp_path):
    xml = page_xml(WikiPage(1, "문서", LONG_KO)).replace("    <id>1</id>\n", "")
    dump = tmp_path / "d.xml.bz2"
    dump.write_bytes(bz2.compress((HEADER + xml + FOOTER).encode("utf-8")))
    build_expecting(tmp_path, dump, ValueError, r"page #1 \(title '문서'\) has no <id>")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    dump = write_dump(tmp_path / "d.xml.bz2", rule_pages())
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match=r"out already exists; .*--overwrite"):
        build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=1, progress=False)
    m = build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=1, progress=False, overwrite=True)
    assert m["pages"]["kept"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"fmt": "json"}, r"format must be 'parquet' or 'csv', got 'json'"),
     ({"dev_fraction": 0.6, "test_fraction": 0.5}, r"dev_fraction 0.6 \+ test_fraction 0.5 must"),
     ({"min_chars": -1}, r"min_chars must be >= 0, got -1"),
     ({"workers": 0}, r"workers must be >= 1, got 0")],
)
def test_bad_settings_are_refused_before_reading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_kowikitext(dump=tmp_path / "unread.xml", out_dir=tmp_path / "out", progress=False, **kwargs)


# ---------------------------------------------------------------- CLI and download


def test_cli_prints_a_summary_and_a_one_line_error(tmp_path, capsys):
    dump = write_dump(tmp_path / "d.xml.bz2", rule_pages())
    assert main(["--dump", str(dump), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 0
    assert "2 of 8 pages kept" in capsys.readouterr().out
    dump.write_bytes(dump.read_bytes()[:100])
    assert main(["--dump", str(dump), "--out", str(tmp_path / "o2"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "ends early" in err


@pytest.fixture()
def mirror(tmp_path):
    """A dump site on 127.0.0.1 serving tmp_path/site like dumps.wikimedia.org/kowiki/DATE/."""
    site = tmp_path / "site"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_fetches_the_multistream_dump_and_checks_its_sha1(tmp_path, mirror):
    site, base = mirror
    day = site / "kowiki" / "20240501"
    day.mkdir(parents=True)
    dump = write_dump(day / "kowiki-20240501-pages-articles-multistream.xml.bz2", rule_pages(), compress="multistream")
    sums = day / "kowiki-20240501-sha1sums.txt"
    sums.write_text(f"{hashlib.sha1(dump.read_bytes()).hexdigest()}  {dump.name}\n0000  other.xml.bz2\n")
    assert dump_url("20240501", base_url=base) == f"{base}/kowiki/20240501/{dump.name}"
    got = download_dump(date="20240501", dest_dir=tmp_path / "dl", base_url=base, progress=False)
    assert got.read_bytes() == dump.read_bytes()
    sums.write_text(f"{'0' * 40}  {dump.name}\n")
    with pytest.raises(ValueError, match=r"downloaded SHA-1 [0-9a-f]{40} but the dump site lists 0{40}"):
        download_dump(date="20240501", dest_dir=tmp_path / "dl2", base_url=base, progress=False)
    assert list((tmp_path / "dl2").iterdir()) == []
    with pytest.raises(ValueError, match=r"kowiki-20240601-sha1sums.txt: HTTP 404"):
        download_dump(date="20240601", dest_dir=tmp_path / "dl3", base_url=base, progress=False)
    with pytest.raises(ValueError, match=r"dump date must be YYYYMMDD \(e.g. 20240501\), got '2024-05-01'"):
        dump_url("2024-05-01")


def _worker_dies(batch, drop_sections):
    import os

    os._exit(1)


def test_a_worker_killed_mid_run_fails_the_build_instead_of_hanging(tmp_path, monkeypatch):
    import kobllla.wiki.build as build

    dump = write_dump(tmp_path / "d.xml.bz2", realistic_pages(100, seed=2))
    monkeypatch.setattr(build, "clean_batch", _worker_dies)
    with pytest.raises(RuntimeError,
                       match=r"a parser worker died after \d+ pages of d.xml.bz2 .*rerun with fewer --workers"):
        build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_a_page_the_parser_cannot_handle_is_counted_and_the_rest_is_built(tmp_path, monkeypatch):
    import kobllla.wiki.build as build

    def fragile(title, wikitext, *, drop_sections):
        if title == "서울특별시":
            raise RecursionError("maximum recursion depth exceeded")
        return wikitext_to_text(title, wikitext, drop_sections=drop_sections)

    monkeypatch.setattr(build, "wikitext_to_text", fragile)
    dump = write_dump(tmp_path / "d.xml.bz2", rule_pages())
    m = build_kowikitext(dump=dump, out_dir=tmp_path / "out", workers=1, progress=False)
    assert (m["pages"]["kept"], m["pages"]["dropped"]["parse_error"]) == (1, 1)
    assert [r["id"] for r in read_split(tmp_path / "out", "train")] == [7]
