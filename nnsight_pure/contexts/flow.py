"""The block factories: ``cond(...)``, ``iter(collection)`` and ``iter[calls]``.

One home for them, above the block classes they build (`Conditional`,
`IteratorContext`, `EachCallContext`): a context's ``ctx.cond``/``ctx.iter``
and the module-level ``nnsight_pure.cond``/``iter`` (`toplevel`) all call
these, so the base class never builds its own subclasses.
"""

from __future__ import annotations

from typing import Any

from ..errors import TraceError
from ..source import user_location
from .base import GraphContext
from .calls import EachCallContext, calls_from
from .conditional import Conditional
from .iterator import IteratorContext


def cond(context: GraphContext, condition: Any) -> Conditional:
    """A block in ``context`` run only when ``condition`` is true at run time."""
    return Conditional(context, condition, user_location())


def iterate(context: GraphContext, collection: Any) -> IteratorContext:
    """A block in ``context`` run once per item of ``collection``."""
    return IteratorContext(context, collection, user_location())


class IterSelector:
    """What ``ctx.iter`` gives: call it with a collection, or index it with calls."""

    def __init__(self, context: GraphContext) -> None:
        self._context = context

    def __call__(self, collection: Any) -> IteratorContext:
        return iterate(self._context._within("iter"), collection)

    def __getitem__(self, key: Any) -> EachCallContext:
        trace = self._context._trace
        if trace is None:
            raise TraceError("iter[...] selects calls of modules, so it needs a trace")
        selection = calls_from([key] if isinstance(key, int) else key)
        return EachCallContext(trace._current(), ("",), user_location(), **selection)
