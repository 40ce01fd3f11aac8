"""The vocabulary of a run: hook events and programs.

A run is driven by *events*: a module call's ``pre`` (inputs) or ``post``
(output) hook, or a gradient's tensor hook. The plan says which events each
node waits for, the interpreter feeds them to the *programs* (one per invoke,
one per gradient hook, ...), and the shell names them in scans and
messages. These are plain values, below the plan, so that the shell can use
them without importing the planner. This module imports nothing of the
library (ops.py takes `AccessKind` from here).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Union

AccessKind = Literal["output", "input", "inputs"]
"""Which value of a module call an access refers to.

``output`` is what the module returned, ``inputs`` is ``(args, kwargs)`` as a
forward-pre-hook sees them, and ``input`` is the first positional argument.
"""

Site = Literal["pre", "post"]
"""Which module hook an event comes from: a call's ``pre`` (inputs) or ``post`` (output) hook."""

EventKey = tuple[str, Site, int]
"""One module call's hook event: (module path, site, call index). A plain
tuple: a hook event builds one per call, and tables hash it in C."""


class GradKey(NamedTuple):
    """The event of the gradient hook of a `Grad`/`SetGrad` node (``node``, its index)."""

    node: int


Event = Union[EventKey, GradKey]
"""Any event a step can wait for: a module call's, or a gradient's."""


class GradProgram(NamedTuple):
    """The program of what runs when the gradient hook of node ``node`` fires."""

    node: int


class LoopPart(NamedTuple):
    """The program of the later iterations of the loop over calls at step ``step``."""

    step: int


class EndProgram(NamedTuple):
    """The program of a `Cache` node ``node`` (and of what is computed from it):
    it waits for the end of the run, so it must not hold its invoke's program up."""

    node: int


ProgramKey = Union[int, None, GradProgram, LoopPart, EndProgram]
"""Which program a step belongs to: an invoke's (``None``: outside invokes),
a gradient hook's (`GradProgram`), a loop over calls' later iterations
(`LoopPart`, made at run time) or a cache's (`EndProgram`)."""


END_PATH = "<end>"
"""The pseudo-module whose one "call" is the traced method returning: its
``post`` event (`END_KEY`) carries the method's return value (``tracer.result``)
and is when a `Cache` is complete. No hook is installed for it: the run feeds
it after the method returns. Paths starting with ``<`` are never module paths."""

END_KEY: EventKey = (END_PATH, "post", 0)
"""The event of the traced method's return (see `END_PATH`)."""

OPERATION_MARK = "<source>"
"""What joins a module path and the name of an operation inside its forward
in an *operation site* (``envoy.source.<name>``): ``"h.0.attn.<source>.split_0"``.
An operation site is accessed like a module (its ``pre`` event carries its
``(args, kwargs)``, its ``post`` event its value), but its events come from a
torch function mode active while the module's forward runs (operations.py),
not from module hooks. The mark cannot be a torch module name reached by
attribute access, so no real path is ever mistaken for one."""


def operation_site(module: str, name: str) -> str:
    """The site path of operation ``name`` inside module ``module``'s forward."""
    return f"{module}.{OPERATION_MARK}.{name}" if module else f"{OPERATION_MARK}.{name}"


def operation_of(path: str) -> tuple[str, str] | None:
    """``(module path, operation name)`` of an operation site, or ``None`` for a module path."""
    if OPERATION_MARK not in path:
        return None
    module, _, name = path.rpartition(f"{OPERATION_MARK}.")
    return module[:-1] if module else "", name


def is_pseudo(path: str) -> bool:
    """Whether ``path`` names no module hook: the end of the run or an operation site."""
    return path[:1] == "<" or OPERATION_MARK in path


def is_module_event(key: Event) -> bool:
    """Whether ``key`` is a module call's event (not a gradient's)."""
    return not isinstance(key, GradKey)


def in_scope(path: str, scope: tuple[str, ...]) -> bool:
    """Whether module ``path`` is one of the ``scope`` modules or below one
    (an operation site is below its module; the end of the run is in no scope)."""
    if path[:1] == "<" and path == END_PATH:
        return False
    return any(not prefix or path == prefix or path.startswith(prefix + ".") for prefix in scope)


def site_of(kind: AccessKind) -> Site:
    """The hook that carries a module value: inputs before the call, output after."""
    return "post" if kind == "output" else "pre"
