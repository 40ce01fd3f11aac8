"""Wrapping a module's forward for one run: skips and operations inside it.

Two things a torch hook cannot do need the module's ``forward`` itself:
not running it (``envoy.skip(value)``, a `Skip` node) and watching the
operations it performs (``envoy.source``, operations.py). For the modules a
plan names (`Plan.skipped`, `Plan.operation_sites`), a run sets an
*instance* attribute ``forward`` that wraps whatever ``module.forward`` was
(accelerate's own wrapper included) and removes it in a ``finally``: the
class, its code and every other module are untouched, nothing outlives the
run, and a call from another thread runs the original forward untouched.

The wrapper runs after the module's pre-hooks (torch calls ``forward``
between them and the forward hooks), so a skip value computed from the
call's own ``.input`` is ready when it is needed, and the forward hooks
(``.output`` reads) see the skip value as the output.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

from .events import operation_of
from .hooks import submodule
from .operations import World, watching_operations

if TYPE_CHECKING:
    from .steps import Plan

Wrapped = list[tuple[torch.nn.Module, bool, Any]]
"""The forwards a run wrapped: ``(module, had an instance forward, that forward)``
each, recorded *before* the wrapper is set, so that an interrupt at any point
leaves nothing behind once `unwrap_forwards` has run."""


def forward_paths(plan: Plan) -> tuple[tuple[str, frozenset[str]], ...]:
    """The modules whose forward a run wraps, each with the operation names
    inside it the run watches (empty: only skipped)."""
    watched: dict[str, set[str]] = {}
    for path in plan.skipped:
        found = operation_of(path)
        if found is None:
            watched.setdefault(path, set())
        else:
            watched.setdefault(found[0], set()).add(found[1])
    for site, _ in plan.operation_sites:
        found = operation_of(site)
        assert found is not None
        watched.setdefault(found[0], set()).add(found[1])
    return tuple((path, frozenset(names)) for path, names in sorted(watched.items()))


def wrap_forwards(root: torch.nn.Module, plan: Plan, world: World, wrapped: Wrapped) -> None:
    """Wrap the forwards `forward_paths` names (recorded in ``wrapped``, the
    caller's list, for `unwrap_forwards`). On any failure here, those
    wrapped so far are restored first."""
    try:
        for path, names in forward_paths(plan):
            module = submodule(root, path)
            had = "forward" in module.__dict__
            wrapped.append((module, had, module.__dict__.get("forward")))
            module.forward = _wrapper(module, module.forward, path, names, world)
    except BaseException:
        unwrap_forwards(wrapped)
        raise


def unwrap_forwards(wrapped: Wrapped) -> None:
    """Restore every forward `wrap_forwards` wrapped, last first (each at most
    once: a no-op when done already)."""
    while wrapped:
        module, had, previous = wrapped[-1]
        if had:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)
        wrapped.pop()


def _wrapper(
    module: torch.nn.Module, original: Callable[..., Any], path: str, names: frozenset[str], world: World
) -> Callable[..., Any]:
    """The forward of ``path`` for this run: skipped when a `Skip` says so,
    watched (operations ``names``) when the plan reads operations in it."""
    thread = world.thread
    skippable = path in world.plan.skipped

    def run(*args: Any, **kwargs: Any) -> Any:
        if names:
            with watching_operations(path, module, names, world):
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != thread:
            return original(*args, **kwargs)  # another thread's call of the same model
        skips = world.take_skip(path) if skippable else None
        if skips is None:
            return run(*args, **kwargs)
        return world.skipped_value(path, skips, lambda: run(*args, **kwargs))

    forward.__wrapped__ = original  # type: ignore[attr-defined]  # (for inspect and debuggers)
    return forward
