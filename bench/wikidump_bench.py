"""Benchmark of the ko-wikitext builder: parser choice, pages/s and peak RSS on generated dumps.

    .venv/bin/python bench/wikidump_bench.py --sizes 5000,20000 --workdir /tmp/wikibench
    .venv/bin/python bench/wikidump_bench.py --sizes 60000 --workers 2 --skip-parsers   # flat RSS at 3x

1. Writes multistream bz2 dumps of realistic Korean pages (tests/_wikidump_fixture.py).
2. Parser choice: converts the same 2,000 articles in one process with mwparserfromhell (the
   builder's converter) and with a wikitextparser pipeline doing the same removals.
3. Runs ``python -m tools.build_kowikitext`` on each dump with 1 worker and with every core;
   reports pages/s and the peak RSS of the largest process (the reader or a worker). Flat RSS
   across dump sizes is the constant-memory claim.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kobllla.wiki.dump import DumpReader  # noqa: E402
from kobllla.wiki.text import DEFAULT_DROP_SECTIONS, clean_block, wikitext_to_text  # noqa: E402
from tests._wikidump_fixture import realistic_pages, write_dump  # noqa: E402


def wtp_text(title: str, wikitext: str) -> str:
    """The same conversion with wikitextparser: the same removals, then ``plain_text``."""
    import re

    import wikitextparser as wtp

    parsed = wtp.parse(wikitext)
    for table in reversed(parsed.get_tables()):
        table.string = ""
    for tag in reversed(parsed.get_tags()):
        if tag.name in ("ref", "references", "gallery", "math"):
            tag.string = ""
    for link in reversed(parsed.wikilinks):  # nested links first, then the file link holding them
        if link.title.split(":", 1)[0].strip() in ("파일", "분류", "File", "Category", "en"):
            link.string = ""
    for link in reversed(parsed.external_links):
        link.string = link.text or ""
    sections, drop_level = [], None
    for section in parsed.get_sections(include_subsections=False):
        level, head = section.level, (section.title or "").strip()
        if drop_level is not None and level > drop_level:
            continue
        drop_level = level if head in DEFAULT_DROP_SECTIONS else None
        if drop_level is None:
            body = wtp.parse(section.contents if level else section.string).plain_text()
            body = re.sub(r"(?m)^[*#:;]+", "", re.sub(r"https?://\\S+", "", body))
            sections.append((level, head, clean_block(body)))
    blocks = [f" = {title} ="]
    for i, (level, head, body) in enumerate(sections):
        end = next((k for k, (lv2, _, _) in enumerate(sections[i + 1:]) if lv2 <= level), len(sections))
        below = [b for lv, _, b in sections[i + 1:i + 1 + end]]
        if head and (body or any(below)):
            blocks.append(" " + "= " * level + head + " =" * level)
        if body:
            blocks.append(body)
    return "\n\n".join(blocks)


def agreement(dump: Path, n: int = 2000) -> float:
    """Share of articles for which both conversions give the same text."""
    articles = [(p.title, p.text) for p in DumpReader(dump) if p.ns == 0 and not p.redirect][:n]
    same = sum(wikitext_to_text(t, w).text == wtp_text(t, w) for t, w in articles)
    return round(same / len(articles), 3)


def parser_rates(dump: Path, n: int = 2000, rounds: int = 3) -> dict[str, float]:
    """Articles per CPU-second for each parser, best of ``rounds`` alternating rounds.

    CPU time (``time.process_time``), not wall time, so other jobs on a shared machine
    distort the comparison less.
    """
    articles = [(p.title, p.text) for p in DumpReader(dump) if p.ns == 0 and not p.redirect][:n]
    parsers = {"mwparserfromhell": lambda t, w: wikitext_to_text(t, w).text, "wikitextparser": wtp_text}
    best = {name: float("inf") for name in parsers}
    for _ in range(rounds):
        for name, fn in parsers.items():
            start = time.process_time()
            for title, text in articles:
                fn(title, text)
            best[name] = min(best[name], time.process_time() - start)
    return {name: round(len(articles) / t) for name, t in best.items()}


def reader_rate(dump: Path) -> float:
    """Pages per CPU-second of the streaming reader alone (bz2 + XML, no cleaning)."""
    start = time.process_time()
    n = sum(1 for _ in DumpReader(dump))
    return round(n / (time.process_time() - start))


def _child(argv: list[str]) -> int:
    """Runs the builder CLI in this process, then prints the peak RSS of it and of its workers."""
    from tools.build_kowikitext import main as build

    rc = build(argv)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "reader_kib": me.ru_maxrss, "worker_kib": kids.ru_maxrss,
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
    }))
    return rc


def run_builder(dump: Path, out: Path, workers: int) -> dict:
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", "--dump", str(dump), "--out", str(out),
           "--workers", str(workers), "--overwrite", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {
        "workers": workers, "pages": manifest["pages"]["read"], "kept": manifest["pages"]["kept"],
        "wall_s": round(wall, 1), "pages_per_s": round(manifest["pages"]["read"] / wall),
        "cpu_s": round(rss["cpu_s"], 1), "pages_per_cpu_s": round(manifest["pages"]["read"] / rss["cpu_s"]),
        "reader_rss_mib": round(rss["reader_kib"] / 1024), "worker_rss_mib": round(rss["worker_kib"] / 1024),
        "dump_mib": round(dump.stat().st_size / 2**20, 1), "chars": manifest["characters"],
        "load1_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000", help="comma-separated page counts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wikibench"))
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and every core)")
    parser.add_argument("--skip-parsers", action="store_true", help="only run the builder")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    dumps = {}
    for n in sizes:
        dumps[n] = args.workdir / f"kowiki-{n}-pages-articles-multistream.xml.bz2"
        if not dumps[n].exists():
            write_dump(dumps[n], realistic_pages(n, seed=n), compress="multistream")
    print("load:", os.getloadavg(), "cores:", os.cpu_count())
    if not args.skip_parsers:
        print("parser articles per CPU-s (2,000 articles, best of 3):", parser_rates(dumps[max(sizes)]))
        print("reader alone, pages per CPU-s:", reader_rate(dumps[max(sizes)]))
        print("same text from both parsers:", agreement(dumps[max(sizes)]))
    counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, os.cpu_count() or 1})
    for n in sizes:
        for workers in counts:
            print(json.dumps(run_builder(dumps[n], args.workdir / f"out-{n}-{workers}", workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
