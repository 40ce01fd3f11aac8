"""Envoy: the mirror of one module of the wrapped model.

``model.transformer.h[0].mlp`` walks envoys. Inside a trace an envoy's
``.output``, ``.input`` and ``.inputs`` are proxies of that module's values
(assign to them to replace the values), calling it records an ad-hoc module
call, and tensor attributes (``.weight``) read a clone. Outside a trace an
envoy is a thin view of its torch module. Envoys never change the torch
module's structure except to attach a module the user assigns.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator

import torch

from . import open_blocks as active
from .contexts.flow import EachCallContext, calls_from
from .contexts.tracer import Tracer
from .errors import TraceError
from .handle import ModelHandle
from .ops import AccessKind, ApplyModule, Call, ModuleAttr
from .printing import module_expr
from .proxy import Proxy
from .source_envoy import SourceEnvoy


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


class Envoy:
    """A module of the wrapped model, as seen by traces."""

    def __init__(self, handle: ModelHandle, module: torch.nn.Module, path: str, alias_path: str) -> None:
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_cached", (handle.generation, module))
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_alias_path", alias_path)
        object.__setattr__(self, "_children", {})

    _handle: ModelHandle
    _cached: tuple[int, torch.nn.Module]
    _path: str
    _alias_path: str
    _children: dict[str, Envoy]

    @property
    def _module(self) -> torch.nn.Module:
        """This envoy's torch module (looked up again if the model was replaced)."""
        generation, module = self._cached
        if generation != self._handle.generation:
            module = self._handle.module.get_submodule(self._path)
            object.__setattr__(self, "_cached", (self._handle.generation, module))
        return module

    # --- where this module sits ---------------------------------------------------------

    @property
    def path(self) -> str:
        """nnsight's path of this module: ``""`` for the root, ``".layer1"``, ``".h.0"``."""
        return f".{self._alias_path}" if self._alias_path else ""

    def _tracer(self) -> Tracer | None:
        for context in reversed(active.open_contexts()):
            if isinstance(context, Tracer) and context.handle is self._handle:
                return context
        return None

    def _require_tracer(self, what: str) -> Tracer:
        tracer = self._tracer()
        if tracer is None:
            raise TraceError(
                f"{module_expr(self._alias_path)}.{what} exists only inside a trace of this model: "
                "open `with model.trace(...):` first"
            )
        return tracer

    # --- module values ------------------------------------------------------------------

    def _read(self, kind: AccessKind) -> Proxy:
        if isinstance(self._module, torch.nn.ModuleList):
            # A ModuleList is never called itself: stand for its children's values.
            parts = tuple(child._read(kind) for child in self)
            return self._require_tracer(kind)._current().record(Call(list), (parts,))
        return self._require_tracer(kind)._access(self._path, kind)

    def _write(self, kind: AccessKind, value: object) -> None:
        if isinstance(self._module, torch.nn.ModuleList):
            raise TraceError(
                f"{module_expr(self._alias_path)} is a ModuleList, which the model never calls: "
                f"set the .{kind} of each of its children instead"
            )
        self._require_tracer(kind)._write_access(self._path, kind, value)

    @property
    def output(self) -> Proxy:
        """The module's output (at its first call)."""
        return self._read("output")

    @output.setter
    def output(self, value: object) -> None:
        self._write("output", value)

    @property
    def inputs(self) -> Proxy:
        """The module's inputs as ``(args, kwargs)``, as a forward-pre-hook sees them."""
        return self._read("inputs")

    @inputs.setter
    def inputs(self, value: object) -> None:
        self._write("inputs", value)

    @property
    def input(self) -> Proxy:
        """The module's first positional argument."""
        return self._read("input")

    @input.setter
    def input(self, value: object) -> None:
        self._write("input", value)

    def skip(self, value: object) -> None:
        """Do not run this module's forward (at its current call); ``value`` is
        its output, for this invoke's rows. ``value`` may use the module's own
        ``.input``; the module's submodules are not called."""
        if isinstance(self._module, torch.nn.ModuleList):
            raise TraceError(f"{module_expr(self._alias_path)} is a ModuleList, which the model never calls")
        self._require_tracer("skip()")._write_skip(self._path, value)

    @property
    def source(self) -> SourceEnvoy:
        """The operations this module's forward performs (``print`` it to list
        them); ``.source.<name>.output`` reads one inside a trace."""
        return SourceEnvoy(self)

    # --- which call: generation steps, modules called in a loop -----------------------

    def next(self, increment: int = 1) -> Envoy:
        """From now on in this trace, accesses to this module and those below it
        read ``increment`` calls later (the next generation step). Returns this envoy."""
        self._require_tracer("next()")._skip_calls(self._path, increment)
        return self

    def all(self, propagate: bool = True) -> Envoy:
        """Run what follows once per call of this module (and those below it): one
        value per generation step. Bare, it lasts until the invoke or trace ends;
        as ``with envoy.all():`` it lasts for the block. Returns this envoy."""
        self._require_tracer("all()")._loop_over_calls((self._path,), sticky=True)
        return self

    def __enter__(self) -> Envoy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._require_tracer("all()")._close_last_loop((self._path,))

    @property
    def iter(self) -> CallSelection:
        """``envoy.iter[i].output`` reads call ``i``; ``with envoy.iter[a:b]:`` or
        ``with envoy.iter[[i, j]]:`` runs its block once per selected call."""
        return CallSelection(self)

    @iter.setter
    def iter(self, call: int) -> None:
        """``envoy.iter = i``: from now on, accesses to this module read call ``i``."""
        self._require_tracer("iter")._fix_call(self._path, int(call))

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        """Run this module on ``args``: inside a trace, records an ad-hoc call
        (``hook=True`` makes it a real, hooked call); outside, just runs it."""
        tracer = self._tracer()
        if tracer is None:
            return self._module(*args, **kwargs)
        return tracer._current().record(tracer._hooked(ApplyModule(self._path, hook)), args, kwargs)

    # --- children and attributes --------------------------------------------------------

    def _child(self, attribute: str) -> Envoy | None:
        """The child envoy reached as ``attribute`` (an alias or a real name)."""
        name = self._handle.real_name(self._module, self._path, attribute)
        return None if name is None else self._child_named(name)

    def _child_named(self, name: str) -> Envoy | None:
        """The child envoy of the torch child module called ``name``."""
        module = self._module._modules.get(name)
        if module is None:
            return None
        envoy = self._children.get(name)
        if envoy is None or envoy._module is not module:
            alias = self._handle.alias(self._path, name)
            cls = _envoy_class(module)
            envoy = cls(self._handle, module, _join(self._path, name), _join(self._alias_path, alias))
            self._children[name] = envoy
        return envoy

    def __getattr__(self, name: str) -> Any:
        known = self._children.get(name)
        if known is not None and not self._handle.renames:
            # The usual case, on every access in every trace: a child already seen.
            module = self._module
            if module._modules.get(name) is known._module:
                return known
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = self._child(name)
        if child is not None:
            return child
        try:
            value = getattr(self._module, name)
        except AttributeError:
            children = ", ".join(self._handle.alias(self._path, n) for n in self._module._modules) or "none"
            raise AttributeError(
                f"{module_expr(self._alias_path)} ({type(self._module).__name__}) has no submodule "
                f"or attribute {name!r}; its submodules are: {children}"
            ) from None
        if isinstance(value, torch.Tensor):
            tracer = self._tracer()
            if tracer is not None:
                return tracer._current().record(ModuleAttr(self._path, name))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            # Attaching a module (or setting any attribute) goes to the torch module.
            setattr(self._module, name, value)

    def __getitem__(self, key: int | str) -> Envoy:
        names = list(self._module._modules)
        if isinstance(key, str):
            name = key
        else:
            try:
                name = names[key]
            except IndexError:
                raise IndexError(
                    f"{module_expr(self._alias_path)} has {len(names)} submodules; index {key} is out of range"
                ) from None
        child = self._child_named(name)
        if child is None:
            raise KeyError(f"{module_expr(self._alias_path)} has no submodule {key!r}")
        return child

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Iterator[Envoy]:
        for index in range(len(self._module._modules)):
            yield self[index]

    def __dir__(self) -> list[str]:
        names = [self._handle.alias(self._path, n) for n in self._module._modules]
        return sorted(set(super().__dir__()) | set(names))

    # --- tree helpers -------------------------------------------------------------------

    def modules(self, include_fn: Callable[[Envoy], bool] | None = None) -> list[Envoy]:
        """This envoy and all below it, pre-order (optionally filtered)."""
        found = [envoy for _, envoy in self.named_modules()]
        return [envoy for envoy in found if include_fn is None or include_fn(envoy)]

    def named_modules(self) -> list[tuple[str, Envoy]]:
        """``(path, envoy)`` for this envoy and all below it, pre-order."""
        result: list[tuple[str, Envoy]] = [(self._alias_path, self)]
        for child in self:
            result.extend(child.named_modules())
        return result

    def to(self, *args: Any, **kwargs: Any) -> Envoy:
        """Move the module (``torch.nn.Module.to``); returns this envoy."""
        self._module.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return _envoy_repr(self)


class CallSelection:
    """``envoy.iter``: index it with a call (``[2]``), calls (``[1:3]``, ``[[0, 2]]``)."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    def __getitem__(self, key: Any) -> SelectedCalls:
        return SelectedCalls(self._envoy, key)


class SelectedCalls:
    """Some calls of a module: read one (``.output``) or loop over them (``with``)."""

    def __init__(self, envoy: Envoy, key: Any) -> None:
        self._envoy = envoy
        self._key = key
        self._loop: EachCallContext | None = None

    def _one_call(self, what: str) -> int:
        if isinstance(self._key, int) and self._key >= 0:
            return self._key
        raise TraceError(
            f"{module_expr(self._envoy._alias_path)}.iter[{self._key!r}].{what} names several calls; "
            f"loop over them with `with ...iter[{self._key!r}]:`, or pick one call"
        )

    @property
    def output(self) -> Proxy:
        """The output of the selected call."""
        call = self._one_call("output")
        return self._envoy._require_tracer("output")._access(self._envoy._path, "output", call)

    @output.setter
    def output(self, value: object) -> None:
        call = self._one_call("output")
        self._envoy._require_tracer("output")._write_access(self._envoy._path, "output", value, call)

    @property
    def input(self) -> Proxy:
        """The first positional argument of the selected call."""
        return self._envoy._require_tracer("input")._access(self._envoy._path, "input", self._one_call("input"))

    @property
    def inputs(self) -> Proxy:
        """The ``(args, kwargs)`` of the selected call."""
        return self._envoy._require_tracer("inputs")._access(self._envoy._path, "inputs", self._one_call("inputs"))

    def __enter__(self) -> EachCallContext:
        selection = calls_from([self._key] if isinstance(self._key, int) else self._key)
        tracer = self._envoy._require_tracer("iter")
        self._loop = tracer._loop_over_calls((self._envoy._path,), sticky=False, **selection)
        return self._loop.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._loop is not None:
            self._loop.__exit__(exc_type, exc, tb)


_RESERVED = ("output", "input", "inputs")


def _child_getter(name: str) -> Callable[[Envoy], Envoy | None]:
    def get(envoy: Envoy) -> Envoy | None:
        return envoy._child(name)

    return get


def _envoy_class(module: torch.nn.Module) -> type[Envoy]:
    """`Envoy`, or a subclass in which child modules named like an access
    (``output``, ...) win, the access moving to ``nns_<name>`` (as nnsight does)."""
    clashes = [name for name in _RESERVED if name in module._modules]
    if not clashes:
        return Envoy
    warnings.warn(
        f"{type(module).__name__} has submodule(s) named {clashes}; on its envoy they are the "
        f"submodules, and the module's own values are at {['nns_' + n for n in clashes]}",
        stacklevel=4,
    )
    namespace: dict[str, Any] = {}
    for name in clashes:
        namespace[f"nns_{name}"] = Envoy.__dict__[name]
        namespace[name] = property(_child_getter(name))
    return type("PreservingEnvoy", (Envoy,), namespace)


def _envoy_repr(envoy: Envoy) -> str:
    """torch's module repr, but with the envoys' names (aliases)."""
    module = envoy._module
    if not envoy._handle.renames or not module._modules:
        return repr(module)
    lines = []
    extra = module.extra_repr()
    if extra:
        lines.extend(extra.split("\n"))
    for child in envoy:
        name = child._alias_path.rsplit(".", 1)[-1]
        child_text = repr(child).replace("\n", "\n  ")
        lines.append(f"({name}): {child_text}")
    body = "\n  ".join(lines)
    return f"{type(module).__name__}(\n  {body}\n)"
