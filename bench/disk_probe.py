"""How fast this machine's disk reads a set of files cold, by read pattern (threads x request size).

    python3 bench/disk_probe.py FILE... [--patterns 8x2,16x2,16x8,32x4,cat] [--limit-gb 30]

Each pattern drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``, root), then reads the
files' first ``--limit-gb`` GB together: the files' blocks are handed out round-robin across files (as
the chat-vector merge reads base, instruct and target slice by slice), ``T`` threads each ``preadv``
``S`` MiB at a time into their own buffer. ``cat`` runs one ``cat`` process per file, in parallel.
One JSON line per pattern: GB read, seconds, GB/s. Measurement only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def plan(files: list[Path], limit: int, size: int) -> list[tuple[Path, int, int]]:
    """(file, offset, n) blocks, round-robin across files, at most ``limit`` bytes in all."""
    per_file = [[(f, off, min(size, f.stat().st_size - off)) for off in range(0, f.stat().st_size, size)]
                for f in files]
    out, total, i = [], 0, 0
    while total < limit and any(i < len(b) for b in per_file):
        for blocks in per_file:
            if i < len(blocks) and total < limit:
                out.append(blocks[i])
                total += blocks[i][2]
        i += 1
    return out


def threaded(files: list[Path], limit: int, threads: int, size: int) -> int:
    blocks = plan(files, limit, size)
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    lock, it, done = threading.Lock(), iter(blocks), [0] * threads

    def worker(k: int) -> None:
        buf = memoryview(bytearray(size))
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            f, off, n = job
            got = 0
            while got < n:
                r = os.preadv(fds[f], [buf[: n - got]], off + got)
                if r == 0:
                    break
                got += r
            done[k] += got

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for fd in fds.values():
        os.close(fd)
    return sum(done)


def cat(files: list[Path], limit: int) -> int:
    """One ``head -c`` per file (the file's share of ``limit``), all at once."""
    share = limit // len(files)
    procs = [subprocess.Popen(f"head -c {share} {f} > /dev/null", shell=True) for f in files]
    for p in procs:
        p.wait()
    return sum(min(share, f.stat().st_size) for f in files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--patterns", default="8x2,16x2,16x8,32x4,cat", help="THREADSxMIB or cat, comma-separated")
    p.add_argument("--limit-gb", type=float, default=30.0)
    a = p.parse_args()
    limit = int(a.limit_gb * 1e9)
    for pat in a.patterns.split(","):
        dropped = drop_caches()
        t = time.perf_counter()
        if pat == "cat":
            n = cat(a.files, limit)
        else:
            threads, mib = (int(x) for x in pat.split("x"))
            n = threaded(a.files, limit, threads, mib * 2**20)
        s = time.perf_counter() - t
        print(json.dumps({"pattern": pat, "gb": round(n / 1e9, 2), "s": round(s, 2), "gb_per_s": round(n / 1e9 / s, 3),
                          "caches_dropped": dropped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
