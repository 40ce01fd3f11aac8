"""The local engine of `nnsight_pure.sweeps.sweep`: every batch here, one after another."""

from __future__ import annotations

from typing import Any, Iterator

from ..source import SourceLoc
from .fold import OrderedFold, Spec
from .work import Batch, BatchRunner, note_batch


def run_local(
    runner: BatchRunner, work: Iterator[Batch], spec: Spec, bar: Any, where: SourceLoc | None
) -> tuple[OrderedFold, list[int]]:
    """Run every batch of ``work`` with ``runner``; the fold of their partials
    (and no retried batches: a local batch either runs or raises)."""
    fold = OrderedFold(spec)
    for batch in work:
        try:
            part = runner.run_batch(batch.start, batch.data)
        except Exception as error:
            raise note_batch(error, batch, where)
        fold.add(batch.index, part, batch.size)
        bar.update(1)
    return fold, []
