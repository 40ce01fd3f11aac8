"""Listing the operations of a module's forward (``print(envoy.source)``), on fake tensors.

The names of ``envoy.source`` exist only while the forward runs, so a
listing runs it: the model's method once on fake copies of some inputs and
of the module tree (scan.py's `new_mode`, `fake_copy`, `scan`: no real
compute, the user's model and hooks untouched), with the module's forward
(on the fake copy only) under the recording flavour of the operation mode
(operations.py). Each call of the module gives one list of operations, in
order: a name, the function, the forward's calling line.

Listings are kept in `caches.LISTINGS`, keyed by the model (its identity
and class), the module's path, the method and the inputs' shapes, dtypes
and other values: a listing does not change unless the code or the
input shapes do.
"""

from __future__ import annotations

import difflib
import linecache
import os
import weakref
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch
import torch.utils._pytree as pytree

from .caches import LISTINGS
from .events import operation_site
from .operations import Seen, watching_operations
from .scan import fake_copy, new_mode, scan


@attrs.frozen
class Listing:
    """The operations of each call of one module's forward (a listing)."""

    module: str  # the module's path as the user writes it (``model.transformer.h[0].attn``)
    calls: tuple[tuple[Seen, ...], ...]

    def names(self) -> frozenset[str]:
        """Every operation name of any call."""
        return frozenset(seen.name for call in self.calls for seen in call)

    def close(self, name: str) -> list[str]:
        """The names nearest to ``name`` (for a misspelled one)."""
        first = [seen.name for seen in self.calls[0]] if self.calls else []
        others = sorted(self.names() - set(first))
        return difflib.get_close_matches(name, first + others, n=5, cutoff=0.5)

    def __str__(self) -> str:
        if not self.calls:
            return f"{self.module}.source: the model never called {self.module} with these inputs"
        first = self.calls[0]
        width = max((len(seen.name) for seen in first), default=0)
        fwidth = max((len(seen.function) for seen in first), default=0)
        lines = [f"{self.module}.source: {len(first)} operations (first call of {len(self.calls)})"]
        for seen in first:
            where = seen.where
            if where is None:
                place, code = "<unknown>", ""
            else:
                place = f"{os.path.basename(where.filename)}:{where.lineno}"
                code = linecache.getline(where.filename, where.lineno).strip()
            lines.append(f"  {seen.name:<{width}}  {seen.function:<{fwidth}}  {place}  {code}".rstrip())
        later = sorted(self.names() - {seen.name for seen in first})
        if later:
            lines.append(f"  (later calls only: {', '.join(later)})")
        return "\n".join(lines)

    __repr__ = __str__


def _signature(value: Any) -> Any:
    """What of an input a listing depends on: tensors by shape, dtype and
    device, other leaves by their repr (short, hashable)."""
    def leaf(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return ("tensor", tuple(item.shape), str(item.dtype), str(item.device))
        text = repr(item)
        return text if len(text) < 200 else (type(item).__qualname__, id(item))

    leaves, spec = pytree.tree_flatten(value)
    return (str(spec), tuple(leaf(item) for item in leaves))


def _structure(module: torch.nn.Module) -> tuple[Any, ...]:
    """A cheap fingerprint of a module tree (its classes and parameter shapes)."""
    return tuple(
        (name, type(sub).__qualname__, tuple(tuple(p.shape) for p in sub._parameters.values() if p is not None))
        for name, sub in module.named_modules()
    )


def discover(
    root: torch.nn.Module,
    method_of: Callable[[torch.nn.Module], Callable[..., Any]],
    path: str,
    shown: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    method_name: str | None = None,
) -> Listing:
    """The listing of module ``path``'s forward when ``method_of(fake root)``
    runs on ``args``/``kwargs`` (``shown``: the module as the user writes it).
    Cached (see the module docstring)."""
    key = (id(root), type(root).__qualname__, path, method_name, _signature((tuple(args), dict(kwargs))))
    found = LISTINGS.get(key)
    # (the model itself, not only its id: a freed model's id may be reused by another)
    if found is not None and found[2]() is root and found[0] == _structure(root):
        listed: Listing = found[1]
        return listed
    mode = new_mode()
    fake_root = fake_copy(root, mode)
    module = fake_root.get_submodule(path)
    calls: list[tuple[Seen, ...]] = []
    original = module.forward

    def forward(*a: Any, **k: Any) -> Any:
        record: list[Seen] = []
        try:
            with watching_operations(path, module, frozenset(), None, record):
                return original(*a, **k)
        finally:
            calls.append(tuple(record))

    module.forward = forward  # (the fake copy's, thrown away after)
    scan(fake_root, method_of(fake_root), args, kwargs, mode)
    listing = Listing(shown, tuple(calls))
    LISTINGS.put(key, (_structure(root), listing, weakref.ref(root)))
    return listing


def unknown_operation(listing: Listing, path: str, name: str) -> AttributeError:
    """The error for ``envoy.source.<name>`` that the forward never performs."""
    near = listing.close(name)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    site = operation_site(path, name)
    return AttributeError(
        f"{listing.module}.source has no operation {name!r} ({site}){hint} "
        f"(print({listing.module}.source) lists them)"
    )

