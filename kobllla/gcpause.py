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

Training has the same heap: a compiled 8B model, its optimizer and compiled graphs are ~0.5 M long-lived
objects, and a full pass over them stalled the GPU's kernel launches for 0.40 s in one of 30 stage-1 steps
on an H100 (docs/benchmarks.md, "eleventh session"). :class:`FreezeWhileWarming` (the model builders'
``freeze_gc`` option) freezes them after the first forward passes, where compiling has built them, and
leaves the collector on for what comes after.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

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


class FreezeWhileWarming:
    """A forward pre-hook for a training model: at its forward calls 1, 2, 4, ... up to ``last``, collects
    garbage and then freezes every object alive (``gc.freeze``).

    By the first forward the recipe has built the model, optimizer and data; the first calls compile the
    layers (and recompile when a shape turns dynamic), so freezing again at each doubling catches what
    compiling keeps. Each collection after the first walks only what was made since the one before. The
    collector stays on: later garbage cycles are collected as before. What the freezes cost: a reference
    cycle alive at a freeze that becomes garbage later is never collected (its objects are still freed by
    reference counting when no cycle holds them), so the hook stops at ``last``.

    Args:
        last: the last forward call that freezes (the doublings stop after it).
    """

    def __init__(self, last: int = 1024) -> None:
        if not isinstance(last, int) or isinstance(last, bool) or last < 1:
            raise ValueError(f"last must be a positive int, got {last!r}")
        self.last = last
        self.calls = 0
        self.freezes = 0
        self._next = 1

    def __call__(self, module: object, args: object) -> None:
        self.calls += 1
        if self.calls != self._next or self.calls > self.last:
            return
        self._next *= 2
        start = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        self.freezes += 1
        log.debug("freeze_gc: forward %d: collected %d, %d objects frozen, %.3f s", self.calls, collected,
                  gc.get_freeze_count(), time.perf_counter() - start)


def freeze_while_warming(model: object, *, last: int = 1024) -> FreezeWhileWarming:
    """Registers :class:`FreezeWhileWarming` as a forward pre-hook of ``model`` (an ``nn.Module``); returns it."""
    import torch

    hook = FreezeWhileWarming(last)
    model.register_forward_pre_hook(torch.compiler.disable(hook))
    return hook
