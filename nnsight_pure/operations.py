"""Operations inside a module's forward (``envoy.source``), seen without touching its code.

While a watched module's forward runs (forwards.py wraps it for the run),
a `torch.overrides.TorchFunctionMode` sees every torch function and tensor
method its code calls, and each *direct child* module it calls. Each gets a
stable name, the function's (or the child's attribute) name and its
occurrence in this call of the forward (``split_0``, ``view_2``,
``c_attn_0``), and, when the plan reads or writes it, it becomes an
*operation site* (`events.operation_site`) with the events of a module
call: ``pre`` with ``(args, kwargs)`` (replaceable), ``post`` with its
value (replaceable), and a `Skip` taken at ``pre`` (the function, or the
child's forward, is then not called).

A child's call is one operation: the torch calls made inside the child's
forward belong to the child, not to this module, so they are not counted
(a depth counter, raised while a child runs). The children are seen by
setting an instance ``forward`` on each direct child for the duration of
one call of the parent's forward (removed in a ``finally``; a call from
another thread runs the child's own forward untouched).

What the mode cannot see: work done inside C++ kernels or fused paths
(one ``scaled_dot_product_attention`` is one operation), attribute reads
such as ``x.shape`` (left out by design), plain Python arithmetic on
non-tensors, and modules that are not direct children (a grandchild called
directly counts its torch calls as the parent's). The programs' own torch
calls, made while an event is fed, are not the forward's and are not
counted.

The same naming, with a ``record`` list instead of a run, lists a
forward's operations on fake tensors (operation_listing.py).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Protocol

import torch
from torch.overrides import TorchFunctionMode

from .events import Site, operation_site
from .source import SourceLoc

if TYPE_CHECKING:
    from .steps import Plan


class World(Protocol):
    """What the forwards and operations of a run need of its hook-event state
    (interpreter/world.py's `World`, seen through this Protocol: the
    interpreter imports these modules, not the other way round)."""

    thread: int
    feeding: int

    @property
    def plan(self) -> Plan: ...

    def on_event(self, path: str, site: Site, value: Any) -> Any: ...

    def take_skip(self, path: str) -> list[tuple[int | None, Any]] | None: ...

    def skipped_value(self, path: str, skips: list[tuple[int | None, Any]], run: Callable[[], Any]) -> Any: ...


def operation_name(func: Callable[..., Any]) -> str | None:
    """The base name of a torch function or method (``"split"``, ``"matmul"``
    for ``__matmul__``), or ``None`` for what is not an operation (an
    attribute read such as ``Tensor.shape``)."""
    name = getattr(func, "__name__", None)
    if not isinstance(name, str) or name == "__get__":
        return None
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        return name[2:-2]
    return name


def function_label(func: Any) -> str:
    """How a listing names the function of an operation: ``torch.split``,
    ``Tensor.view``, ``torch.nn.functional.softmax``, or a child module's class."""
    if isinstance(func, torch.nn.Module):
        return type(func).__name__
    name = getattr(func, "__name__", repr(func))
    qualname = getattr(func, "__qualname__", name)
    if qualname.startswith(("TensorBase.", "Tensor.", "_TensorBase.")) or getattr(torch.Tensor, name, None) is func:
        return f"Tensor.{name}"
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    if getattr(torch.nn.functional, name, None) is func:
        return f"torch.nn.functional.{name}"
    module = getattr(func, "__module__", None) or "torch"
    return f"{module}.{qualname}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_TORCH_MODULES = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_TORCH_MODULE_CALL = os.path.join(_TORCH_MODULES, "module.py")


def _is_plumbing(filename: str) -> bool:
    """Frames a calling line is not in: this library's, and torch's own except
    the forwards of torch's modules (``nn/modules/linear.py`` is a forward's code)."""
    if filename.startswith(_PACKAGE_DIR) or filename.startswith("<frozen "):
        return True
    if filename.startswith(_TORCH_DIR):
        return not filename.startswith(_TORCH_MODULES) or filename == _TORCH_MODULE_CALL
    return False


def calling_line() -> SourceLoc | None:
    """The line of the forward's code that made the current operation (only
    listings ask: a stack walk per operation)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _is_plumbing(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    return SourceLoc(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


class Seen(NamedTuple):
    """One operation seen by a recording mode: its name, its function, the calling line."""

    name: str
    function: str
    where: SourceLoc | None


class OperationMode(TorchFunctionMode):
    """The mode of one call of a watched forward: names each operation, and
    feeds the ``watched`` ones to the run (``world``) as events; with
    ``record``, appends every operation it sees there instead (a listing)."""

    def __init__(
        self, module: str, watched: frozenset[str], world: World | None, record: list[Seen] | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.watched = watched
        self.world = world
        self.record = record
        self.counts: dict[str, int] = {}
        self.depth = 0  # > 0 while a direct child's forward runs: its torch calls are not ours

    def name_of(self, base: str, func: Any) -> str:
        """The next name for an operation of ``base`` (``split_0``, ``split_1``, ...)."""
        occurrence = self.counts.get(base, 0)
        self.counts[base] = occurrence + 1
        name = f"{base}_{occurrence}"
        if self.record is not None:
            self.record.append(Seen(name, function_label(func), calling_line()))
        return name

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        world = self.world
        if self.depth or (world is not None and world.feeding):
            return func(*args, **kwargs)  # a child's or a program's own operation, not the forward's
        base = operation_name(func)
        if base is None:
            return func(*args, **kwargs)
        name = self.name_of(base, func)
        if world is None or name not in self.watched:
            return func(*args, **kwargs)
        return self.watch(world, name, func, args, kwargs)

    def watch(self, world: World, name: str, func: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        """Call ``func`` as operation site ``name``: its pre and post events, its skip."""
        site = operation_site(self.module, name)
        replaced = world.on_event(site, "pre", (args, kwargs))
        if replaced is not None:
            args, kwargs = replaced
        skips = world.take_skip(site) if site in world.plan.skipped else None
        if skips is None:
            value = func(*args, **kwargs)
        else:
            value = world.skipped_value(site, skips, lambda: func(*args, **kwargs))
        replaced = world.on_event(site, "post", value)
        return value if replaced is None else replaced

    def child_forward(self, name: str, child: torch.nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        """The forward of direct child ``name`` while this mode watches its parent:
        one operation named after the child; the torch calls inside are the child's."""
        thread = threading.get_ident()

        def forward(*args: Any, **kwargs: Any) -> Any:
            world = self.world
            if self.depth or threading.get_ident() != thread or (world is not None and world.feeding):
                return original(*args, **kwargs)

            def call(*args: Any, **kwargs: Any) -> Any:
                self.depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.depth -= 1

            op = self.name_of(name, child)
            if world is None or op not in self.watched:
                return call(*args, **kwargs)
            return self.watch(world, op, call, args, kwargs)

        forward.__wrapped__ = original  # type: ignore[attr-defined]  # (for inspect and debuggers)
        return forward


@contextmanager
def _children_seen(module: torch.nn.Module, mode: OperationMode) -> Iterator[None]:
    """Give each direct child of ``module`` the mode's child forward for the
    block; restore every one in a ``finally`` (last first)."""
    saved: list[tuple[torch.nn.Module, bool, Any]] = []
    try:
        for name, child in module._modules.items():
            if child is None or isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                continue
            had = "forward" in child.__dict__
            saved.append((child, had, child.__dict__.get("forward")))
            child.forward = mode.child_forward(name, child, child.forward)
        yield
    finally:
        while saved:
            child, had, previous = saved.pop()
            if had:
                child.__dict__["forward"] = previous
            else:
                child.__dict__.pop("forward", None)


@contextmanager
def watching_operations(
    path: str, module: torch.nn.Module, watched: frozenset[str], world: World | None,
    record: list[Seen] | None = None,
) -> Iterator[None]:
    """Watch (or, with ``record``, list) the operations of one call of the
    forward of ``module`` (at ``path``) for the block."""
    mode = OperationMode(path, watched, world, record)
    with _children_seen(module, mode), mode:
        yield
