"""Installing torch module hooks: the only place that touches hook APIs.

Hooks go only on the modules a plan names and are prepended, so they see the
module's own value before any hook of the user's. The caller removes them
with `remove_hooks` in a ``finally``, whatever happened. The user's own
hooks are never touched.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from .plan import Site

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


def install_hooks(
    root: torch.nn.Module,
    sites: Sequence[tuple[str, Site]],
    on_event: OnEvent,
) -> list[RemovableHandle]:
    """Hook every ``(path, site)`` of ``root``; returns the handles, for
    `remove_hooks`. If any registration fails, those made are removed first."""
    modules = [(submodule(root, path), path, site) for path, site in sites]
    handles: list[RemovableHandle] = []
    with _REGISTRY_LOCK:
        try:
            for module, path, site in modules:
                if site == "pre":
                    handles.append(module.register_forward_pre_hook(
                        _pre_hook(path, on_event), with_kwargs=True, prepend=True
                    ))
                else:
                    handles.append(module.register_forward_hook(_post_hook(path, on_event), prepend=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
    return handles


def remove_hooks(handles: list[RemovableHandle]) -> None:
    """Remove hooks made by `install_hooks` (each at most once)."""
    with _REGISTRY_LOCK:
        for handle in handles:
            handle.remove()
        handles.clear()


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
