"""The exceptions and warnings nnsight_pure raises of its own.

Errors from the user's code or the model keep their own type (an
``IndexError`` stays an ``IndexError``); nnsight_pure only adds a note naming
the user's line. The classes here cover misuse that has no natural builtin.
"""

from __future__ import annotations


class TraceError(RuntimeError):
    """A trace was used in a way that cannot work (a proxy that escaped its
    trace, an access outside any trace, nested invokers, ...)."""


class OutOfOrderError(RuntimeError):
    """A write to a module value ran after the model had moved past that value.

    nnsight 0.4 silently ignored such writes; here they fail, naming the line
    of the write and the access that made the model move on.
    """


class UnexecutedInterventionWarning(UserWarning):
    """Part of the intervention never ran because a module access was never
    reached (a module that was not called, or not that many times)."""


class GraphvizNotFoundError(RuntimeError):
    """Drawing a picture needs Graphviz's ``dot`` program, and it is not installed."""


class MissedCallsWarning(UserWarning):
    """A loop over calls (``.all()``, ``.iter[a:b]``) that will not see every
    call: its invoke was still waiting for an access written before the loop
    (say ``model.generator.output``, which comes last) when they happened, or
    its block touches no call of its scope, so it runs once (as in nnsight
    0.4: ``layers.all()`` does not make ``lm_head`` per step; use ``model.all()``)."""


class SerializationError(ValueError):
    """A graph that cannot be written, or a document that must not be read."""


class SweepError(RuntimeError):
    """A sweep could not finish for a reason outside the user's code: the
    workers running a batch kept dying. (An error raised by the model or the
    graph on a batch keeps its own type, with a note naming the batch.)"""

    def __init__(self, message: str, batch: int | None = None) -> None:
        super().__init__(message)
        self.batch = batch


def add_note(exc: BaseException, note: str) -> None:
    """Attach a note to an exception without changing its type (PEP 678).

    Python 3.10 has no ``add_note``; there the note is still recorded in
    ``__notes__`` for tools that read it.
    """
    adder = getattr(exc, "add_note", None)
    if adder is not None:
        adder(note)
    else:  # pragma: no cover - Python 3.10
        notes = list(getattr(exc, "__notes__", []))
        notes.append(note)
        setattr(exc, "__notes__", notes)
