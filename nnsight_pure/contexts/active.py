"""Which contexts are open, innermost last, in the current thread (or task).

A `ContextVar`, not a global: each thread and each asyncio task sees only the
contexts it opened, so two threads can trace at once. Entering a context
pushes it and leaving restores the previous stack, whatever happened.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import GraphContext

_OPEN: ContextVar[tuple[GraphContext, ...]] = ContextVar("nnsight_pure_open_contexts", default=())


def push(context: GraphContext) -> Token[tuple[GraphContext, ...]]:
    """Make ``context`` the innermost open context; returns the token to `pop` with."""
    return _OPEN.set(_OPEN.get() + (context,))


def pop(token: Token[tuple[GraphContext, ...]]) -> None:
    """Restore the open contexts as they were before the matching `push`."""
    _OPEN.reset(token)


def innermost() -> GraphContext | None:
    """The innermost open context of this thread, or ``None`` outside any."""
    stack = _OPEN.get()
    return stack[-1] if stack else None


def open_contexts() -> tuple[GraphContext, ...]:
    """Every open context of this thread, outermost first."""
    return _OPEN.get()
