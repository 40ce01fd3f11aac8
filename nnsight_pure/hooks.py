"""Installing torch module hooks: the only place that touches hook APIs.

Hooks go only on the modules a plan names and are prepended, so they see the
module's own value before any hook of the user's. Each handle's removal is
pushed on the caller's `ExitStack`, so closing the stack removes them all
whatever happened. The user's own hooks are never touched.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
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
    stack: ExitStack,
) -> None:
    """Hook every ``(path, site)`` of ``root``; closing ``stack`` removes them."""
    modules = [(root.get_submodule(path), path, site) for path, site in sites]
    with _REGISTRY_LOCK:
        for module, path, site in modules:
            if site == "pre":
                handle = module.register_forward_pre_hook(
                    _pre_hook(path, on_event), with_kwargs=True, prepend=True
                )
            else:
                handle = module.register_forward_hook(_post_hook(path, on_event), prepend=True)
            stack.callback(_remover(handle))


def _remover(handle: RemovableHandle) -> Callable[[], None]:
    def remove() -> None:
        with _REGISTRY_LOCK:
            handle.remove()

    return remove
