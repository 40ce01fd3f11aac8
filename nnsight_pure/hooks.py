"""Installing and removing a run's torch module hooks, safely under interrupts.

This is where a trace's forward hooks go on and come off. (Two other places
register hooks, each for its own job: the interpreter puts one-shot tensor
hooks on values for `.grad` (interpreter/world.py), and scan.py hooks the
fake copy of a model to record its calls.)

Hooks go only on the modules a plan names and are prepended, so they see the
module's own value before any hook of the user's. The caller removes them
with `remove_hooks` in a ``finally``, whatever happened, an interrupt
included (each hook is recorded before it is registered, and removed by
its id, or, for hooks registered through torch's API, by identity). The
user's own hooks are never touched.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from .events import Site

OnEvent = Callable[[str, Site, Any], Any]
"""Called as ``on_event(path, site, value)``; returns a replacement or ``None``."""

# torch hands out hook ids from a class-level counter without a lock, so two
# threads registering at once can get the same id; ours register one at a time.
_REGISTRY_LOCK = threading.Lock()


def _pre_hook(path: str, on_event: OnEvent) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        if kwargs is None:
            # torch inserts a pre-hook before flagging it ``with_kwargs``; a
            # forward running in another thread in that instant calls it
            # without kwargs. Such a call is never this run's: ignore it.
            return None
        return on_event(path, "pre", (args, kwargs))

    return hook


def _post_hook(path: str, on_event: OnEvent) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return on_event(path, "post", output)

    return hook


Installed = list[tuple[torch.nn.Module, "Callable[..., Any] | int"]]
"""The hooks put on modules for a run, each recorded *before* it is
registered, so that it is removable whatever moment an interrupt (Ctrl-C)
lands at: ``(module, hook id)`` for `install_hooks`' own (put straight into
the module's hook tables under an id of torch's counter), ``(module, hook
function)`` for hooks registered through torch's API (activation_cache.py),
found by identity."""


def install_hooks(
    root: torch.nn.Module,
    sites: Sequence[tuple[str, Site]],
    on_event: OnEvent,
    installed: Installed,
) -> None:
    """Hook every ``(path, site)`` of ``root``, prepended, recording each in
    ``installed`` (the caller's list, for `remove_hooks`). If anything fails
    or is interrupted here, the hooks made so far are removed first.

    What ``register_forward_hook(..., prepend=True)`` does, without the
    `RemovableHandle` (two weak references per hook, on every run): the hook
    takes the next id of torch's own counter (no clash with the user's
    hooks) and is removed by that id. A pre-hook is flagged ``with_kwargs``
    before it goes in, so no forward in another thread sees it unflagged."""
    modules = [(submodule(root, path), path, site) for path, site in sites]
    try:
        with _REGISTRY_LOCK:
            for module, path, site in modules:
                hook_id = RemovableHandle.next_id
                RemovableHandle.next_id = hook_id + 1
                installed.append((module, hook_id))
                if site == "pre":
                    module._forward_pre_hooks_with_kwargs[hook_id] = True
                    table = module._forward_pre_hooks
                    table[hook_id] = _pre_hook(path, on_event)
                else:
                    table = module._forward_hooks
                    table[hook_id] = _post_hook(path, on_event)
                table.move_to_end(hook_id, last=False)  # type: ignore[attr-defined]  # an OrderedDict
    except BaseException:
        remove_hooks(installed)
        raise


_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
)


def _remove_one(module: torch.nn.Module, hook: Callable[..., Any] | int) -> None:
    """Take ``hook`` (an id, or a function found by identity) off ``module``;
    a no-op when it is not there, so that it can be done again after an interrupt."""
    if type(hook) is int:
        for table in _HOOK_TABLES:
            getattr(module, table, {}).pop(hook, None)
        return
    for table in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, table)
        for hook_id, found in list(hooks.items()):
            if found is hook:
                for extra in _HOOK_TABLES:
                    getattr(module, extra, {}).pop(hook_id, None)


def remove_hooks(installed: Installed) -> None:
    """Remove the hooks `install_hooks` recorded (each at most once), last
    first. An interrupt while removing does not stop the removal: it is
    raised once every hook is gone."""
    interrupted: KeyboardInterrupt | None = None
    attempts = 3  # (a counter, not range(): no call before the ``try`` for an interrupt to land at)
    while attempts:
        attempts -= 1
        try:
            while installed:
                module, hook = installed[-1]
                _remove_one(module, hook)
                installed.pop()
            break
        except KeyboardInterrupt as error:  # finish first
            interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.get_submodule(path)``, by the child dictionaries (it is on every
    run's path); torch's own lookup gives the error for a missing module."""
    module = root
    if path:
        for name in path.split("."):
            child = module._modules.get(name)
            if child is None:
                return root.get_submodule(path)  # raises AttributeError naming the module
            module = child
    return module
