"""No cyclic garbage collection while the heavy imports build their long-lived objects.

Importing torch, transformers and lm_eval creates millions of objects that live as long as the
process and almost no garbage, yet CPython's collector runs a full (generation 2) pass each time the
heap has grown by a quarter: in ``eval.run``'s MC2 on the mini model, collections took 1.2 s, 1.0 s of
it in 8 full passes (2-core box). Pausing the collector alone only moves that cost to the first pass
after the pause; freezing what the imports built (``gc.freeze``: never scanned again) removes it: 0.23 s.

Freezing is for a process that is ours, a command: a frozen object is still freed by reference
counting, but a reference cycle alive at the freeze is never collected. So commands opt in
(:data:`FREEZE_IMPORTS`, set by ``eval.run`` and ``eval.plan`` when run as commands), and the library
freezes at most once, at its first heavy import, before any model of its own exists; a library caller
(a notebook evaluating several models) only gets the pause.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

FREEZE_IMPORTS = False  # a command sets this: the objects its imports build live until it exits
_frozen = False


@contextmanager
def paused_gc(*, freeze: bool = False) -> Iterator[None]:
    """The collector is off inside the block and back as it was after it; with ``freeze``, what
    exists at the block's end is moved to the permanent generation first."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


@contextmanager
def heavy_imports() -> Iterator[None]:
    """:func:`paused_gc` around imports; frozen after, once per process, where a command opted in."""
    global _frozen
    freeze = FREEZE_IMPORTS and not _frozen
    with paused_gc(freeze=freeze):
        yield
    _frozen = _frozen or freeze
