"""Session: ``with model.session():``, several traces and the code between them.

The session's graph holds its own nodes (``apply``, lists, loops, conditions)
and one `TraceRun` node per trace opened inside it; nothing runs until the
session exits, and then everything runs in order. A value of one trace can be
used by a later trace, or by the session, without saving it. Each trace
node runs through the runner (`runner.session_runner`) with the session's
`ModelAdapter`.
"""

from __future__ import annotations

from .. import open_blocks as active
from ..graph import SourceLoc
from ..interpreter import run_session
from ..runner import ModelAdapter, session_runner
from ..source import short
from . import recorded_calls
from .flow import FlowContext


class Session(FlowContext):
    """The context returned by `NNsight.session`: several traces run as one."""

    def __init__(self, adapter: ModelAdapter, where: SourceLoc | None, validate: bool = False) -> None:
        super().__init__(adapter.handle, where, None)
        self._adapter = adapter
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
                results = run_session(self.graph, session_runner(self._adapter))
        except BaseException:
            self._release()
            raise
        self._assign(results)

    def __repr__(self) -> str:
        return f"<session opened at {short(self._where)}>"
