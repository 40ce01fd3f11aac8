"""What `nnsight_pure.check` reports: frozen, printable findings.

A `Finding` names one problem of an intervention program that would
otherwise show only at run time (an error after the weights ran) or never
(a value that silently stays empty): its kind, a message that reads like the
error the user would get, the node, and the user's line. `Findings` is the
ordered, immutable collection `check` returns; `raise_first` turns it into
the error (or warning) a run would give, for ``validate=True``.

Pure: no torch, no model.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Literal, overload

import attrs

from .errors import MissedCallsWarning, OutOfOrderError
from .source import SourceLoc, short

FindingKind = Literal[
    "out_of_order",  # a write to a module call the model has already passed
    "cross_invoke",  # a write that needs a value another invoke computes only later
    "not_called",  # an access of a module the method never calls
    "call_range",  # an access of call k of a module called fewer times
    "loop_range",  # a loop over calls (.all(), .iter[...]) reaching past the last call
    "empty_loop",  # a loop over calls whose body touches no call of its scope
    "no_backward",  # .grad read or set with no backward() written after it
    "shape",  # a computation that fails on the shapes of the scanned values
]
"""The kinds of finding, each a failure (or a silent no-op) of the real run."""

_WARNINGS: frozenset[str] = frozenset({"empty_loop"})


@attrs.frozen
class Finding:
    """One problem of a program, found before anything runs.

    ``node`` is the node's index in its graph; ``within`` the indexes of
    the context nodes (conditions, loops) the node sits in, outermost
    first (empty: a node of the top-level graph); ``source`` the user's
    line that made the node.
    """

    kind: FindingKind
    message: str
    node: int
    source: SourceLoc | None = attrs.field(default=None)
    within: tuple[int, ...] = ()

    @property
    def is_warning(self) -> bool:
        """Whether the run would only warn (the program runs, doing less than written)."""
        return self.kind in _WARNINGS

    def error(self) -> Exception:
        """The exception (a warning instance for `is_warning`) a run would give."""
        text = str(self)
        if self.kind in ("out_of_order", "cross_invoke"):
            return OutOfOrderError(text)
        if self.kind == "empty_loop":
            return MissedCallsWarning(text)
        if self.kind == "shape":
            return RuntimeError(text)
        return ValueError(text)

    def __str__(self) -> str:
        return f"{self.message} [{self.kind}, at {short(self.source)}]"


@attrs.frozen
class Findings:
    """The findings of one `check`, in program order (empty: nothing found)."""

    items: tuple[Finding, ...] = ()

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @overload
    def __getitem__(self, index: int) -> Finding: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Finding, ...]: ...
    def __getitem__(self, index: int | slice) -> Finding | tuple[Finding, ...]:
        return self.items[index]

    def kinds(self) -> tuple[FindingKind, ...]:
        """Each finding's kind, in order."""
        return tuple(finding.kind for finding in self.items)

    def __str__(self) -> str:
        if not self.items:
            return "no findings"
        return "\n".join(f"{number}. {finding}" for number, finding in enumerate(self.items, 1))


def raise_first(findings: Findings) -> None:
    """What ``validate=True`` does with findings: warn for each warning, and
    raise the first error as the exception a run would raise."""
    for finding in findings:
        if finding.is_warning:
            warnings.warn(str(finding), MissedCallsWarning, stacklevel=2)
    for finding in findings:
        if not finding.is_warning:
            raise finding.error()
