"""Build the ko-wikitext corpus (train/dev/test + manifest) from a Korean Wikipedia dump.

    python -m tools.build_kowikitext --download 20240501 --out data/kowikitext-20240501
    python -m tools.build_kowikitext --dump kowiki-20240501-pages-articles-multistream.xml.bz2 \\
        --out data/kowikitext-20240501                       # parquet: id, title, text
    python -m tools.build_kowikitext --dump kowiki.xml.bz2 --out data/kowikitext-csv --format csv  # seed's CSV
    python -m tools.build_kowikitext --dump tiny.xml --out /tmp/kw --workers 1 --min-chars 20  # tiny CPU check

Streams the dump in constant memory on every core, keeps main-namespace articles that are not
redirects, converts wikitext to plain text (section titles as `` = = 역사 = =``; templates,
tables, files, categories and reference sections removed; NFC), drops pages shorter than
--min-chars and exact duplicates, and splits train/dev/test by a hash of the page id. The output
directory appears only when complete; manifest.json (counts by drop reason, characters,
settings, the dump's SHA-1) is written last. Stage 1 reads it with
``kobllla.datasets.kowikitext_dataset(source=DIR/train.parquet)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kobllla.cli import USER_ERRORS, make_parser, number_arg, run
from kobllla.wiki import DEFAULT_DROP_SECTIONS, build_kowikitext, download_dump

_AT_LEAST_1 = number_arg(int, minimum=1)
_AT_LEAST_0 = number_arg(int, minimum=0)
_FRACTION = number_arg(float, minimum=0, below=1)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, prog="python -m tools.build_kowikitext")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dump", type=Path, help="MediaWiki XML export: .xml, .xml.bz2 (multistream too), .xml.gz")
    source.add_argument("--download", metavar="YYYYMMDD",
                        help="fetch kowiki-YYYYMMDD-pages-articles-multistream.xml.bz2 first")
    parser.add_argument("--download-dir", type=Path, default=Path("data/dumps"), help="where --download saves the dump")
    parser.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv"],
                        help="parquet (id, title, text) or the seed's CSV (text)")
    parser.add_argument("--min-chars", type=_AT_LEAST_0, default=100,
                        help="drop pages whose body is shorter (default 100)")
    parser.add_argument("--dev-fraction", type=_FRACTION, default=0.005,
                        help="expected share of pages in dev, by a hash of the page id (default 0.005)")
    parser.add_argument("--test-fraction", type=_FRACTION, default=0.005,
                        help="expected share of pages in test, by a hash of the page id (default 0.005)")
    parser.add_argument("--drop-section", action="append", metavar="TITLE",
                        help="section title to drop with its subsections (repeatable; default: "
                        f"{', '.join(DEFAULT_DROP_SECTIONS)})")
    parser.add_argument("--workers", type=_AT_LEAST_1, default=None, help="parser processes (default: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # RuntimeError: a parser worker died (killed for memory); the message says to lower --workers
    return run(lambda: _work(args), errors=(*USER_ERRORS, RuntimeError))


def _work(args) -> None:
    dump = args.dump or download_dump(date=args.download, dest_dir=args.download_dir, progress=not args.no_progress)
    manifest = build_kowikitext(
        dump=dump, out_dir=args.out, fmt=args.format, min_chars=args.min_chars,
        dev_fraction=args.dev_fraction, test_fraction=args.test_fraction,
        drop_sections=tuple(args.drop_section or DEFAULT_DROP_SECTIONS), workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    pages = manifest["pages"]
    dropped = ", ".join(f"{k} {v}" for k, v in pages["dropped"].items())
    rows = ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())
    for split in ("dev", "test"):
        if manifest["splits"].get(split, {}).get("rows") == 0:
            fraction = getattr(args, f"{split}_fraction")
            print(f"warning: the {split} split has 0 pages ({pages['kept']} kept x --{split}-fraction {fraction}); "
                  f"raise --{split}-fraction for a held-out set", file=sys.stderr)
    print(f"wrote {args.out}: {pages['kept']} of {pages['read']} pages kept ({rows}); dropped: {dropped}; "
          f"{manifest['characters']:,} characters in {manifest['elapsed_s']} s")

if __name__ == "__main__":
    sys.exit(main())
