"""``tracer.cache(...)``: every call's values of many modules, as one value.

A `Cache` node names the modules; a run that holds one puts a light hook
of its own on each of them, *after* the run's intervention hooks (so it
stores what the model goes on with: values after every write), and when
the traced method returns the node's value is an `ActivationCache` of its
invoke's rows. The hooks store into the run's `World` (``world.stored``,
per node), detach and move values as they come (so a cache of a long
generation holds no autograd graph and, with ``device="cpu"``, no GPU
memory), and are removed with the run's other hooks. A run stopped early
(``.stop()``) still gives the cache of the calls made before the stop.

An `ActivationCache` is read by the names users write
(``cache["model.transformer.h.0"]``, with or without ``model.``, by alias
or by real name) or by attribute, as the model reads
(``cache.model.transformer.h[0].output``). A module called once has one
`CacheEntry`; one called several times (generation steps, a module in a
loop) has a list of them, one per call, in call order; a module that was
asked for but never called has no entry.

The hooks are on every forward of every cached module, so they are kept
small: one closure per module and hook kind, the thread test and a list
append, and a tensor output stored without walking a pytree.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence, Union

import attrs
import torch

from .batching import narrow_rows
from .hooks import _REGISTRY_LOCK, Installed, remove_hooks, submodule
from .ops import Cache
from .trees import map_leaves

if TYPE_CHECKING:
    from .batching import BatchGroups
    from .steps import CacheStep


class World(Protocol):
    """What the cache needs of a run's hook-event state (interpreter/world.py's
    `World`, through this Protocol: the interpreter imports this module)."""

    thread: int
    stored: dict[int, Any]
    groups: BatchGroups


def _describe(value: Any) -> str:
    """A short text of a stored value (a repr that prints no tensor data)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(item) for item in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_describe(item)}" for key, item in list(value.items())[:4]) + "}"
    return type(value).__name__


@attrs.frozen(eq=False)
class CacheEntry:
    """One call of a cached module: its ``output`` and, when the cache
    included inputs, its ``inputs`` (``(args, kwargs)``); ``None`` for what
    the cache did not include."""

    output: Any = None
    inputs: Any = None

    @property
    def input(self) -> Any:
        """The first positional argument of the call (or, with none, the first keyword one)."""
        if self.inputs is None:
            raise AttributeError("this cache holds no inputs: make it with tracer.cache(include_inputs=True)")
        args, kwargs = self.inputs
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        raise AttributeError("the module was called without arguments")

    def __repr__(self) -> str:
        parts = [] if self.output is None else [f"output={_describe(self.output)}"]
        if self.inputs is not None:
            parts.append(f"inputs={_describe(self.inputs)}")
        return f"CacheEntry({', '.join(parts)})"


Entry = Union[CacheEntry, list[CacheEntry]]
"""A module's cache entry: one `CacheEntry`, or a list of them (one per call)."""


@attrs.frozen(eq=False)
class ActivationCache(Mapping[str, Entry]):
    """What `tracer.cache` gives: module name → its `CacheEntry` (a list of
    them for a module called more than once). Names are as users write
    them, ``"model.transformer.h.0"``; ``"transformer.h.0"`` finds the same
    entry, and so does a module's real name when the model renames it.
    Attribute access walks the model's names: ``cache.model.transformer.h[0].output``.

    ``names`` are every module the cache was asked for (a module never
    called has no entry), ``real`` maps the real name of a renamed module
    to its alias name; ``has_inputs`` and ``has_outputs`` say what was included."""

    entries: Mapping[str, Entry]
    names: tuple[str, ...] = ()
    real: Mapping[str, str] = attrs.field(factory=dict)
    has_inputs: bool = False
    has_outputs: bool = True

    def key_of(self, name: str) -> str | None:
        """The key ``name`` reads (``"transformer.h.0"`` → ``"model.transformer.h.0"``), or ``None``."""
        entries = self.entries
        for candidate in (name, _prefixed(name)):
            if candidate in entries:
                return candidate
            alias = self.real.get(candidate)
            if alias is not None and alias in entries:
                return alias
        return None

    def __getitem__(self, name: str) -> Entry:
        if not isinstance(name, str):
            raise TypeError(f"a cache is read by module name, such as 'model.transformer.h.0'; got {name!r}")
        key = self.key_of(name)
        if key is None:
            raise KeyError(self._missing(name))
        return self.entries[key]

    def _missing(self, name: str) -> str:
        wanted = _prefixed(name)
        wanted = self.real.get(wanted, wanted)
        if wanted in self.names:
            return (f"{wanted} was cached but not called in the run (or not before it stopped), "
                    "so it has no entry")
        held = list(self.entries)
        shown = ", ".join(held[:8]) + (f", ... ({len(held)} in all)" if len(held) > 8 else "")
        return f"{name!r} is not in this cache; it holds: {shown or 'nothing'}"

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getattr__(self, name: str) -> CachePath:
        if name.startswith("__") or name in _FIELDS:
            raise AttributeError(name)
        return CachePath(self, _prefixed(name))

    def __repr__(self) -> str:
        names = list(self.entries)
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return f"ActivationCache({len(names)} modules: {shown})"


_FIELDS = frozenset(field.name for field in attrs.fields(ActivationCache))


def _prefixed(name: str) -> str:
    """``name`` as a key: ``"model"``-rooted (``".h.0"`` and ``"h.0"`` → ``"model.h.0"``)."""
    name = name.strip()
    if name == "model" or name.startswith("model."):
        return name
    name = name.lstrip(".")
    return f"model.{name}" if name else "model"


class CachePath:
    """A module name being spelled out by attribute (``cache.model.transformer.h[0]``);
    ``.output``, ``.inputs`` and ``.input`` read its entry when the module was called once."""

    def __init__(self, cache: ActivationCache, name: str) -> None:
        self._cache = cache
        self._name = name

    def _entry(self) -> CacheEntry:
        entry = self._cache[self._name]
        if isinstance(entry, list):
            raise TypeError(
                f"{self._name} was called {len(entry)} times in the run, so its cache entry is a list: "
                f"pick a call first (cache[{self._name!r}][0].output)"
            )
        return entry

    def _absent(self, what: str) -> str | None:
        """Why the cache holds no ``what`` (``"output"``, ``"inputs"``) at all, or ``None``."""
        if what == "output" and not self._cache.has_outputs:
            return "this cache holds no outputs: it was made with include_output=False"
        if what != "output" and not self._cache.has_inputs:
            return "this cache holds no inputs: make it with tracer.cache(include_inputs=True)"
        return None

    @property
    def output(self) -> Any:
        """The call's output."""
        if self._absent("output"):
            raise AttributeError("output")  # (answered by __getattr__, with the reason)
        return self._entry().output

    @property
    def inputs(self) -> Any:
        """The call's ``(args, kwargs)``."""
        if self._absent("inputs"):
            raise AttributeError("inputs")
        return self._entry().inputs

    @property
    def input(self) -> Any:
        """The call's first positional argument (or first keyword one)."""
        if self._absent("input"):
            raise AttributeError("input")
        return self._entry().input

    def __getattr__(self, name: str) -> CachePath:
        if name.startswith("__") or name in ("_cache", "_name"):
            raise AttributeError(name)
        if name in ("output", "inputs", "input"):
            # A property raised AttributeError (Python then asks here): say why.
            raise AttributeError(self._absent(name) or name)
        return CachePath(self._cache, f"{self._name}.{name}")

    def __getitem__(self, index: int | str) -> Any:
        """A child by name or number (``h[0]``); on a module called several
        times with no such child, that call's entry (``lm_head[2]``)."""
        if isinstance(index, int) and index < 0:
            raise KeyError(f"{self._name}[{index}]: a cache path takes the module's own number, not a negative one")
        name = f"{self._name}.{index}"
        cache = self._cache
        key = cache.key_of(name)
        if key is not None or any(each.startswith(name + ".") for each in cache.entries) or name in cache.names:
            return CachePath(cache, name)
        if isinstance(index, int) and cache.key_of(self._name) is not None:
            entry = cache[self._name]
            if isinstance(entry, list):
                return entry[index]  # one call of a module called several times
        raise KeyError(cache._missing(name))

    def __repr__(self) -> str:
        key = self._cache.key_of(self._name)
        if key is None:
            return f"<cache path {self._name}>"
        entry = self._cache.entries[key]
        calls = len(entry) if isinstance(entry, list) else 1
        return f"<cache path {key}: {calls} call{'s' if calls > 1 else ''}>"


# --- storing, at run time --------------------------------------------------------------------


class _Store:
    """What one `Cache` node's hooks stored in one run: per module, the
    inputs and outputs of each call (whole batch), as they came."""

    def __init__(self, op: Cache) -> None:
        self.inputs: dict[str, list[Any]] = {path: [] for path in op.modules} if op.include_inputs else {}
        self.outputs: dict[str, list[Any]] = {path: [] for path in op.modules} if op.include_output else {}


def _storer(op: Cache) -> Callable[[Any], Any] | None:
    """How one value is kept: detached and moved as the op says (``None``:
    kept as it is, with no transform at all)."""
    device = None if op.device is None else torch.device(op.device)
    dtype = None if op.dtype is None else getattr(torch, op.dtype)
    detach = op.detach
    if not detach and device is None and dtype is None:
        return None
    moves = device is not None or dtype is not None

    def keep_tensor(value: torch.Tensor) -> torch.Tensor:
        if detach:
            value = value.detach()
        if moves:
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return value

    def leaf(value: Any) -> Any:
        return keep_tensor(value) if isinstance(value, torch.Tensor) else value

    def keep(value: Any) -> Any:
        if type(value) is torch.Tensor:
            return keep_tensor(value)
        return map_leaves(leaf, value)

    return keep


def named_modules(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module of ``root`` by path, the root as ``""`` (as
    ``root.named_modules()``: a module reached twice is listed once, at its
    first path), by the child dictionaries: a cache of every module walks
    the tree at each trace, and torch's generator is slower."""
    found: dict[str, torch.nn.Module] = {"": root}
    seen = {id(root)}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + name
            found[path] = child
            if child._modules:
                walk(child, path + ".")

    walk(root, "")
    return found


def _modules_at(root: torch.nn.Module, paths: Sequence[str]) -> list[torch.nn.Module]:
    """The modules at ``paths``: each found from its parent's children when
    the parent came earlier (paths in tree order, as a cache of every module
    lists them, cost one lookup each), else by walking from the root."""
    found: dict[str, torch.nn.Module] = {"": root}
    modules = []
    for path in paths:
        module = found.get(path)
        if module is None:
            parent, _, name = path.rpartition(".")
            above = found.get(parent)
            child = None if above is None else above._modules.get(name)
            module = found[path] = child if child is not None else submodule(root, path)
        modules.append(module)
    return modules


def install_cache_hooks(root: torch.nn.Module, caches: Sequence[tuple[int, Cache]], world: World,
                        installed: Installed) -> None:
    """Put each cache's hooks on its modules, after every other hook (recorded
    in ``installed`` for `hooks.remove_hooks`; if anything fails here, the
    hooks made so far are removed first)."""
    thread = world.thread
    try:
        for index, op in caches:
            store = world.stored[index] = _Store(op)
            keep = _storer(op)
            fast = op.detach and op.device is None and op.dtype is None  # detach only: the usual case
            modules = zip(_modules_at(root, op.modules), op.modules)
            with _REGISTRY_LOCK:
                for module, path in modules:
                    if op.include_inputs:
                        pre = _pre(store.inputs[path], keep, thread)
                        installed.append((module, pre))
                        module.register_forward_pre_hook(pre, with_kwargs=True)
                    if op.include_output:
                        post = _post_detach(store.outputs[path], keep, thread) if fast and keep is not None \
                            else _post(store.outputs[path], keep, thread)
                        installed.append((module, post))
                        module.register_forward_hook(post)
    except BaseException:
        remove_hooks(installed)
        raise


def _pre(into: list[Any], keep: Callable[[Any], Any] | None, thread: int) -> Callable[..., None]:
    """A forward pre-hook (with kwargs) storing each call's ``(args, kwargs)``."""
    ident, append = threading.get_ident, into.append

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if ident() == thread:
            value = (args, dict(kwargs))
            append(value if keep is None else keep(value))

    return hook


def _post(into: list[Any], keep: Callable[[Any], Any] | None, thread: int) -> Callable[..., None]:
    """A forward hook storing each call's output (transformed by ``keep``)."""
    ident, append = threading.get_ident, into.append

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if ident() == thread:
            append(output if keep is None else keep(output))

    return hook


def _post_detach(into: list[Any], keep: Callable[[Any], Any], thread: int) -> Callable[..., None]:
    """`_post` for the default cache (detach only): a tensor output is
    detached in place of a call to ``keep``."""
    ident, append, tensor = threading.get_ident, into.append, torch.Tensor

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if ident() == thread:
            append(output.detach() if type(output) is tensor else keep(output))

    return hook


_NONE: list[Any] = []  # (what a cache without inputs, or outputs, stored of them: read only)


def cache_value(world: World, step: CacheStep) -> ActivationCache:
    """The value of a `Cache` node once the run has ended: its invoke's rows
    of every call stored (the calls made before a stop, when one ended the run)."""
    op = step.op
    store = world.stored.get(step.index)
    entries: dict[str, Entry] = {}
    real = {_prefixed(path): name for path, name in zip(op.modules, op.names) if _prefixed(path) != name}
    value = ActivationCache(entries, op.names, real, op.include_inputs, op.include_output)
    if store is None:
        return value
    groups, invoke = world.groups, step.invoke
    whole = groups.rows(invoke) is None
    entry = CacheEntry
    for path, name in zip(op.modules, op.names):
        outputs = store.outputs.get(path, _NONE)
        inputs = store.inputs.get(path, _NONE)
        if not whole:
            outputs = [narrow_rows(each, groups, invoke) for each in outputs]
            inputs = [narrow_rows(each, groups, invoke) for each in inputs]
        if not inputs:
            if not outputs:
                continue
            entries[name] = entry(outputs[0]) if len(outputs) == 1 else [entry(each) for each in outputs]
            continue
        count = max(len(outputs), len(inputs))
        calls = [
            entry(outputs[i] if i < len(outputs) else None, inputs[i] if i < len(inputs) else None)
            for i in range(count)
        ]
        entries[name] = calls[0] if count == 1 else calls
    return value
