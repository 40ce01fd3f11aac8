"""Session: ``with model.session():``, several traces and the code between them.

The session's graph holds its own nodes (``apply``, lists, loops, conditions)
and one `TraceRun` node per trace opened inside it; nothing runs until the
session exits, and then everything runs in order. A value of one trace can be
used by a later trace, or by the session, without saving it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..graph import SourceLoc
from ..interpreter import run_session
from ..source import short
from . import active, recorded_calls
from .base import GraphContext

if TYPE_CHECKING:
    from ..models.nnsight import NNsight


class Session(GraphContext):
    """The context returned by `NNsight.session`: several traces run as one."""

    def __init__(self, model: NNsight, where: SourceLoc | None, validate: bool = False) -> None:
        super().__init__(model._handle, where, None)
        self._model = model
        self.validate = validate  # the default of the traces opened inside

    def __enter__(self) -> Session:
        for context in active.open_contexts():
            if isinstance(context, Session) and context.handle is self._handle:
                raise ValueError(
                    f"a session of this model is already open (opened at {short(context._where)}); "
                    "sessions do not nest: open traces, loops and conditions inside the one session"
                )
        self._push_safely()
        recorded_calls.session_started()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self._pop()
        finally:
            recorded_calls.session_ended()
        if exc_type is not None:
            self._release()
            return
        try:
            with recorded_calls.suspended():
                results = run_session(self._graph, self._model._run_trace_node)
        except BaseException:
            self._release()
            raise
        self._assign(results)

    def __repr__(self) -> str:
        return f"<session opened at {short(self._where)}>"
