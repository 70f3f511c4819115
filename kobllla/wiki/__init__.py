"""Korean Wikipedia dump -> ko-wikitext corpus: streaming reader, wikitext cleaner, builder, download."""

from kobllla.wiki.build import build_kowikitext, split_of
from kobllla.wiki.download import download_dump, dump_url
from kobllla.wiki.dump import DumpPage, DumpReader
from kobllla.wiki.text import DEFAULT_DROP_SECTIONS, PlainPage, wikitext_to_text

__all__ = [
    "DEFAULT_DROP_SECTIONS", "DumpPage", "DumpReader", "PlainPage", "build_kowikitext",
    "download_dump", "dump_url", "split_of", "wikitext_to_text",
]
