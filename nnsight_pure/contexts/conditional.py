"""Conditional: ``with tracer.cond(condition):``, a branch as a sub-graph.

The block is recorded as the body of a `Cond` node and runs only when the
condition (a Python value or a proxy, e.g. ``h[:, 0] > 0``) is true at run
time. Nothing inside leaks out: values made in a branch that did not run
have none.
"""

from __future__ import annotations

from typing import Any

from ..graph import SourceLoc
from ..ops import Cond
from ..proxy import Proxy
from ..source import short
from .base import BodyContext, GraphContext


class Conditional(BodyContext):
    """A branch taken when ``condition`` is true."""

    _node_kind = Cond

    def __init__(self, parent: GraphContext, condition: Any, where: SourceLoc | None) -> None:
        super().__init__(parent, condition, where)
        if not isinstance(condition, Proxy):
            try:
                bool(condition)
            except Exception as error:
                raise TypeError(
                    f"cond(...) at {short(where)} needs a value with a truth value; "
                    f"bool() of a {type(condition).__name__} failed: {error}"
                ) from error

    def __enter__(self) -> Conditional:
        self._push()
        return self


    def __repr__(self) -> str:
        return f"<condition opened at {short(self._where)}>"
