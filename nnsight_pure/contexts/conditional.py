"""Conditional: ``with tracer.cond(condition):``, a branch as a sub-graph.

The block is recorded as the body of a `Cond` node and runs only when the
condition (a Python value or a proxy, e.g. ``h[:, 0] > 0``) is true at run
time. Nothing inside leaks out: values made in a branch that did not run
have none.

Chains (nnsight 0.4's ``cond.else_()``): after a condition's block has
exited, ``with cond.else_(other):`` is an ``elif`` and ``with cond.else_():``
an ``else``. A chained branch is an ordinary `Cond` node whose condition is
computed by nodes of the graph from the chain's conditions: ``not
any([earlier...])`` for an ``else``, ``all([that, other])`` for an ``elif``.
The chain is in the graph, not in any state kept aside. (The earlier
conditions are read again when the chained condition runs: a branch that
changes its own condition's tensor in place, ``if flag: flag[:] = 0``,
changes what the ``else`` sees; branch on a fresh value, ``flag.clone()``.)
"""

from __future__ import annotations

import operator
from typing import Any

from .. import open_blocks as active
from ..errors import TraceError
from ..graph import SourceLoc
from ..ops import Call, Cond
from ..proxy import Proxy
from ..source import short, user_location
from .base import BodyContext, GraphContext

_ELSE = object()  # `else_()` without a condition


class Conditional(BodyContext):
    """A branch taken when ``condition`` is true."""

    _node_kind = Cond

    def __init__(
        self, parent: GraphContext, condition: Any, where: SourceLoc | None, chain: tuple[Any, ...] | None = None
    ) -> None:
        super().__init__(parent, condition, where)
        if not isinstance(condition, Proxy):
            try:
                bool(condition)
            except Exception as error:
                raise TypeError(
                    f"cond(...) at {short(where)} needs a value with a truth value; "
                    f"bool() of a {type(condition).__name__} failed: {error}"
                ) from error
        # The chain so far: the conditions of this branch and of the earlier ones
        # (what `else_` builds the next branch's condition from).
        self._chain = (condition,) if chain is None else chain
        self._ends_chain = False

    def __enter__(self) -> Conditional:
        self._push()
        return self

    def else_(self, condition: Any = None) -> Conditional:
        """The next branch of this chain: ``else_(other)`` is an ``elif``,
        ``else_()`` an ``else`` (as in nnsight 0.4). Call it after this block
        has exited, in the block that holds it."""
        return self._chained(_ELSE if condition is None else condition, user_location())

    def _chained(self, condition: Any, where: SourceLoc | None) -> Conditional:
        if not self._closed or self._node_ref is None:
            raise TraceError(
                f"else_() at {short(where)}: the condition opened at {short(self._where)} must "
                "have exited (without an error) first"
            )
        if self._ends_chain:
            raise TraceError(
                f"else_() at {short(where)}: the chain ending at {short(self._where)} already has its else"
            )
        parent = self._parent
        assert parent is not None
        if active.innermost() is not parent:
            raise TraceError(
                f"else_() at {short(where)}: call it in the block that holds the condition opened "
                f"at {short(self._where)}, right after that condition"
            )
        final = condition is _ELSE
        conditions = self._chain if final else self._chain + (condition,)
        if not final and not isinstance(condition, Proxy):
            Conditional(parent, condition, where)  # the same check of a plain condition's truth value
        earlier = self._chain
        if any(isinstance(item, Proxy) for item in conditions):
            # `not any(earlier)`, and for an elif `all([that, condition])`: nodes of
            # whitelisted callables, so the chain serializes like any graph.
            taken = parent.record(Call(any), ([*earlier],), source=where)
            none_taken = parent.record(Call(operator.not_), (taken,), source=where)
            test: Any = none_taken if final else parent.record(Call(all), ([none_taken, condition],), source=where)
        else:
            none = not any(earlier)
            test = none if final else none and bool(condition)
        branch = Conditional(parent, test, where, conditions)
        branch._ends_chain = final
        return branch

    def __repr__(self) -> str:
        return f"<condition opened at {short(self._where)}>"
