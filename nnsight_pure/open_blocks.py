"""Which contexts are open, innermost last, in the current thread (or task).

A `ContextVar`, not a global: each thread and each asyncio task sees only the
contexts it opened, so two threads can trace at once. Entering a context
pushes it and leaving restores the previous stack, whatever happened.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contexts.base import GraphContext

_OPEN: ContextVar[tuple[GraphContext, ...]] = ContextVar("nnsight_pure_open_contexts", default=())


def push(context: GraphContext) -> Token[tuple[GraphContext, ...]]:
    """Make ``context`` the innermost open context; returns the token to `pop` with."""
    return _OPEN.set(_OPEN.get() + (context,))


def pop(token: Token[tuple[GraphContext, ...]]) -> None:
    """Restore the open contexts as they were before the matching `push`."""
    _OPEN.reset(token)


def remove(context: GraphContext) -> None:
    """Close ``context`` here, and anything still open inside it: the open
    contexts become those outside it. One `ContextVar.set`, so an interrupt
    (Ctrl-C) leaves the stack either as it was or without ``context``; a
    no-op when ``context`` is not open."""
    stack = _OPEN.get()
    for position, found in enumerate(stack):
        if found is context:
            _OPEN.set(stack[:position])
            return


def innermost() -> GraphContext | None:
    """The innermost open context of this thread, or ``None`` outside any."""
    stack = _OPEN.get()
    if not stack:
        return None
    top = stack[-1]
    if top._closed:  # closed, but an interrupt cut its removal short
        stack = _forget_closed()
        return stack[-1] if stack else None
    return top


def open_contexts() -> tuple[GraphContext, ...]:
    """Every open context of this thread, outermost first."""
    stack = _OPEN.get()
    if stack and stack[-1]._closed:
        return _forget_closed()
    return stack


def _forget_closed() -> tuple[GraphContext, ...]:
    """Finish closing the blocks an interrupt left on the stack half-closed
    (marked closed, not yet removed): their removal, and their recording."""
    for context in _OPEN.get():
        if context._closed:
            context._pop()  # (idempotent)
    return _OPEN.get()
