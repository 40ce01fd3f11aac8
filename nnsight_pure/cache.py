"""``tracer.cache(...)``: every call's values of many modules, as one value.

A `Cache` node names the modules; a run that holds one puts a light hook
of its own on each of them, *after* the run's intervention hooks (so it
stores what the model goes on with: values after every write), and when
the traced method returns the node's value is an `ActivationCache` of its
invoke's rows. The hooks store into the run's `World` (``world.stored``,
per node), detach and move values as they come (so a cache of a long
generation holds no autograd graph and, with ``device="cpu"``, no GPU
memory), and are removed with the run's other hooks.

An `ActivationCache` is read by the names users write
(``cache["model.transformer.h.0"].output``) or by attribute, as the model
reads (``cache.model.transformer.h[0].output``). A module called once has
one `CacheEntry`; one called several times (generation steps, a module in a
loop) has a list of them, one per call, in call order.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

import attrs
import torch
from torch.utils import _pytree as pytree

from .batching import narrow_rows
from .hooks import Installed, remove_hooks, submodule
from .ops import Cache

if TYPE_CHECKING:
    from .interpreter.world import World
    from .steps import CacheStep


@attrs.frozen
class CacheEntry:
    """One call of a cached module: its ``output`` and, when the cache
    included inputs, its ``inputs`` (``(args, kwargs)``)."""

    output: Any = None
    inputs: Any = None

    @property
    def input(self) -> Any:
        """The first positional argument of the call (or the first keyword one)."""
        if self.inputs is None:
            raise AttributeError("this cache holds no inputs: make it with tracer.cache(include_inputs=True)")
        args, kwargs = self.inputs
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        raise AttributeError("the module was called without arguments")


Entry = Union[CacheEntry, list[CacheEntry]]


@attrs.frozen
class ActivationCache(Mapping[str, Entry]):
    """What `tracer.cache` gives: module name → its `CacheEntry` (a list of
    them for a module called more than once). Names are as users write
    them, ``"model.transformer.h.0"``; ``"transformer.h.0"`` finds the
    same entry. Attribute access walks the model's names:
    ``cache.model.transformer.h[0].output``."""

    entries: Mapping[str, Entry]

    def __getitem__(self, name: str) -> Entry:
        entries = self.entries
        if name in entries:
            return entries[name]
        prefixed = f"model.{name}" if name else "model"
        if prefixed in entries:
            return entries[prefixed]
        raise KeyError(f"{name!r} is not in this cache; it holds: {', '.join(entries) or 'nothing'}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "entries":
            raise AttributeError(name)
        return CachePath(self, "model" if name == "model" else f"model.{name}")

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.entries)} modules: {', '.join(list(self.entries)[:6])}" + (
            ", ...)" if len(self.entries) > 6 else ")"
        )


class CachePath:
    """A module name being spelled out by attribute (``cache.model.transformer.h[0]``)."""

    def __init__(self, cache: ActivationCache, name: str) -> None:
        self._cache = cache
        self._name = name

    def _entry(self) -> Entry:
        return self._cache[self._name]

    @property
    def output(self) -> Any:
        return _one(self._entry(), self._name).output

    @property
    def inputs(self) -> Any:
        return _one(self._entry(), self._name).inputs

    @property
    def input(self) -> Any:
        return _one(self._entry(), self._name).input

    def __getattr__(self, name: str) -> CachePath:
        if name.startswith("__"):
            raise AttributeError(name)
        return CachePath(self._cache, f"{self._name}.{name}")

    def __getitem__(self, index: int | str) -> Any:
        name = f"{self._name}.{index}"
        if any(key == name or key.startswith(name + ".") for key in self._cache.entries):
            return CachePath(self._cache, name)
        entry = self._entry()
        if isinstance(entry, list) and isinstance(index, int):
            return entry[index]  # one call of a module called several times
        raise KeyError(f"{name!r} is not in this cache")

    def __repr__(self) -> str:
        return f"<cache path {self._name}>"


def _one(entry: Entry, name: str) -> CacheEntry:
    if isinstance(entry, list):
        raise TypeError(
            f"{name} was called {len(entry)} times in the run, so its cache entry is a list: "
            f"pick a call first (cache[{name!r}][0].output)"
        )
    return entry


# --- storing, at run time --------------------------------------------------------------------


class _Store:
    """What one `Cache` node's hooks stored in one run: per module, the
    inputs and outputs of each call (whole batch), as they came."""

    def __init__(self, op: Cache) -> None:
        self.inputs: dict[str, list[Any]] = {path: [] for path in op.modules}
        self.outputs: dict[str, list[Any]] = {path: [] for path in op.modules}


def _storer(op: Cache) -> Callable[[Any], Any]:
    """How one value is kept: detached and moved as the op says."""
    device = None if op.device is None else torch.device(op.device)
    dtype = None if op.dtype is None else getattr(torch, op.dtype)

    def keep_tensor(value: torch.Tensor) -> torch.Tensor:
        if op.detach:
            value = value.detach()
        if device is not None or dtype is not None:
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return value

    def keep(value: Any) -> Any:
        if type(value) is torch.Tensor:
            return keep_tensor(value)
        return pytree.tree_map(lambda leaf: keep_tensor(leaf) if isinstance(leaf, torch.Tensor) else leaf, value)

    return keep


def install_cache_hooks(root: torch.nn.Module, caches: Sequence[tuple[int, Cache]], world: World,
                        installed: Installed) -> None:
    """Put each cache's hooks on its modules, after every other hook (recorded
    in ``installed`` for `hooks.remove_hooks`)."""
    thread = world.thread
    try:
        for index, op in caches:
            store = world.stored[index] = _Store(op)
            keep = _storer(op)
            for path in op.modules:
                module = submodule(root, path)
                if op.include_inputs:
                    pre = _pre(store.inputs[path], keep, thread)
                    installed.append((module, pre))
                    module.register_forward_pre_hook(pre, with_kwargs=True)
                if op.include_output:
                    post = _post(store.outputs[path], keep, thread)
                    installed.append((module, post))
                    module.register_forward_hook(post)
    except BaseException:
        remove_hooks(installed)
        raise


def _pre(into: list[Any], keep: Callable[[Any], Any], thread: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        if kwargs is not None and threading.get_ident() == thread:
            into.append(keep((args, kwargs)))

    return hook


def _post(into: list[Any], keep: Callable[[Any], Any], thread: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if threading.get_ident() == thread:
            into.append(keep(output))

    return hook


def cache_value(world: World, step: CacheStep) -> ActivationCache:
    """The value of a `Cache` node once the run has ended: its invoke's rows."""
    op = step.op
    store = world.stored.get(step.index)
    entries: dict[str, Entry] = {}
    if store is None:
        return ActivationCache(entries)
    groups, invoke = world.groups, step.invoke
    for path, name in zip(op.modules, op.names):
        outputs = [narrow_rows(value, groups, invoke) for value in store.outputs[path]]
        inputs = [narrow_rows(value, groups, invoke) for value in store.inputs[path]]
        count = max(len(outputs), len(inputs))
        if not count:
            continue
        calls = [
            CacheEntry(outputs[i] if i < len(outputs) else None, inputs[i] if i < len(inputs) else None)
            for i in range(count)
        ]
        entries[name] = calls[0] if count == 1 else calls
    return ActivationCache(entries)
