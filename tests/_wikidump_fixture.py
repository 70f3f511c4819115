"""Writes real MediaWiki XML exports (schema 0.11, as on dumps.wikimedia.org) for tests and benchmarks.

``write_dump(path, pages)`` writes plain XML, one bz2 stream, or a multistream bz2 (100 pages a
stream, like ``kowiki-*-pages-articles-multistream.xml.bz2``). ``realistic_pages(n)`` builds
Korean-Wikipedia-shaped articles from the real Korean text that ships with konlpy (the
Constitution and National Assembly bills): infoboxes, citation templates, links, files,
tables, lists, reference sections, categories, interlanguage links, plus redirects,
non-article pages, stubs and copied articles in realistic proportions.
"""

from __future__ import annotations

import bz2
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

EXPORT_NS = "http://www.mediawiki.org/xml/export-0.11/"

HEADER = f"""<mediawiki xmlns="{EXPORT_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="{EXPORT_NS} http://www.mediawiki.org/xml/export-0.11.xsd" version="0.11" xml:lang="ko">
  <siteinfo>
    <sitename>위키백과</sitename>
    <dbname>kowiki</dbname>
    <base>https://ko.wikipedia.org/wiki/%EC%9C%84%ED%82%A4%EB%B0%B1%EA%B3%BC:%EB%8C%80%EB%AC%B8</base>
    <generator>MediaWiki 1.43.0-wmf.3</generator>
    <case>first-letter</case>
    <namespaces>
      <namespace key="-2" case="first-letter">미디어</namespace>
      <namespace key="0" case="first-letter" />
      <namespace key="4" case="first-letter">위키백과</namespace>
      <namespace key="6" case="first-letter">파일</namespace>
      <namespace key="10" case="first-letter">틀</namespace>
      <namespace key="14" case="first-letter">분류</namespace>
    </namespaces>
  </siteinfo>
"""
FOOTER = "</mediawiki>\n"


@dataclass(frozen=True)
class WikiPage:
    id: int
    title: str
    text: str
    ns: int = 0
    redirect: str | None = None


def page_xml(page: WikiPage) -> str:
    """One ``<page>`` element exactly as MediaWiki's XML export writes it."""
    sha1 = hashlib.sha1(page.text.encode("utf-8")).hexdigest()
    redirect = f"    <redirect title={quoteattr(page.redirect)} />\n" if page.redirect else ""
    return (
        f"  <page>\n    <title>{escape(page.title)}</title>\n    <ns>{page.ns}</ns>\n"
        f"    <id>{page.id}</id>\n{redirect}    <revision>\n      <id>{page.id * 7 + 1}</id>\n"
        f"      <parentid>{page.id * 7}</parentid>\n      <timestamp>2024-05-01T00:00:00Z</timestamp>\n"
        f"      <contributor>\n        <username>Tester</username>\n        <id>42</id>\n      </contributor>\n"
        f"      <comment>test</comment>\n      <origin>{page.id * 7 + 1}</origin>\n"
        f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
        f'      <text bytes="{len(page.text.encode("utf-8"))}" sha1="{sha1}" xml:space="preserve">'
        f"{escape(page.text)}</text>\n      <sha1>{sha1}</sha1>\n    </revision>\n  </page>\n"
    )


def write_dump(path: Path, pages: list[WikiPage], *, compress: str = "bz2") -> Path:
    """Writes ``pages`` as an export; ``compress`` is ``bz2``, ``multistream`` or ``none``."""
    path = Path(path)
    if compress == "none":
        path.write_text(HEADER + "".join(page_xml(p) for p in pages) + FOOTER, encoding="utf-8")
        return path
    if compress == "bz2":
        xml = HEADER + "".join(page_xml(p) for p in pages) + FOOTER
        path.write_bytes(bz2.compress(xml.encode("utf-8"), 9))
        return path
    if compress != "multistream":
        raise ValueError(f"compress must be bz2, multistream or none, got {compress!r}")
    with path.open("wb") as f:
        f.write(bz2.compress(HEADER.encode("utf-8")))
        for start in range(0, len(pages), 100):
            chunk = "".join(page_xml(p) for p in pages[start : start + 100])
            f.write(bz2.compress(chunk.encode("utf-8")))
        f.write(bz2.compress(FOOTER.encode("utf-8")))
    return path


def korean_sentences() -> list[str]:
    """Sentences of the real Korean text in konlpy's corpus folder (about 1,400)."""
    import konlpy

    root = Path(konlpy.__file__).parent / "data" / "corpus"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.txt")))
    parts = re.split(r"(?<=[.다])\s+|\n+", text)
    return [s.strip() for s in parts if 15 <= len(s.strip()) <= 300]


SECTION_TITLES = ["개요", "역사", "지리", "경제", "문화", "교통", "인구", "정치", "교육", "사회"]
SUB_TITLES = ["초기", "현대", "구성", "특징", "평가"]


def _paragraph(rng: random.Random, sents: list[str], links: list[str]) -> str:
    out = []
    for s in rng.sample(sents, rng.randint(2, 5)):
        roll = rng.random()
        if roll < 0.3:
            s = f"{s} [[{rng.choice(links)}]]의 일부이다."
        elif roll < 0.45:
            s = f"{s}<ref>{{{{웹 인용|url=https://example.org/{rng.randint(1, 9999)}|제목=자료}}}}</ref>"
        elif roll < 0.55:
            s = f"'''{s}'''"
        out.append(s)
    return " ".join(out)


def _article(rng: random.Random, title: str, sents: list[str]) -> str:
    links = [s.split()[0] for s in rng.sample(sents, 5)]
    parts = [
        f"{{{{정보상자 지역\n| 이름 = {title}\n| 인구 = {{{{formatnum:{rng.randint(1000, 10**7)}}}}}\n}}}}",
        f"'''{title}'''({{{{lang|en|Title {rng.randint(1, 999)}}}}})은 {_paragraph(rng, sents, links)}",
    ]
    for sec in rng.sample(SECTION_TITLES, rng.randint(2, 5)):
        parts.append(f"== {sec} ==\n{_paragraph(rng, sents, links)}")
        if rng.random() < 0.5:
            parts.append(f"[[파일:{title}.jpg|섬네일|{rng.choice(sents)[:30]}]]")
        if rng.random() < 0.4:
            parts.append(f"=== {rng.choice(SUB_TITLES)} ===\n{_paragraph(rng, sents, links)}")
        if rng.random() < 0.3:
            parts.append("* " + "\n* ".join(s[:60] for s in rng.sample(sents, 3)))
        if rng.random() < 0.25:
            rows = "\n|-\n".join(f"| {rng.randint(1, 99)} || {s[:20]}" for s in rng.sample(sents, 3))
            parts.append(f'{{| class="wikitable"\n! 번호 !! 내용\n|-\n{rows}\n|}}')
    parts.append("== 같이 보기 ==\n* [[" + "]]\n* [[".join(links[:3]) + "]]")
    parts.append("== 각주 ==\n{{각주}}")
    parts.append("== 외부 링크 ==\n* [https://example.org/" + title + " 공식 웹사이트]")
    parts.append(f"{{{{토막글}}}}\n\n[[분류:{links[0]}]]\n[[en:{title}]]")
    return "\n\n".join(parts) + "\n"


def realistic_pages(n: int, *, seed: int = 0) -> list[WikiPage]:
    """``n`` pages: ~80% articles, 10% redirects, 5% templates/categories, 3% stubs, 2% copies."""
    rng = random.Random(seed)
    sents = korean_sentences()
    pages: list[WikiPage] = []
    for i in range(n):
        pid = 5 + 3 * i
        title = f"{rng.choice(sents).split()[0]} {i}"
        roll = rng.random()
        if roll < 0.10 and pages:
            target = rng.choice(pages).title
            pages.append(WikiPage(pid, title, f"#넘겨주기 [[{target}]]", redirect=target))
        elif roll < 0.15:
            ns, prefix = rng.choice([(10, "틀"), (14, "분류"), (4, "위키백과")])
            pages.append(WikiPage(pid, f"{prefix}:{title}", _paragraph(rng, sents, ["문서"]), ns=ns))
        elif roll < 0.18:
            pages.append(WikiPage(pid, title, f"'''{title}'''는 지명이다.\n\n{{{{토막글}}}}"))
        elif roll < 0.20 and pages and pages[-1].ns == 0 and not pages[-1].redirect:
            pages.append(WikiPage(pid, title, pages[-1].text))
        else:
            pages.append(WikiPage(pid, title, _article(rng, title, sents)))
    return pages
