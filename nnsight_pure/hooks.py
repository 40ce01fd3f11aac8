"""Installing torch module hooks: the only place that touches hook APIs.

Hooks go only on the modules a plan names and are prepended, so they see the
module's own value before any hook of the user's. Each handle's removal is
pushed on the caller's `ExitStack`, so closing the stack removes them all
whatever happened. The user's own hooks are never touched.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch

from .plan import Site

OnEvent = Callable[[str, Site, Any], Any]
"""Called as ``on_event(path, site, value)``; returns a replacement or ``None``."""


def _pre_hook(path: str, on_event: OnEvent) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
    for path, site in sites:
        module = root.get_submodule(path)
        if site == "pre":
            handle = module.register_forward_pre_hook(
                _pre_hook(path, on_event), with_kwargs=True, prepend=True
            )
        else:
            handle = module.register_forward_hook(_post_hook(path, on_event), prepend=True)
        stack.callback(handle.remove)
