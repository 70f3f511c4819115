"""Wikitext to plain text in the ko-wikitext layout, with mwparserfromhell.

The output keeps the seed's wikitext-103 headings (`` = 제목 =`` for the article,
`` = = 역사 = =`` for a level-2 section, one more ``= `` per level), one blank line between
blocks, and drops what is not running prose:

- templates (infoboxes, citations, ``{{lang|..}}``), comments, magic words;
- ``<ref>``/``<references>``, tables, galleries, math, timelines and other non-text tags;
- file, image and category links, interlanguage links; bare URLs (``[url label]`` keeps the label);
- reference sections (같이 보기, 각주, 참고 문헌, 외부 링크 by default) with their subsections;
- sections left empty; parentheses and labels left empty by removed templates
  (``서울(영어: {{lang|en|Seoul}}, 한자: 서울)`` -> ``서울(한자: 서울)``); magic words (``__NOTOC__``).

Links keep their displayed text (``[[수도|수도이다]]`` -> ``수도이다``); list markers go, items stay
one a line. The result is NFC-normalised.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import mwparserfromhell
from mwparserfromhell.nodes import (
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

DEFAULT_DROP_SECTIONS: tuple[str, ...] = ("같이 보기", "각주", "참고 문헌", "외부 링크")
# Namespaces whose links render as media or page metadata, not text (Korean names and English aliases).
MEDIA_NAMESPACES = frozenset({"파일", "file", "그림", "image", "미디어", "media", "분류", "category"})
DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline", "graph",
    "imagemap", "inputbox", "templatedata", "categorytree", "section", "mapframe", "maplink", "hiero",
})
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]+)*|simple")
_SPACES = re.compile(r"[ \t\u00a0\u200b]+")
_EDGE_COMMA_L = re.compile(r"\(\s*[,;·]\s*")
_EDGE_COMMA_R = re.compile(r"\s*[,;·]\s*\)")
_EMPTY_PARENS = re.compile(r"\s?\(\s*\)")
_EMPTY_LABEL = re.compile(r"([(,;]\s*)[^(),:;]{1,12}:\s*(?=[,;)])")  # "(영어: )" once {{lang}} is gone
_MAGIC_WORD = re.compile(r"__[A-Z가-힣]+__")  # __NOTOC__, __목차숨김__
_NO_WORDS = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class PlainPage:
    """A cleaned article: ``text`` (title heading first) and the body's character count."""

    text: str
    body_chars: int

    @property
    def body(self) -> str:
        """Everything after the title line: the key for exact-duplicate removal."""
        return self.text.partition("\n")[2]


def _link_is_media(link: Wikilink) -> bool:
    target = str(link.title).strip()
    if ":" not in target or target.startswith(":"):
        return False
    prefix = target.split(":", 1)[0].strip()
    return prefix.lower() in MEDIA_NAMESPACES or _INTERLANGUAGE.fullmatch(prefix) is not None


def _render(code: Wikicode | None) -> str:
    return "" if code is None else "".join(_render_node(n) for n in code.nodes)


def _render_node(node: object) -> str:
    if isinstance(node, Text):
        return node.value
    if isinstance(node, Wikilink):
        if _link_is_media(node):
            return ""
        return _render(node.text) if node.text is not None else str(node.title).strip().lstrip(":")
    if isinstance(node, ExternalLink):
        return _render(node.title) if node.title is not None else ""
    if isinstance(node, HTMLEntity):
        return node.normalize()
    if isinstance(node, Tag):
        tag = str(node.tag).strip().lower()
        if tag in DROP_TAGS:
            return ""
        if tag in ("br", "hr"):
            return "\n"
        return _render(node.contents) if node.contents is not None else ""
    return ""  # Template, Comment, Argument, Heading: not prose


def _clean_line(line: str) -> str:
    line = _SPACES.sub(" ", _MAGIC_WORD.sub("", line)).strip()
    line = _EMPTY_LABEL.sub(r"\1", line)
    line = _EDGE_COMMA_R.sub(")", _EDGE_COMMA_L.sub("(", line))
    line = _EMPTY_PARENS.sub("", line)
    return "" if _NO_WORDS.fullmatch(line) else line


def clean_block(wikitext_render: str) -> str:
    """Cleans rendered text line by line; keeps one blank line between paragraphs."""
    out: list[str] = []
    for raw in wikitext_render.split("\n"):
        line = _clean_line(raw)
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def _sections(code: Wikicode) -> list[tuple[int, str, str]]:
    """(level, title, cleaned body) for every section; the lead has level 1 and no title."""
    out = []
    for section in code.get_sections(flat=True, include_lead=True):
        nodes = section.nodes
        if nodes and isinstance(nodes[0], Heading):
            title = _clean_line(_render(nodes[0].title))
            body = clean_block("".join(_render_node(n) for n in nodes[1:]))
            out.append((nodes[0].level, title, body))
        else:
            out.append((1, "", clean_block(_render(section))))
    return out


def _drop_reference_sections(
    sections: list[tuple[int, str, str]], drop: frozenset[str]
) -> list[tuple[int, str, str]]:
    kept, drop_level = [], None
    for level, title, body in sections:
        if drop_level is not None and level > drop_level:
            continue
        drop_level = level if title in drop else None
        if drop_level is None:
            kept.append((level, title, body))
    return kept


def _heading(level: int, title: str) -> str:
    return " " + "= " * level + title + " =" * level


def wikitext_to_text(
    title: str, wikitext: str, *, drop_sections: tuple[str, ...] = DEFAULT_DROP_SECTIONS
) -> PlainPage:
    """Converts one article's wikitext to the ko-wikitext layout.

    Args:
        title (str): the page title, written as the `` = title =`` first line.
        wikitext (str): the revision text from the dump.
        drop_sections (tuple[str, ...]): section titles dropped with their subsections.

    Returns:
        PlainPage: NFC text and the number of body characters (headings excluded).
    """
    sections = _drop_reference_sections(
        _sections(mwparserfromhell.parse(wikitext)), frozenset(drop_sections)
    )
    keep = [bool(body) for _, _, body in sections]
    for i in range(len(sections) - 1, -1, -1):  # keep a heading whose subsections have text
        j = i + 1
        while j < len(sections) and sections[j][0] > sections[i][0]:
            keep[i] = keep[i] or keep[j]
            j += 1
    blocks = [_heading(1, _clean_line(title))]
    for (level, head, body), k in zip(sections, keep, strict=True):
        if k and head:
            blocks.append(_heading(level, head))
        if k and body:
            blocks.append(body)
    text = unicodedata.normalize("NFC", "\n\n".join(blocks))
    return PlainPage(text, sum(len(unicodedata.normalize("NFC", b)) for _, _, b in sections if b))
