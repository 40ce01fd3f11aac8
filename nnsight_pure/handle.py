"""ModelHandle: what envoys and contexts share about one wrapped model.

Envoys point at the handle rather than at the `NNsight` wrapper, so the
wrapper, its envoys and its traces form no reference cycle that would keep a
model's weights alive until the garbage collector runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


class ModelHandle:
    """The torch module a wrapper traces, and its envoy-level aliases.

    The module can be replaced (a language model's real weights replacing its
    meta-device skeleton); ``generation`` counts replacements, so envoys know
    to look their module up again.
    """

    def __init__(self, module: torch.nn.Module, rename: Mapping[str, str] | None = None) -> None:
        self.module = module
        self.generation = 0
        self.owner: Callable[[], Any] | None = None  # a weak reference to the wrapper (envoy.source's listing)
        rename = dict(rename or {})
        for real, alias in rename.items():
            if not alias.isidentifier():
                raise ValueError(f"rename maps module names to identifiers; got {real!r}: {alias!r}")
        self._by_name = {real.strip("."): alias for real, alias in rename.items()}

    def replace(self, module: torch.nn.Module) -> None:
        """Trace ``module`` from now on (same structure, say with real weights)."""
        self.module = module
        self.generation += 1

    def with_module(self, module: torch.nn.Module) -> ModelHandle:
        """A new handle for another module, with the same aliases."""
        copy = ModelHandle(module)
        copy._by_name = dict(self._by_name)
        return copy

    @property
    def renames(self) -> bool:
        """True when some module is shown under an alias."""
        return bool(self._by_name)

    def alias(self, parent_path: str, name: str) -> str:
        """The attribute name under which child ``name`` of ``parent_path`` appears.

        A rename key matches a child's own name at any depth, or its full path.
        """
        path = f"{parent_path}.{name}" if parent_path else name
        return self._by_name.get(path, self._by_name.get(name, name))

    def real_name(self, parent: torch.nn.Module, parent_path: str, attribute: str) -> str | None:
        """The child module name that ``attribute`` refers to on ``parent``, if any."""
        children = parent._modules
        if self._by_name:
            for name in children:
                if self.alias(parent_path, name) == attribute:
                    return name
        return attribute if attribute in children else None
