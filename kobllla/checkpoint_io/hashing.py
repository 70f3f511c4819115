"""sha256 of checkpoint files from the bytes a reader already holds (no second read)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path


class SequentialHasher:
    """sha256 of a whole file, computed from bytes a reader already holds where it can.

    Bytes fed exactly at the running position are hashed at once (no second read); bytes
    fed anywhere else are ignored, and :meth:`finish` reads whatever was not hashed from the
    file itself, so the digest is always that of the complete file, whatever the read order.

    Several threads can hash one file together without a second read: the thread that hands
    out reads calls :meth:`claim` for each slice in read order, and each reader then calls
    :meth:`feed_in_turn`, which waits until the bytes before its slice are hashed. Files are
    hashed in parallel with each other and with the reads (sha256 itself is serial per file);
    hashlib releases the GIL while it hashes.

    Args:
        path (Path): the file.
        prime (int): hash this many leading bytes now (a safetensors header, which the
            tensor reads never cover).
    """

    def __init__(self, path: Path, *, prime: int = 0) -> None:
        self.path = Path(path)
        self.digest = hashlib.sha256()
        self.pos = 0
        if prime:
            with open(self.path, "rb") as handle:
                self.feed(0, memoryview(handle.read(prime)))
        self._claimed = self.pos  # end of the bytes promised by claim()
        self._turn = threading.Condition()
        self._abandoned = False

    def feed(self, offset: int, data: memoryview) -> None:
        if offset == self.pos:
            self.digest.update(data)
            self.pos += len(data)

    def claim(self, offset: int, nbytes: int) -> bool:
        """Promises that ``feed_in_turn(offset, ...)`` will come (called in read order, by one
        thread); False if the slice does not continue the claimed bytes (it is then read by
        :meth:`finish`) and must not be fed in turn."""
        if nbytes <= 0 or offset != self._claimed:
            return False
        self._claimed += nbytes
        return True

    def feed_in_turn(self, offset: int, data: memoryview) -> None:
        """Hashes a claimed slice once every claimed byte before it is hashed."""
        with self._turn:
            self._turn.wait_for(lambda: self.pos == offset or self._abandoned)
            if self._abandoned:
                return
        self.digest.update(data)  # only this thread can be at ``offset``: no lock needed
        with self._turn:
            self.pos += len(data)
            self._turn.notify_all()

    def abandon(self) -> None:
        """A claimed slice will never be fed (its read failed): stop waiting; :meth:`finish`
        then hashes the whole file from its start."""
        with self._turn:
            self._abandoned = True
            self._turn.notify_all()

    def finish(self) -> str:
        if self._abandoned:
            self.digest, self.pos = hashlib.sha256(), 0
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.pos)
            while chunk := handle.read(8 * 2**20):
                self.feed(self.pos, memoryview(chunk))
        return self.digest.hexdigest()
