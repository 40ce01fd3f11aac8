"""Which ops were read from a document: marks by identity, and nothing else.

`serialize.from_json` marks every op it builds (`mark`); an equal op
recorded in a trace is not marked, as the mark goes with the object. The
marks decide three things elsewhere: such an op runs under the run-time
guard (guard.py, evaluate.py), its node is never shared through the
process-wide table of nodes (graph.py), and its graph's plan is never shared
(plan_cache.py). The marks live here, apart from the guard's checks, so that
the values (graph.py) can ask about them without importing any op.

An entry leaves with its op (a weak reference), so marking keeps nothing
alive. Pure in what it computes; the table is the one state it keeps.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

T = TypeVar("T")

_UNTRUSTED: dict[int, weakref.ref[Any]] = {}
"""Marked ops by identity (an entry leaves with its op)."""


def mark(op: T) -> T:
    """Mark ``op`` as read from a document; returns it."""
    key = id(op)
    _UNTRUSTED[key] = weakref.ref(op, lambda _, key=key: _UNTRUSTED.pop(key, None))  # type: ignore[misc]
    return op


def untrusted(op: object) -> bool:
    """Whether ``op`` (this very object) was read from a document."""
    entry = _UNTRUSTED.get(id(op))
    return entry is not None and entry() is op


def graph_untrusted(graph: Any) -> bool:
    """Whether any op of ``graph`` (or of a body in it) is marked."""
    for node in graph.nodes:
        if untrusted(node.op):
            return True
        body = getattr(node.op, "body", None)
        if body is not None and graph_untrusted(body):
            return True
    return False
