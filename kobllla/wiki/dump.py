"""Streaming reader for MediaWiki XML exports (``kowiki-YYYYMMDD-pages-articles[-multistream].xml[.bz2]``).

Memory stays constant: pages are parsed one at a time with ``xml.etree.ElementTree.iterparse``
and released as soon as they are yielded, so a 1 GB bz2 dump (about 4 GB of XML) never sits in
memory. bz2 (single or multistream), gzip and plain XML are recognised by their first bytes.
The SHA-1 of the file as stored is computed on the way, to compare with Wikimedia's
``kowiki-YYYYMMDD-sha1sums.txt``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REDIRECT_PREFIXES = ("#넘겨주기", "#redirect")


@dataclass(frozen=True)
class DumpPage:
    """One ``<page>`` of the export: its id, namespace, title and latest revision's wikitext."""

    id: int
    ns: int
    title: str
    text: str
    redirect: bool


class _HashingReader:
    """File wrapper that hashes and counts every byte read through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha1 = hashlib.sha1()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha1.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _decompressed(path: Path, raw: _HashingReader) -> BinaryIO:
    with path.open("rb") as probe:
        magic = probe.read(4)
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw)  # type: ignore[arg-type]  # reads every stream of a multistream file
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[arg-type]
    if magic.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        return raw  # type: ignore[return-value]
    raise ValueError(
        f"{path}: not a MediaWiki dump (starts with bytes {magic!r}); pass the .xml.bz2 file from "
        "dumps.wikimedia.org (or its .xml after bunzip2)"
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def is_redirect_text(text: str) -> bool:
    """True for wikitext that starts with ``#넘겨주기`` or ``#REDIRECT`` (any case)."""
    return text.lstrip()[:9].lower().startswith(REDIRECT_PREFIXES)


class DumpReader:
    """Iterates the pages of a MediaWiki XML export in file order, in constant memory.

    After iteration, ``sha1`` (hex digest of the file as stored), ``bytes_read`` and
    ``pages_read`` describe what was read.

    Raises (while iterating):
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a MediaWiki export, is truncated or corrupt, or a page lacks
            ``<id>``/``<ns>``/``<title>``; the message names the file, the page count and the fix.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"dump not found: {self.path}; pass a kowiki-YYYYMMDD-pages-articles-multistream.xml.bz2 "
                "file or use --download YYYYMMDD"
            )
        self.sha1 = ""
        self.bytes_read = 0
        self.pages_read = 0

    def __iter__(self) -> Iterator[DumpPage]:
        try:
            with self.path.open("rb") as f:
                raw = _HashingReader(f)
                yield from self._pages(_decompressed(self.path, raw))
                raw.drain()
                self.sha1, self.bytes_read = raw.sha1.hexdigest(), raw.bytes_read
        except ET.ParseError as exc:
            line, col = exc.position
            raise ValueError(
                f"{self.path}: broken XML at line {line}, column {col} of the decompressed text after "
                f"{self.pages_read} pages ({exc.msg if hasattr(exc, 'msg') else exc}); the file is "
                "truncated or not a MediaWiki export: download it again"
            ) from None
        except EOFError:
            raise ValueError(
                f"{self.path}: compressed data ends early after {self.pages_read} pages (truncated "
                "download?); download it again and compare its sha1 with kowiki-YYYYMMDD-sha1sums.txt"
            ) from None
        except (OSError, gzip.BadGzipFile) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            raise ValueError(
                f"{self.path}: corrupt compressed data after {self.pages_read} pages ({exc}); "
                "download it again"
            ) from None

    def _pages(self, stream: BinaryIO) -> Iterator[DumpPage]:
        events = ET.iterparse(stream, events=("start", "end"))
        _, root = next(events)
        if _local(root.tag) != "mediawiki":
            raise ValueError(
                f"{self.path}: root element is <{_local(root.tag)}>, expected <mediawiki>; this is "
                "not a MediaWiki XML export (Special:Export or dumps.wikimedia.org)"
            )
        ns = root.tag[: root.tag.index("}") + 1] if "}" in root.tag else ""
        page_tag = f"{ns}page"
        for event, elem in events:
            if event == "end" and elem.tag == page_tag:
                yield self._page(elem, ns)
                root.clear()

    def _page(self, elem: ET.Element, ns: str) -> DumpPage:
        self.pages_read += 1
        title = elem.findtext(f"{ns}title")
        fields = {"title": title, "ns": elem.findtext(f"{ns}ns"), "id": elem.findtext(f"{ns}id")}
        for name, value in fields.items():
            if value is None or not value.strip():
                raise ValueError(
                    f"{self.path}: page #{self.pages_read} (title {title!r}) has no <{name}>; "
                    "this is not a MediaWiki export (schema 0.10/0.11)"
                )
        revisions = elem.findall(f"{ns}revision")
        text = (revisions[-1].findtext(f"{ns}text") or "") if revisions else ""
        redirect = elem.find(f"{ns}redirect") is not None or is_redirect_text(text)
        return DumpPage(int(fields["id"]), int(fields["ns"]), str(title), text, redirect)
