"""NNsight: wrap any torch module to trace and intervene on it (nnsight 0.4's API).

The wrapper holds no per-trace state: `trace` returns a new `Tracer` each
time, and the torch module is only ever touched by the interpreter's hooks,
for the length of one run. The contexts it builds get its `WrapperAdapter`
(the `runner.ModelAdapter` Protocol over the subclass contract below) and
their options through their constructors; they reach nothing else of it.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, cast

import attrs
import torch

from ..batching import batch_size_of, default_batch
from ..contexts.base import innermost
from ..contexts.editing import EditingTracer
from ..contexts.session import Session
from ..contexts.tracer import Tracer
from ..envoy import Envoy, _envoy_class
from ..graph import Graph
from ..handle import ModelHandle
from ..interpreter import Interleaver
from ..runner import Inputs
from ..source import user_location
from ..trees import NOT_FOUND, find_leaf, map_leaves


class NNsight:
    """A traceable view of ``model``: ``with NNsight(model).trace(x): ...``.

    Attribute access reaches the module tree as envoys (``model.layer1``).
    ``rename`` shows modules under aliases (``{"layer1": "first"}``), at the
    envoy level only: the torch module is never changed.

    Subclasses adapt it to a model family by overriding `_prepare_input`
    (normalise one invoke's inputs), `_batch` (fold invokes into one batch),
    `_execute` (run the model) and `interleave` (run a method with the hooks
    in place); ``__methods__`` maps a public name to a wrapper method to trace
    (``{"generate": "_generate"}`` makes ``model.generate(...)`` a trace).
    """

    __methods__: ClassVar[dict[str, str]] = {}

    _handle: ModelHandle
    _envoy: Envoy
    _edits: Graph | None

    def __init__(self, model: torch.nn.Module, rename: Mapping[str, str] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module; got {type(model).__name__}")
        handle = ModelHandle(model, rename)
        handle.owner = weakref.ref(self)  # (weak: see handle.py) for envoy.source's listing outside a trace
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_envoy", _envoy_class(model)(handle, model, "", ""))
        object.__setattr__(self, "_edits", None)

    @property
    def _model(self) -> torch.nn.Module:
        """The torch module traced (it may be replaced, e.g. when weights load)."""
        return self._handle.module

    # --- tracing ----------------------------------------------------------------------

    def trace(
        self,
        *inputs: Any,
        trace: bool = True,
        scan: bool = False,
        method: str | None = None,
        invoker_kwargs: dict[str, Any] | None = None,
        backend: Any = None,
        remote: bool = False,
        blocking: bool = True,
        validate: bool | None = None,
        debug: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Open a trace: ``with model.trace(x) as tracer: ...`` runs the model once on exit.

        Positional ``inputs`` open one invoke at once (kept open for the whole
        block); without them, add invokes with ``tracer.invoke(...)``. Other
        keyword arguments go to the model's method at run time. With
        ``trace=False`` the model runs at once and its output is returned.

        ``scan=True`` runs the model once on fake tensors as each invoke opens,
        so that ``.shape``, ``.dtype`` and ``.device`` of values are known while
        tracing; ``validate=True`` then also raises shape errors at the line that
        causes them, before the real model runs.

        nnsight 0.4's ``backend=None``, ``remote=False``, ``blocking=True`` and
        ``debug=`` are accepted (source lines are always recorded); a backend
        object or ``remote=True`` raises `NotImplementedError`: nnsight_pure
        runs locally. None of them reaches the model.

        Returns a `Tracer` (or, with ``trace=False``, the model's output).
        """
        return self._tracer(
            inputs, trace=trace, scan=scan, method=method, invoker_kwargs=invoker_kwargs, backend=backend,
            remote=remote, validate=validate, kwargs=kwargs,
        )

    def _tracer(
        self,
        inputs: tuple[Any, ...],
        *,
        trace: bool,
        scan: bool,
        method: str | None,
        invoker_kwargs: dict[str, Any] | None,
        backend: Any,
        remote: bool,
        validate: bool | None,
        kwargs: dict[str, Any],
        never_runs: str | None = None,
    ) -> Any:
        """`trace` and `scan`: build the tracer with its options (and run it, for ``trace=False``)."""
        if backend is not None or remote:
            _refuse_remote()
        parent = self._session_parent() if trace else None
        if validate is None:
            session = parent._outermost() if parent is not None else None
            validate = bool(getattr(session, "validate", False))
        if not inputs and invoker_kwargs:
            raise TypeError("invoker_kwargs needs positional inputs to go with")
        if not trace and not inputs:
            raise ValueError("trace=False runs the model at once, so it needs inputs")
        tracer = Tracer(
            self._adapter(), method, kwargs, user_location(), parent, scan=scan, validate=validate,
            edits=self._edits, inputs=(inputs, dict(invoker_kwargs or {})) if inputs else None,
            never_runs=never_runs, keep_result=not trace,
        )
        if not trace:
            with tracer:
                pass
            return tracer._returned()
        return tracer

    def _adapter(self) -> WrapperAdapter:
        """This wrapper as the contexts see it (`runner.ModelAdapter`)."""
        return WrapperAdapter(self)

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """A trace that only scans: ``with model.scan(x): n = model.layer1.output.shape[-1]``.

        The model runs on fake tensors only (no real compute), so shapes,
        dtypes and devices are known inside the block and shape errors are
        raised there; the block itself never runs the model.
        """
        kwargs.pop("validate", None)
        options = {name: kwargs.pop(name) for name in _TRACE_OPTIONS if name in kwargs}
        tracer = self._tracer(
            inputs, trace=bool(options.get("trace", True)), scan=True, method=options.get("method"),
            invoker_kwargs=options.get("invoker_kwargs"), backend=options.get("backend"),
            remote=bool(options.get("remote", False)), validate=True, kwargs=kwargs,
            never_runs="a scan never runs the model; use model.trace(...) for values.",
        )
        assert isinstance(tracer, Tracer)
        return tracer

    def edit(self, *inputs: Any, inplace: bool = False, **kwargs: Any) -> EditingTracer:
        """Record interventions that every later trace of the returned model runs first.

        ``with model.edit() as edited:`` gives ``edited``, a new wrapper of the
        same torch module (the original wrapper is unchanged); with
        ``inplace=True`` it is this wrapper. Edits add to the edits already
        there; `clear_edits` removes them. Positional inputs are accepted, as
        in nnsight 0.4, and not needed: nothing runs until a later trace.
        """
        target = self if inplace else self._shallow_copy()
        return EditingTracer(
            target._adapter(), user_location(), edits=target._edits, entered=target, store=target._store_edits
        )

    def _store_edits(self, edits: Graph | None) -> None:
        """Make ``edits`` the graph every later trace of this wrapper starts from."""
        object.__setattr__(self, "_edits", edits)

    def clear_edits(self) -> None:
        """Remove this wrapper's edits (other wrappers of the model keep theirs)."""
        object.__setattr__(self, "_edits", None)

    @property
    def edits(self) -> Graph | None:
        """The graph every trace of this wrapper starts from (``None``: no edits)."""
        return self._edits

    def _shallow_copy(self) -> NNsight:
        """A new wrapper of this class sharing the torch module, envoys and edits."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        return copy

    def session(
        self,
        backend: Any = None,
        remote: bool = False,
        blocking: bool = True,
        validate: bool = False,
        debug: bool | None = None,
    ) -> Session:
        """Open a session: ``with model.session():`` records several traces (and
        the code between them, loops and conditions included) and runs them all,
        in order, when it exits. Values flow between its traces without saving.

        ``validate=True`` makes it the default of the traces opened inside.
        nnsight 0.4's ``backend``/``remote``/``blocking``/``debug`` are accepted
        as for `trace` (local execution only)."""
        if backend is not None or remote:
            _refuse_remote()
        return Session(self._adapter(), user_location(), validate=validate)

    def _session_parent(self) -> Any:
        """The innermost open block of a session of this model, outside any trace, if any."""
        context = innermost()
        if context is None or context._trace is not None:
            return None
        outer = context._outermost()
        if isinstance(outer, Session) and outer.handle is self._handle:
            return context
        return None

    def _before_run(self) -> None:
        """Called before each real run (not before scans): a subclass loads its weights here."""

    def interleave(
        self, interleaver: Interleaver, *args: Any, fn: Callable[..., Any] | str | None = None, **kwargs: Any
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` (default `_execute`) with the trace's hooks in place.

        Override to prepare the model first (load weights, say); keep the call
        inside ``with interleaver:``.
        """
        function = self._method_fn(fn)
        with interleaver:
            return function(*args, **kwargs)

    def _method_fn(self, method: Callable[..., Any] | str | None) -> Callable[..., Any]:
        if method is None:
            return self._execute
        if isinstance(method, str):
            function = getattr(self, method, None)
            if function is None:
                function = getattr(self._model, method, None)
            if not callable(function):
                raise AttributeError(f"{type(self).__name__} has no method {method!r} to trace")
            return cast(Callable[..., Any], function)
        return method

    # --- the batching contract (override in subclasses) -------------------------------

    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], int]:
        """Normalise one invoke's inputs: ``((args, kwargs), batch_size)``.

        The default keeps them as given; the batch size is dim 0 of the first tensor.
        """
        return (inputs, kwargs), batch_size_of(inputs, kwargs)

    def _example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Inputs to list a module's operations with outside a trace (``print(envoy.source)``):
        none for a plain model (its inputs cannot be guessed); a subclass may know some."""
        return None

    def _invoker_inputs(self, prepared: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        """``invoker.inputs`` as nnsight 0.4 scripts read them: the prepared
        ``(args, kwargs)`` (a subclass may show its own shape)."""
        return prepared

    def _batch(
        self,
        batched_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Fold one invoke's prepared inputs into the batch (``None`` at first).

        The default concatenates tensors along dim 0 and requires every other
        argument to be the same in each invoke.
        """
        return default_batch(batched_inputs, args, kwargs)

    def _execute(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on the batched inputs (moved to the model's device)."""
        device = self.device
        if device is not None and _elsewhere((args, kwargs), device):
            args, kwargs = map_leaves(
                lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) and leaf.device != device else leaf,
                (args, kwargs),
            )
        return self._model(*args, **kwargs)

    # --- the wrapped module -----------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> NNsight:
        """Move the model (``torch.nn.Module.to``); returns this wrapper."""
        self._model.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device | None:
        """The device of the model's first parameter (``None`` without parameters)."""
        parameter = _first_parameter(self._model)
        return None if parameter is None else parameter.device

    def get(self, path: str) -> Any:
        """The envoy (or, inside a trace, proxy) at a dotted path: ``get("layer1.output")``."""
        value: Any = self._envoy
        for part in path.split("."):
            if part:
                value = getattr(value, part)
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        wrapper = type(self).__methods__.get(name)
        if wrapper is not None:
            return functools.partial(self.trace, method=wrapper)
        return getattr(self._envoy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._envoy, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._envoy(*args, **kwargs)

    # The root's children by position (nnsight 0.4 needed ``model._envoy[0]``).
    def __getitem__(self, key: int | str) -> Envoy:
        return self._envoy[key]

    def __len__(self) -> int:
        return len(self._envoy)

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._envoy)

    def __repr__(self) -> str:
        return repr(self._envoy)


_TRACE_OPTIONS = ("trace", "method", "invoker_kwargs", "backend", "remote", "blocking", "debug")


@attrs.frozen(eq=False)
class WrapperAdapter:
    """An `NNsight` wrapper as a `runner.ModelAdapter`: the Protocol's methods
    call the wrapper's overridable contract (`_prepare_input`, `_batch`,
    `interleave`, ...), so subclasses keep overriding those."""

    wrapper: NNsight

    @property
    def handle(self) -> ModelHandle:
        return self.wrapper._handle

    def prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[Inputs, int]:
        return self.wrapper._prepare_input(*inputs, **kwargs)

    def invoker_inputs(self, prepared: Inputs) -> Any:
        return self.wrapper._invoker_inputs(prepared)

    def batch(self, batched: Inputs | None, *args: Any, **kwargs: Any) -> Inputs:
        return self.wrapper._batch(batched, *args, **kwargs)

    def before_run(self) -> None:
        self.wrapper._before_run()

    def interleave(self, interleaver: Interleaver, *args: Any, fn: Callable[..., Any] | str | None = None,
                   **kwargs: Any) -> Any:
        return self.wrapper.interleave(interleaver, *args, fn=fn, **kwargs)

    def method_fn(self, method: str | None) -> Callable[..., Any]:
        return self.wrapper._method_fn(method)

    def on_module(self, module: torch.nn.Module) -> WrapperAdapter:
        faked = self.wrapper._shallow_copy()
        object.__setattr__(faked, "_handle", self.wrapper._handle.with_module(module))
        return WrapperAdapter(faked)


def _refuse_remote() -> None:
    """nnsight 0.4's execution options: local (``None``/``False``) is all there is."""
    raise NotImplementedError(
        "remote execution and backends (NDIF) are not supported: nnsight_pure runs "
        "locally; drop backend=/remote=True"
    )


def _elsewhere(value: tuple[Sequence[Any], Mapping[str, Any]], device: torch.device) -> bool:
    """Whether a tensor in ``value`` is not on ``device`` (a quick look first:
    this is on every run's path, and inputs are usually where the model is)."""
    if device.type == "cpu":
        args, kwargs = value
        if not kwargs and all(type(item) is torch.Tensor and item.is_cpu for item in args):
            return False  # the usual case, without a walk
        found = find_leaf(value, lambda leaf: isinstance(leaf, torch.Tensor) and not leaf.is_cpu)
    else:
        found = find_leaf(value, lambda leaf: isinstance(leaf, torch.Tensor) and leaf.device != device)
    return found is not NOT_FOUND


def _first_parameter(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """``next(module.parameters())`` without its generator machinery (it is on
    every run's path): the first parameter, depth first."""
    for parameter in module._parameters.values():
        if parameter is not None:
            return parameter
    for child in module._modules.values():
        if child is not None:
            found = _first_parameter(child)
            if found is not None:
                return found
    return None
