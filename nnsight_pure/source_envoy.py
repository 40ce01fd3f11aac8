"""``envoy.source``: the operations inside a module's forward, as envoys.

``model.transformer.h[0].attn.source.split_0.output`` reads the value of
the first ``split`` the attention's forward performs; ``.input``,
``.inputs`` and ``.skip(value)`` work as on a module. Each operation is an
*operation site* (events.py); the run watches it with a torch function mode
while the module's forward runs (operations.py).

``print(envoy.source)`` lists the operations (operation_listing.py: the
forward runs once on fake tensors). Inside a trace it uses the trace's
inputs; outside, the model's example inputs (a `LanguageModel` tokenizes a
short prompt) or those given to ``envoy.source.listing(*inputs)``. Inside a
trace with inputs, a name the forward never performs is an
``AttributeError`` at once, naming the close ones; when no listing can be
made (a session's values, a model that cannot run on fakes) the access is
recorded anyway, and the run's warning about values that never came names
it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .errors import TraceError
from .events import operation_site
from .open_blocks import suspended
from .operation_listing import Listing, discover, unknown_operation
from .printing import module_expr
from .proxy import Proxy
from .runner import prepare

if TYPE_CHECKING:
    from .contexts.tracer import Tracer
    from .handle import ModelHandle
    from .runner import ModelAdapter


class Envoy(Protocol):
    """What operation envoys need of the module's envoy (envoy.py's `Envoy`,
    seen through this Protocol so that the two modules do not import each other)."""

    _path: str
    _alias_path: str

    @property
    def _handle(self) -> ModelHandle: ...

    def _tracer(self) -> Tracer | None: ...

    def _require_tracer(self, what: str) -> Tracer: ...


class SourceEnvoy:
    """The operations of one module's forward (``envoy.source``)."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    def __getattr__(self, name: str) -> OperationEnvoy:
        if name.startswith("_"):
            raise AttributeError(name)
        tracer = self._envoy._tracer()
        if tracer is not None:
            listing = self._in_trace(tracer)
            if listing is not None and name not in listing.names():
                raise unknown_operation(listing, self._envoy._path, name)
        return OperationEnvoy(self._envoy, name)

    def _in_trace(self, tracer: Tracer) -> Listing | None:
        """The listing for the trace's first prepared inputs, or ``None`` when
        none can be made (no inputs known while tracing, or the model does
        not run on fake tensors)."""
        prepared = next((invoke for invoke in tracer._setup.invokes if invoke is not None), None)
        if prepared is None:
            return None
        try:
            return self._discover(tracer._adapter, tracer._method, prepared.args,
                                  {**prepared.kwargs, **tracer._method_kwargs})
        except Exception:  # the model does not scan: record anyway (the run's warnings name a wrong name)
            return None

    def _discover(self, adapter: ModelAdapter, method: str | None, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Listing:
        envoy = self._envoy
        with suspended():  # the discovery run is the library's own work, never recorded
            return discover(
                adapter.handle.module, lambda fake_root: adapter.on_module(fake_root).method_fn(method),
                envoy._path, module_expr(envoy._alias_path), args, kwargs, method,
            )

    def listing(self, *inputs: Any, **kwargs: Any) -> Listing:
        """The operations of this module's forward when the model runs on
        ``inputs`` (as an invoke takes them); without inputs, the open
        trace's, or the model's example inputs. ``str()`` of it is the table
        ``print(envoy.source)`` shows."""
        envoy = self._envoy
        tracer = envoy._tracer()
        if not inputs and not kwargs and tracer is not None:
            found = self._in_trace(tracer)
            if found is not None:
                return found
        wrapper = envoy._handle.owner() if envoy._handle.owner is not None else None
        if wrapper is None:
            raise TraceError(f"{module_expr(envoy._alias_path)}.source: the model wrapper "
                             "this envoy came from no longer exists (keep a reference to it)")
        if not inputs and not kwargs:
            example = wrapper._example_inputs()
            if example is None:
                raise TraceError(
                    f"{module_expr(envoy._alias_path)}.source needs inputs to list the operations of the "
                    f"forward (it runs the model once on fake tensors): print it inside "
                    f"`with model.trace(inputs):`, or call {module_expr(envoy._alias_path)}.source.listing(inputs)"
                )
            inputs, kwargs = example
        adapter = wrapper._adapter()
        prepared = prepare(adapter, tuple(inputs), dict(kwargs))
        return self._discover(adapter, None, prepared.args, prepared.kwargs)

    def __repr__(self) -> str:
        try:
            return str(self.listing())
        except TraceError as error:
            return f"<{error}>"

    __str__ = __repr__


class OperationEnvoy:
    """One operation inside a module's forward: ``.output``, ``.input``, ``.inputs``, ``.skip``."""

    def __init__(self, envoy: Envoy, name: str) -> None:
        self._envoy = envoy
        self._name = name
        self._site = operation_site(envoy._path, name)

    def __repr__(self) -> str:
        return f"<operation {self._name} of {module_expr(self._envoy._alias_path)}>"

    @property
    def output(self) -> Proxy:
        """The operation's value (what the function, or the child module, returned)."""
        return self._envoy._require_tracer("source")._access(self._site, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "output", value)

    @property
    def inputs(self) -> Proxy:
        """The operation's arguments as ``(args, kwargs)``."""
        return self._envoy._require_tracer("source")._access(self._site, "inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "inputs", value)

    @property
    def input(self) -> Proxy:
        """The operation's first positional argument."""
        return self._envoy._require_tracer("source")._access(self._site, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "input", value)

    def skip(self, value: Any) -> None:
        """Do not call this operation; ``value`` is its result."""
        self._envoy._require_tracer("source")._write_skip(self._site, value)
