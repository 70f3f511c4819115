"""Read a command's input files into the page cache while Python is still importing torch.

A merge of three 16 GB checkpoints from a cold disk is bound by the disk (~1.5 GB/s measured on
the GPU hosts), and starting Python + torch cold takes ~4.5 s before the first read, during which
the disk sits idle. :func:`prefetch_files` starts a thread that reads the inputs in the order a
merge reads them (groups one after the other, the files of a group round-robin, 8 MiB at a time,
into one reused buffer) until :meth:`Prefetch.stop`,
a byte limit, or the end; the command's own reads then find those pages in memory. It imports
nothing heavy (stdlib only), so a CLI can start it before its imports. It never raises: a file it
cannot read is skipped, and the command reports its own errors. ``KOBLLLA_PREFETCH=0`` turns it off.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CHUNK = 8 << 20
DEFAULT_LIMIT = 8 << 30  # at most this much: a small machine's page cache must still hold it when it is used


class Prefetch:
    """A running (or finished) prefetch; ``bytes_read`` grows while it runs."""

    def __init__(self, groups: list[list[Path]], limit: int) -> None:
        self.groups, self.limit, self.bytes_read = groups, limit, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kobllla-prefetch", daemon=True)

    def start(self) -> Prefetch:
        if any(self.groups) and self.limit > 0:
            self._thread.start()
        return self

    def stop(self) -> int:
        """Stops after the chunk in flight; returns the bytes read."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.bytes_read

    def _run(self) -> None:
        buf = bytearray(CHUNK)
        for group in self.groups:
            if self._read_round_robin(group, buf):
                return

    def _read_round_robin(self, files: list[Path], buf: bytearray) -> bool:
        """Reads ``files`` chunk by chunk in turn to their ends; True once stopped or at the limit."""
        fds = []
        try:
            for f in files:
                try:
                    fds.append([os.open(f, os.O_RDONLY), 0])
                except OSError:
                    continue
            while fds:
                for entry in list(fds):
                    if self._stop.is_set() or self.bytes_read >= self.limit:
                        return True
                    try:
                        n = os.preadv(entry[0], [buf], entry[1])
                    except OSError:
                        n = 0
                    if n <= 0:
                        os.close(entry[0])
                        fds.remove(entry)
                        continue
                    entry[1] += n
                    self.bytes_read += n
            return False
        finally:
            for fd, _ in fds:
                os.close(fd)


def checkpoint_files(dirs: list[Path | None]) -> list[list[Path]]:
    """The weight files of the checkpoint directories grouped shard by shard, each directory's files
    in name order: ``[[first shard of each dir], [second shards], ...]``, the order a merge reads them."""
    per_dir = []
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        names = sorted(p for p in Path(d).iterdir() if p.suffix in (".safetensors", ".pth", ".bin") and p.is_file())
        per_dir.append(names)
    return [[n[i] for n in per_dir if i < len(n)] for i in range(max((len(n) for n in per_dir), default=0))]


def prefetch_files(groups: list[list[Path]], *, limit: int = DEFAULT_LIMIT) -> Prefetch:
    """Starts reading ``groups`` (see :func:`checkpoint_files`) into the page cache on a thread."""
    if os.environ.get("KOBLLLA_PREFETCH", "1") == "0":
        groups = []
    return Prefetch([list(g) for g in groups], limit).start()
