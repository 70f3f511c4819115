"""Inductor heuristics for ``persistent_norms``: RMSNorm's row reductions compiled as one pass.

Inductor compiles a reduction along a contiguous row (``ReductionHint.INNER``) *persistent* (each row
loaded once, kept in registers, reduced and used) only while the row has at most 1,024 elements; longer
rows become a loop that reads the row once to reduce it and again to write the result. Llama-3-8B's
RMSNorms reduce rows of 4,096, so each norm's forward and its backward (which also sums the input
gradients of the projections that read the norm's output) read their inputs twice. The eighth session's
profile of a stage-1 step put those backwards alone at 5.6 ms of 215 (docs/benchmarks.md).

:class:`PersistentRowChoices` keeps inductor's own choice everywhere except there: an inner reduction
whose length is statically at most ``max_row`` is compiled persistent. Inductor's multi-kernel mode
(``TORCHINDUCTOR_MULTI_KERNEL=1``) raises the same limit 16-fold but compiles every reduction both ways
and times them, which more than doubles the compile. The choice changes only the generated Triton code's
loop structure (the same sums, in another order within a row); CPU code is unaffected.
"""

from __future__ import annotations

import functools
import logging

from torch._inductor import config as inductor_config
from torch._inductor import virtualized
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

log = logging.getLogger(__name__)


class PersistentRowChoices(InductorChoices):
    """Inductor's choices, with inner reductions over at most ``max_row`` elements compiled persistent.

    Args:
        max_row: the longest row (elements) to reduce in one pass; the model's width for its norms.
    """

    def __init__(self, max_row: int) -> None:
        super().__init__()
        self.max_row = max_row

    def uuid(self) -> str:
        """A key for inductor's compile caches (kernels compiled under other choices are not reused)."""
        return f"kobllla.models._persistent.PersistentRowChoices(max_row={self.max_row})"

    def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:  # noqa: ANN001
        if (inductor_config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, self.max_row)):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)


def use_persistent_rows(max_row: int) -> bool:
    """Makes every later inductor compile in this process use :class:`PersistentRowChoices`.

    Sets ``torch._inductor.config.inductor_choices_class``, this thread's handler and the handler that any
    thread without one gets first (the autograd thread that compiles a backward). Call it before the first
    compile in the process: a thread that already holds inductor's default handler keeps it. Leaves a
    choices class that someone else has set in place (with a warning) and returns ``False`` then.

    Raises:
        ValueError: ``max_row`` is not a positive int.
    """
    if not isinstance(max_row, int) or isinstance(max_row, bool) or max_row < 1:
        raise ValueError(f"max_row must be a positive int, got {max_row!r}")
    factory = functools.partial(PersistentRowChoices, max_row)
    current = inductor_config.inductor_choices_class
    if current is not None and getattr(current, "func", None) is not PersistentRowChoices:
        log.warning("persistent_norms: torch._inductor.config.inductor_choices_class is already %r; "
                    "leaving it (the norms compile as inductor decides)", current)
        return False
    inductor_config.inductor_choices_class = factory
    V.set_choices_handler(factory())
    # torch >= 2.12 keeps config overrides per thread (context variables): the autograd thread that compiles a
    # backward would not see the line above, so a thread's first handler is made by our factory too
    choices_var = getattr(virtualized, "_choices", None)
    if all(hasattr(choices_var, a) for a in ("_default", "_key")) and hasattr(virtualized, "threadlocal"):
        choices_var._default = functools.partial(_thread_default, factory)
    return True


def _thread_default(factory) -> InductorChoices:  # noqa: ANN001
    """A thread's first choices handler (what ``torch._inductor.virtualized._choices_default`` does, ours)."""
    handler = factory()
    setattr(virtualized.threadlocal, virtualized._choices._key, handler)
    return handler
