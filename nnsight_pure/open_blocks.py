"""Which contexts are open, innermost last, in the current thread (or task),
and whether the thread's factory calls are being recorded into them.

A `ContextVar`, not a global: each thread and each asyncio task sees only the
contexts it opened, so two threads can trace at once. Entering a context
pushes it and leaving restores the previous stack, whatever happened.

This is the bottom of the shell: it knows a block only as an `OpenBlock`
(what the stack and the proxies below the blocks ask of one), so it
imports none of them. Every open block is a `contexts.base.GraphContext`;
`contexts.base.innermost` and `open_contexts` give them typed as such.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from types import FrameType


class OpenBlock(Protocol):
    """What is asked of an open block below the blocks themselves: by this
    stack (``_closed``, ``_pop``: finishing a block an interrupt left half
    closed) and by a proxy (``record`` an operation into the innermost block,
    ``_trace`` and ``_is_trace``, and a native ``if``/``for`` on a traced value, which the block
    opens as a condition or a loop, contexts/native_flow.py)."""

    @property
    def _closed(self) -> bool: ...

    @property
    def _trace(self) -> Any: ...

    @property
    def _is_trace(self) -> bool: ...

    def _pop(self) -> None: ...

    def record(self, op: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Any: ...

    def _native_branch(self, proxy: Any, frame: FrameType) -> bool: ...

    def _native_loop(self, proxy: Any, frame: FrameType) -> Any: ...


_OPEN: ContextVar[tuple[OpenBlock, ...]] = ContextVar("nnsight_pure_open_contexts", default=())


def push(context: OpenBlock) -> Token[tuple[OpenBlock, ...]]:
    """Make ``context`` the innermost open context; returns the token to `pop` with."""
    return _OPEN.set(_OPEN.get() + (context,))


def pop(token: Token[tuple[OpenBlock, ...]]) -> None:
    """Restore the open contexts as they were before the matching `push`."""
    _OPEN.reset(token)


def remove(context: OpenBlock) -> None:
    """Close ``context`` here, and anything still open inside it: the open
    contexts become those outside it. One `ContextVar.set`, so an interrupt
    (Ctrl-C) leaves the stack either as it was or without ``context``; a
    no-op when ``context`` is not open."""
    stack = _OPEN.get()
    for position, found in enumerate(stack):
        if found is context:
            _OPEN.set(stack[:position])
            return


def innermost() -> OpenBlock | None:
    """The innermost open context of this thread, or ``None`` outside any."""
    stack = _OPEN.get()
    if not stack:
        return None
    top = stack[-1]
    if top._closed:  # closed, but an interrupt cut its removal short
        stack = _forget_closed()
        return stack[-1] if stack else None
    return top


def open_contexts() -> tuple[OpenBlock, ...]:
    """Every open context of this thread, outermost first."""
    stack = _OPEN.get()
    if stack and stack[-1]._closed:
        return _forget_closed()
    return stack


def _forget_closed() -> tuple[OpenBlock, ...]:
    """Finish closing the blocks an interrupt left on the stack half-closed
    (marked closed, not yet removed): their removal, and their recording."""
    for context in _OPEN.get():
        if context._closed:
            context._pop()  # (idempotent)
    return _OPEN.get()


# --- suspending the recording of factory calls ----------------------------------------
#
# The library's own work inside an open block (scans, loading weights, running
# a graph) must not be recorded as the user's factory calls
# (contexts/recorded_calls.py). Whether this thread suspends that is kept
# here, beside the open blocks, so that the layers below the blocks (runner.py,
# program_check.py) suspend it without importing them.

_SUSPENDED: ContextVar[bool] = ContextVar("nnsight_pure_recording_suspended", default=False)


def suspend() -> Token[bool]:
    """Stop recording in this thread until `resume` (the cheapest form of `suspended`)."""
    return _SUSPENDED.set(True)


def resume(token: Token[bool]) -> None:
    _SUSPENDED.reset(token)


class suspended:
    """``with suspended():`` runs the library's own work inside an open block
    without recording it. (A class, not a generator: it is on every run's path.)"""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _SUSPENDED.set(True)

    def __exit__(self, *exc: object) -> None:
        _SUSPENDED.reset(self._token)
