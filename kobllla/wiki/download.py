"""Downloads a Wikipedia dump from dumps.wikimedia.org and checks it against the published SHA-1.

The file is streamed to ``.NAME.part`` beside its destination and renamed only once its SHA-1
matches ``{wiki}-{date}-sha1sums.txt``; a file already there with the right SHA-1 is reused.
Wikimedia keeps roughly the last three months of dumps (1st and 20th of each month):
https://dumps.wikimedia.org/kowiki/ lists them. kowiki multistream is about 1 GB.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

import kobllla

DUMP_SITE = "https://dumps.wikimedia.org"
USER_AGENT = f"kobllla/{kobllla.__version__} (ko-wikitext builder; python urllib)"


def dump_url(date: str, *, wiki: str = "kowiki", base_url: str = DUMP_SITE) -> str:
    """URL of ``{wiki}-{date}-pages-articles-multistream.xml.bz2`` on the dump site."""
    if not re.fullmatch(r"\d{8}", date):
        raise ValueError(f"dump date must be YYYYMMDD (e.g. 20240501), got {date!r}")
    return f"{base_url.rstrip('/')}/{wiki}/{date}/{wiki}-{date}-pages-articles-multistream.xml.bz2"


def _open(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310  https/http only
    except urllib.error.HTTPError as exc:
        raise ValueError(
            f"{url}: HTTP {exc.code} {exc.reason}; check the date against the list of dumps at "
            f"{url.rsplit('/', 2)[0]}/"
        ) from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise ValueError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)}); check the network") from None


def expected_sha1(date: str, *, wiki: str = "kowiki", base_url: str = DUMP_SITE, timeout: float = 60) -> str:
    """The SHA-1 that ``{wiki}-{date}-sha1sums.txt`` publishes for the multistream dump."""
    name = dump_url(date, wiki=wiki, base_url=base_url).rsplit("/", 1)[1]
    sums_url = f"{base_url.rstrip('/')}/{wiki}/{date}/{wiki}-{date}-sha1sums.txt"
    with _open(sums_url, timeout) as resp:
        for line in resp.read().decode("utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == name:
                return parts[0].lower()
    raise ValueError(f"{sums_url} lists no {name}; that dump may still be in progress, pick an earlier date")


def _sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> str:
    h = hashlib.sha1()
    with _open(url, timeout) as resp, part.open("wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=part.name, disable=not progress, file=sys.stderr) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def download_dump(
    *,
    date: str,
    dest_dir: Path | str,
    wiki: str = "kowiki",
    base_url: str = DUMP_SITE,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Downloads ``{wiki}-{date}-pages-articles-multistream.xml.bz2`` into ``dest_dir``.

    Returns:
        Path: the verified dump file.

    Raises:
        ValueError: a bad date, an HTTP or network error, or a SHA-1 mismatch (the partial file
            is removed).
    """
    url = dump_url(date, wiki=wiki, base_url=base_url)
    dest = Path(dest_dir) / url.rsplit("/", 1)[1]
    sha1 = expected_sha1(date, wiki=wiki, base_url=base_url, timeout=timeout)
    if dest.is_file() and _sha1_of(dest) == sha1:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    try:
        got = _fetch(url, part, progress=progress, timeout=timeout)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if got != sha1:
        part.unlink(missing_ok=True)
        raise ValueError(f"{url}: downloaded SHA-1 {got} but the dump site lists {sha1}; run the download again")
    os.replace(part, dest)
    return dest
