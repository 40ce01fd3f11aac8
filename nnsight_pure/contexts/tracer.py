"""Tracer: ``with model.trace(...)``. Records a graph, then runs it once on exit.

The tracer owns the current graph (the only mutable cell of a trace), the
invokes' inputs, and which invoke is open. A tracer on its own runs its
graph when its block exits; a tracer inside a session instead becomes a
`TraceRun` node of the session's graph, and runs when the session does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import TraceError
from ..events import EventKey, in_scope
from ..graph import SourceLoc
from ..ops import AccessKind, ApplyModule, ModuleGet, ModuleSet, Op, TraceRun
from ..proxy import Proxy
from ..scan import UNKNOWN, fake_copy, fake_value, new_mode, scan
from ..source import short, user_location
from ..trees import find_leaf, map_leaves
from . import active, recorded_calls
from .base import GraphContext
from .calls import EachCallContext
from .invoker import Invoker, _is_proxy

if TYPE_CHECKING:
    from ..models.nnsight import NNsight


def _unknown_inputs(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> TraceError:
    """The error for a trace's inputs that hold values not computed yet."""
    found = find_leaf((inputs, kwargs), _is_proxy)
    made = f"{found.node} (made at {short(found._context.graph.nodes[found._ref.index].source)})" if (
        isinstance(found, Proxy) and found._ref is not None
    ) else "a traced value"
    return TraceError(
        f"the inputs of this trace hold {made}, which has no value while tracing: a value of "
        "another trace that has not run, or a torch factory call such as torch.rand(...) made "
        "inside an open block (recorded to run with the model, as in nnsight 0.4). Make the "
        "inputs before the `with` block; only a session passes traced values between traces."
    )


class Tracer(GraphContext):
    """The context returned by `NNsight.trace`: record interventions, run on exit."""

    _is_trace = True
    _scan = False
    _validate = False
    _fake_mode: Any = None  # a FakeTensorMode (scan/validate)
    _fake_model: NNsight | None = None  # a wrapper of a fake copy (scan/validate)
    _invoker: Invoker | None = None
    _implicit: Invoker | None = None
    _keep_result = False  # keep what the method returns (trace=False)

    def __init__(
        self,
        model: NNsight,
        method: str | None,
        method_kwargs: dict[str, Any],
        where: SourceLoc | None,
        parent: GraphContext | None = None,
        scan: bool = False,
        validate: bool = False,
    ) -> None:
        super().__init__(model._handle, where, parent)
        if scan or validate:
            self._scan = scan
            self._validate = validate
            self._fake_mode = new_mode()
        self._scanned: dict[int | None, dict[EventKey, Any]] = {}
        if model._edits is not None:
            self._graph = model._edits  # the model's edits run first, then this trace's nodes
        self._model = model
        self._method = method
        self._method_kwargs = method_kwargs
        # Per invoke: its inputs as given (None: no inputs). A tracer on its
        # own also prepares them at once, to know each invoke's batch size.
        self._inputs: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = []
        self._prepared: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._sizes: list[int | None] = []
        self._accesses: dict[tuple[GraphContext, str, AccessKind, int | None, int], Proxy] = {}
        self._offsets: list[tuple[str, int]] = []  # .next(): (module path, calls to skip)
        self._fixed: dict[str, int] = {}  # envoy.iter = n: that module's call, from now on
        self._sticky: list[tuple[EachCallContext, int | None]] = []  # .all() loops (and their invoke)

    @property
    def _trace(self) -> Tracer:
        return self

    @property
    def in_session(self) -> bool:
        """True when this trace is part of a session (it runs when the session does)."""
        return self._parent is not None

    # --- the context protocol ---------------------------------------------------------

    def __enter__(self) -> Tracer:
        self._push_safely()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self._close_sticky(exc_type is None)
        finally:
            self._closed = True  # first: from here on, even an interrupt cannot leave it open
            self._pop()  # whatever happened (an interrupt included), the trace is no longer open
        if self._implicit is not None and self._invoker is self._implicit:
            self._implicit.__exit__(None, None, None)
        # Recording is over: drop what points back at this tracer (proxies in
        # the access cache, invokers), so that no reference cycle keeps saved
        # values alive after the user drops their proxies.
        self._accesses.clear()
        self._implicit = self._invoker = None
        if exc_type is not None:
            self._release()
            return
        if not self._runs:
            return  # a scan: never runs
        if self._parent is not None:
            self._parent._close_child(
                self, TraceRun(self._graph, self._method), (tuple(self._inputs),), self._method_kwargs
            )
            return
        try:
            results, _ = self._model._run_trace(
                self._graph, self._method, self._prepared, self._sizes, self._method_kwargs, self._where,
                keep_result=self._keep_result,
            )
        except BaseException:
            self._release()
            raise
        finally:
            self._prepared.clear()
        self._assign(results)

    # --- invokes ----------------------------------------------------------------------

    def invoke(self, *inputs: Any, scan: bool = False, **kwargs: Any) -> Invoker:
        """A context whose accesses see only the rows of ``inputs`` in the batch.

        ``scan=True`` (nnsight 0.4) runs the model on fake tensors for this
        invoke's inputs as it opens, so shapes are known inside the block.
        Other keyword arguments go to the model's `_prepare_input`.
        """
        return Invoker(self, inputs, kwargs, scan=scan)

    @property
    def invoker(self) -> Invoker | None:
        """The open invoke of this trace (nnsight 0.4's ``tracer.invoker``), if any."""
        return self._invoker

    def _enter_invoke(self, invoker: Invoker) -> int | None:
        if self._invoker is not None:
            raise TraceError(
                "an invoke is already open in this trace"
                + (" (model.trace(inputs) opens one for its inputs; use model.trace() "
                   "with no inputs to invoke several times)" if self._invoker is self._implicit else "")
            )
        if self._closed:
            raise TraceError(f"the trace opened at {short(self._where)} has closed")
        innermost = active.innermost()
        if self._open and innermost is not self:
            raise TraceError("open invokes directly in the trace, not inside a loop or condition")
        index = len(self._inputs)
        given, given_kwargs = invoker.given
        scanning = self._scan or invoker.scan
        if not given and not given_kwargs:
            self._inputs.append(None)  # an invoke without inputs sees the whole batch
            self._sizes.append(None)
        else:
            self._inputs.append((given, given_kwargs))
            prepared = invoker._prepare() if self._parent is None or (scanning and invoker._concrete) else None
            if self._parent is None and prepared is None:
                raise _unknown_inputs(given, given_kwargs)
            if scanning:
                if prepared is None:
                    raise TraceError("scan=True needs inputs known while tracing, not values of the session")
                if self._fake_mode is None:
                    self._fake_mode = new_mode()
                faked = self._faked()
                args, kwargs = prepared
                with recorded_calls.suspended():
                    # The method gets the trace's own keywords too (max_new_tokens=...), as at run time.
                    self._scanned[index] = scan(
                        faked._model, faked._method_fn(self._method), args, {**kwargs, **self._method_kwargs},
                        self._fake_mode,
                    )
            if self._parent is None:
                assert prepared is not None
                self._prepared.append((tuple(prepared[0]), dict(prepared[1])))
                self._sizes.append(invoker.batch_size)
            else:
                self._sizes.append(None)  # prepared when the session runs
        self._invoker = invoker
        self._invoke = index
        return self._invoke

    def _exit_invoke(self, invoker: Invoker, ok: bool = True) -> None:
        if self._invoker is invoker:
            self._close_sticky(ok, only_invoke=self._invoke)
            self._invoker = None
            self._invoke = None

    def _open_implicit_invoker(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._implicit = Invoker(self, inputs, kwargs)
        self._implicit.__enter__()

    # --- module accesses (called by envoys) ------------------------------------------

    def _access(self, path: str, kind: AccessKind, call: int | None = None) -> Proxy:
        """The proxy for a module value in the current block and invoke (one node per value)."""
        context = self._current()
        call = self._call_of(path) if call is None else call
        key = (context, path, kind, self._invoke, call)
        proxy = self._accesses.get(key)
        if proxy is None:
            proxy = context.record(ModuleGet(path, kind, call))
            self._accesses[key] = proxy
        return proxy

    def _write_access(self, path: str, kind: AccessKind, value: Any, call: int | None = None) -> None:
        """Replace a module value in the current block and invoke."""
        call = self._call_of(path) if call is None else call
        self._current().record(ModuleSet(path, kind, call), (value,))
        # Later reads of this module, in any invoke, must be new nodes that run
        # after the write and see its value: forget the cached accesses.
        for key in [key for key in self._accesses if key[1] == path]:
            del self._accesses[key]

    def _fake_of(self, op: Op, args: Sequence[Any], kwargs: Mapping[str, Any], invoke: int | None) -> Any:
        """The fake value of a node recorded in this trace (scan/validate)."""
        assert self._fake_mode is not None

        def fake(arg: Any) -> Any:
            return map_leaves(self._fake_of_leaf, arg)

        with recorded_calls.suspended():
            return fake_value(
                op, args, kwargs, fake, self._scanned.get(invoke, {}), lambda: self._faked()._model,
                self._fake_mode, self._validate,
            )

    def _faked(self) -> NNsight:
        """This trace's model wrapper around a fake copy of the module tree."""
        if self._fake_model is None:
            assert self._fake_mode is not None
            faked = self._model._shallow_copy()
            with recorded_calls.suspended():
                fake_module = fake_copy(self._model._model, self._fake_mode)
            object.__setattr__(faked, "_handle", self._model._handle.with_module(fake_module))
            self._fake_model = faked
        return self._fake_model

    def _fake_of_leaf(self, leaf: Any) -> Any:
        if isinstance(leaf, Proxy):
            # Only this trace's fakes share its fake mode.
            return leaf._fake if leaf._context._trace is self else UNKNOWN
        return leaf

    def _hooked(self, op: ApplyModule) -> ApplyModule:
        """How an ad-hoc module call is recorded here (an edit makes them hooked)."""
        return op

    # --- which call of a module (generation steps, loops) -------------------------------

    def _call_of(self, path: str) -> int:
        """The call of module ``path`` that an access reads now (after ``.next()``s)."""
        if not self._offsets and not self._fixed:
            return 0
        if path in self._fixed:
            return self._fixed[path]
        return sum(skip for prefix, skip in self._offsets if in_scope(path, (prefix,)))

    def _skip_calls(self, path: str, count: int) -> None:
        self._current()
        self._offsets.append((path, count))

    def _loop_over_calls(self, scope: tuple[str, ...], sticky: bool, **selection: Any) -> EachCallContext:
        """A block over calls of the ``scope`` modules; a sticky one opens now and
        stays open until its invoke or this trace ends."""
        context = EachCallContext(self._current(), scope, user_location(), **selection)
        if sticky:
            context._begin(True)
            self._sticky.append((context, self._invoke))
        return context

    def _close_sticky(self, record: bool, only_invoke: int | None | object = ...) -> None:
        """Close the sticky loops (those opened in ``only_invoke``, if given), innermost first."""
        while self._sticky and (only_invoke is ... or self._sticky[-1][1] == only_invoke):
            context, _ = self._sticky.pop()
            context._close(record)

    def _close_last_loop(self, scope: tuple[str, ...]) -> None:
        """End the sticky loop ``with envoy.all():`` opened, at the end of its block."""
        for position in range(len(self._sticky) - 1, -1, -1):
            context, _ = self._sticky[position]
            if context._op_fields[3] == scope:
                del self._sticky[position]
                context._close(True)
                return

    def all(self) -> EachCallContext:
        """Run what follows (or the ``with`` block) once per generation step: every
        module access reads the step's call."""
        return self._loop_over_calls(("",), sticky=True)

    def next(self, increment: int = 1) -> Tracer:
        """From now on, every module access reads ``increment`` calls later."""
        self._skip_calls("", increment)
        return self

    def _current(self) -> GraphContext:
        """The innermost open block, which must be this trace or inside it."""
        context = active.innermost()
        if context is None or context._trace is not self:
            raise TraceError(
                f"the trace opened at {short(self._where)} is not the innermost open trace "
                "in this thread"
            )
        return context
