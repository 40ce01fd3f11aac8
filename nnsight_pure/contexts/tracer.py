"""Tracer and Invoker: ``with model.trace(...)`` and ``with tracer.invoke(inputs):``.

A tracer records a graph, then runs it once on exit through the runner
(`runner.run_invokes`), with the `ModelAdapter` its model wrapper gave it.
A tracer inside a session instead becomes a `TraceRun` node of the
session's graph, and runs when the session does.

Besides its recording (`GraphContext`), a tracer holds one more value, its
`TraceSetup`: the invokes' inputs, which calls of which modules accesses
read, the sticky loops. Both are frozen values, replaced (``_replace``) on
each change, never changed in place. Beside them a tracer keeps one memo, a
dict of the proxies read so far (`Tracer._accesses`: reading
``model.layer1.output`` twice in a block and invoke gives one node): it is
filled as accesses are recorded, forgets a module on a write, and is emptied
when recording ends. It is derived from the recording and kept as a plain
dict because it is read and written at every module access (a persistent
map's update costs ~15 Python calls there).

An `Invoker` is one slice of the trace's batch: entering it prepares its
inputs (the adapter's `prepare_input`) and makes every module access inside
the block see only these inputs' rows. An invoke with no inputs sees the
whole batch.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from pyrsistent import PMap, pmap

from .. import open_blocks as active
from ..cache_setup import cache_op
from ..errors import TraceError
from ..events import EventKey, in_scope
from ..findings import raise_first
from ..graph import Graph, SourceLoc
from ..ops import AccessKind, ApplyModule, ModuleGet, ModuleSet, Op, Result, Skip, TraceRun
from ..program_check import check_prepared
from ..proxy import Proxy, settled
from ..runner import Inputs, ModelAdapter, Prepared, prepare, run_invokes
from ..scan import UNKNOWN, fake_copy, fake_value, new_mode, scan
from ..source import short, user_location
from ..trees import NOT_FOUND, find_leaf, map_leaves
from . import recorded_calls
from .base import BodyContext, GraphContext, innermost
from .flow import EachCallContext, FlowContext


class Every(enum.Enum):
    """`Tracer._close_sticky`'s default: the sticky loops of every invoke (and of none)."""

    INVOKE = enum.auto()


EVERY_INVOKE = Every.INVOKE

AccessKey = tuple[GraphContext, str, AccessKind, "int | None", int]


class TraceSetup(NamedTuple):
    """What a trace holds besides its recording; one value, replaced on each change.

    ``inputs``: per invoke, its inputs as given (``None``: no inputs);
    ``invokes``: per invoke, what the run gets (`Prepared` for a trace on its
    own, prepared as the invoke opens; ``None`` in a session, or without
    inputs); ``open_invoke``: the index of the open invoke (new nodes belong
    to it) and ``invoker`` its block (``implicit``: the one ``model.trace(x)``
    opened); ``offsets``: ``.next()`` skips, (module path, calls);
    ``fixed``: ``envoy.iter = n``, that module's call from now on;
    ``sticky``: the open ``.all()`` loops and their invoke; ``scanned``: per
    invoke, the fake values of a scan.
    """

    inputs: tuple[Inputs | None, ...] = ()
    invokes: tuple[Prepared | None, ...] = ()
    open_invoke: int | None = None
    invoker: Invoker | None = None
    implicit: Invoker | None = None
    offsets: tuple[tuple[str, int], ...] = ()
    fixed: PMap[str, int] = pmap()  # (only ever grows: empty is the default itself)
    sticky: tuple[tuple[EachCallContext, int | None], ...] = ()
    scanned: PMap[int | None, Mapping[EventKey, Any]] = pmap()


_NEW_SETUP = TraceSetup()
_NO_FIXED = _NEW_SETUP.fixed


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


class Tracer(FlowContext):
    """The context returned by `NNsight.trace`: record interventions, run on exit.

    ``adapter`` is how the model prepares and runs inputs (`runner.ModelAdapter`);
    ``edits`` the graph the trace starts from (a model's edits run first);
    ``inputs`` opens one invoke at once, kept open for the whole block;
    ``never_runs``, when given, says why the block never runs (a scan, a graph
    built by `nnsight_pure.trace`); ``keep_result`` keeps what the method returns.
    """

    _is_trace = True
    _fake_adapter: ModelAdapter | None = None  # the adapter over a fake copy (scan/validate)

    def __init__(
        self,
        adapter: ModelAdapter,
        method: str | None,
        method_kwargs: dict[str, Any],
        where: SourceLoc | None,
        parent: GraphContext | None = None,
        scan: bool = False,
        validate: bool = False,
        *,
        edits: Graph | None = None,
        inputs: Inputs | None = None,
        never_runs: str | None = None,
        keep_result: bool = False,
    ) -> None:
        super().__init__(adapter.handle, where, parent)
        self._scan = scan
        self._validate = validate
        self._fake_mode: Any = new_mode() if scan or validate else None  # a FakeTensorMode
        if edits is not None:
            self._restart_from(edits)  # the model's edits run first, then this trace's nodes
        self._adapter = adapter
        self._method = method
        self._method_kwargs = method_kwargs
        self._never_runs = never_runs  # (None: it runs)
        self._keep_result = keep_result
        self._setup = _NEW_SETUP
        self._accesses: dict[AccessKey, Proxy] = {}  # the memo of proxies read (see the module docstring)
        if inputs is not None:
            implicit = Invoker(self, inputs[0], inputs[1])
            self._setup = TraceSetup(implicit=implicit)
            implicit.__enter__()

    @property
    def _trace(self) -> Tracer:
        return self

    @property
    def in_session(self) -> bool:
        """True when this trace is part of a session (it runs when the session does)."""
        return self._parent is not None

    def _forget_accesses(self) -> None:
        """Drop the cached accesses (their proxies point back at this tracer)."""
        self._accesses = {}

    def _current_invoke(self) -> int | None:
        """The invoke new nodes belong to (``None``: outside any invoke)."""
        return self._setup.open_invoke

    def _returned(self) -> Any:
        """What the method returned in the run (``keep_result=True``)."""
        assert self._results is not None
        return self._results.returned

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
        setup = self._setup
        if setup.implicit is not None and setup.invoker is setup.implicit:
            setup.implicit.__exit__(None, None, None)
        # Recording is over: drop what points back at this tracer (proxies in
        # the access cache, invokers), so that no reference cycle keeps saved
        # values alive after the user drops their proxies.
        invokes = self._setup.invokes
        self._setup = self._setup._replace(implicit=None, invoker=None, invokes=())
        self._accesses = {}
        if exc_type is not None:
            self._release()
            return
        if self._never_runs is not None:
            return  # a scan, an edit, a graph built to run later: never runs here
        if self._parent is not None:
            self._parent._close_child(
                self, TraceRun(self.graph, self._method), (tuple(setup.inputs),), self._method_kwargs
            )
            return
        try:
            if self._validate:
                self._check_whole_program(invokes)
            results, _ = run_invokes(
                self._adapter, self.graph, invokes, method=self._method,
                kwargs=self._method_kwargs, where=self._where, keep_result=self._keep_result,
            )
        except BaseException:
            self._release()
            raise
        self._assign(results)

    def _check_whole_program(self, invokes: Sequence[Prepared | None]) -> None:
        """``validate=True``: check the whole program against the model's calls
        on fake tensors (program_check.py) and raise the first finding before
        the model runs (warnings, such as a loop touching no call, are warned)."""
        prepared = [None if invoke is None else (invoke.args, invoke.kwargs) for invoke in invokes]
        # (check_prepared records nothing: it suspends the recording of calls itself)
        raise_first(check_prepared(self._adapter, self.graph, self._method, prepared, self._method_kwargs))

    def _outputs(self, returned: Any) -> Graph:
        """The graph recorded so far, with ``returned`` (proxies and constants)
        as its outputs; the sticky loops close first, so that values made in
        them are exported (`nnsight_pure.trace`)."""
        self._close_sticky(True)
        outputs = self._as_argument(returned)  # first: it may record exports of values made in loops
        return self.graph.with_outputs(outputs)

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
        return self._setup.invoker

    def _enter_invoke(self, invoker: Invoker) -> int:
        setup = self._setup
        if setup.invoker is not None:
            raise TraceError(
                "an invoke is already open in this trace"
                + (" (model.trace(inputs) opens one for its inputs; use model.trace() "
                   "with no inputs to invoke several times)" if setup.invoker is setup.implicit else "")
            )
        if self._closed:
            raise TraceError(f"the trace opened at {short(self._where)} has closed")
        innermost = active.innermost()
        if self._open and innermost is not self:
            raise TraceError("open invokes directly in the trace, not inside a loop or condition")
        index = len(setup.inputs)
        given, given_kwargs = invoker.given
        scanning = self._scan or invoker.scan
        entry: Inputs | None = None
        prepared: Prepared | None = None
        if given or given_kwargs:
            entry = (given, given_kwargs)
            if self._parent is None or (scanning and invoker._concrete):
                prepared = invoker._prepare()
            if self._parent is None and prepared is None:
                raise _unknown_inputs(given, given_kwargs)
            if scanning:
                if prepared is None:
                    raise TraceError("scan=True needs inputs known while tracing, not values of the session")
                self._scan_invoke(index, prepared)
            if self._parent is not None:
                prepared = None  # prepared when the session runs
        setup = self._setup
        self._setup = setup._replace(
            inputs=setup.inputs + (entry,), invokes=setup.invokes + (prepared,), invoker=invoker, open_invoke=index
        )
        return index

    def _scan_invoke(self, index: int, prepared: Prepared) -> None:
        """Run the model on fake tensors for one invoke's inputs (scan=True)."""
        if self._fake_mode is None:
            self._fake_mode = new_mode()
        faked = self._faked()
        with recorded_calls.suspended():
            # The method gets the trace's own keywords too (max_new_tokens=...), as at run time.
            scanned = scan(
                faked.handle.module, faked.method_fn(self._method), prepared.args,
                {**prepared.kwargs, **self._method_kwargs}, self._fake_mode,
            )
        self._setup = self._setup._replace(scanned=self._setup.scanned.set(index, scanned))

    def _exit_invoke(self, invoker: Invoker, ok: bool = True) -> None:
        if self._setup.invoker is invoker:
            self._close_sticky(ok, only_invoke=self._setup.open_invoke)
            self._setup = self._setup._replace(invoker=None, open_invoke=None)

    # --- module accesses (called by envoys) ------------------------------------------

    def _access(self, path: str, kind: AccessKind, call: int | None = None) -> Proxy:
        """The proxy for a module value in the current block and invoke (one node per value)."""
        context = self._current()
        call = self._call_of(path) if call is None else call
        key = (context, path, kind, self._setup.open_invoke, call)
        accesses = self._accesses
        proxy = accesses.get(key)
        if proxy is None:
            proxy = accesses[key] = context.record(ModuleGet(path, kind, call))
        return proxy

    def _write_access(self, path: str, kind: AccessKind, value: Any, call: int | None = None) -> None:
        """Replace a module value in the current block and invoke."""
        call = self._call_of(path) if call is None else call
        self._current().record(ModuleSet(path, kind, call), (value,))
        # Later reads of this module, in any invoke, must be new nodes that run
        # after the write and see its value: forget the cached accesses.
        accesses = self._accesses
        for key in [key for key in accesses if key[1] == path]:
            del accesses[key]

    def _write_skip(self, path: str, value: Any, call: int | None = None) -> None:
        """Skip a call of module (or operation site) ``path``: ``value`` is its output."""
        call = self._call_of(path) if call is None else call
        self._current().record(Skip(path, call), (value,))
        accesses = self._accesses
        for key in [key for key in accesses if key[1] == path or key[1].startswith(path + ".")]:
            del accesses[key]

    # --- the run as a whole -------------------------------------------------------------

    @property
    def result(self) -> Proxy:
        """What the traced method returns (the model's output; for ``generate``,
        the generated ids), this invoke's rows: read it in the block, use it after."""
        return self._current().record(Result())

    @result.setter
    def result(self, value: object) -> None:
        raise TraceError(
            "tracer.result is read-only: it is what the traced method returns. To change the model's output, "
            "write the last module's .output (model.output = ...) instead"
        )

    def cache(
        self,
        modules: Any = None,
        *,
        device: Any = None,
        dtype: Any = None,
        detach: bool = True,
        include_inputs: bool = False,
        include_output: bool = True,
    ) -> Proxy:
        """Record every call's values of ``modules`` after the interventions:
        one value, an `ActivationCache`, already saved; read it after the
        trace (``cache["model.transformer.h.0"].output``,
        ``cache.model.transformer.h[0].output``).

        ``modules``: every module when ``None`` (the root and, for a language
        model, ``generator`` included); else envoys or paths
        (``"model.transformer.h.0"``, aliases allowed), one or a list. Each
        call's output is kept (and, with ``include_inputs``, its
        ``(args, kwargs)``); a module called several times (generation
        steps) has a list of entries, one per call. Values are ``detach``-ed
        and moved to ``device``/``dtype`` when given (``None``: kept where
        they are). In an invoke, the cache holds that invoke's rows; in the
        trace itself, the whole batch. Call it in the trace or an invoke,
        not in a condition or a loop (it covers the whole run)."""
        context = self._current()
        if isinstance(context, (BodyContext, EachCallContext)):
            raise TraceError(
                "tracer.cache(...) covers the whole run: call it in the trace or an invoke, "
                "not inside a condition or a loop"
            )
        op = cache_op(self._handle, modules, device=device, dtype=dtype, detach=detach,
                      include_inputs=include_inputs, include_output=include_output)
        return context.record(op).save()

    def _fake_of(self, op: Op, args: Sequence[Any], kwargs: Mapping[str, Any], invoke: int | None) -> Any:
        """The fake value of a node recorded in this trace (scan/validate)."""
        assert self._fake_mode is not None

        def fake(arg: Any) -> Any:
            return map_leaves(self._fake_of_leaf, arg)

        with recorded_calls.suspended():
            return fake_value(
                op, args, kwargs, fake, self._setup.scanned.get(invoke, {}), lambda: self._faked().handle.module,
                self._fake_mode, self._validate,
            )

    def _faked(self) -> ModelAdapter:
        """This trace's adapter over a fake copy of the module tree."""
        if self._fake_adapter is None:
            assert self._fake_mode is not None
            with recorded_calls.suspended():
                fake_module = fake_copy(self._adapter.handle.module, self._fake_mode)
            self._fake_adapter = self._adapter.on_module(fake_module)
        return self._fake_adapter

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
        setup = self._setup
        if not setup.offsets and setup.fixed is _NO_FIXED:  # (identity: a pmap's len is a Python call)
            return 0
        if path in setup.fixed:
            return setup.fixed[path]
        return sum(skip for prefix, skip in setup.offsets if in_scope(path, (prefix,)))

    def _skip_calls(self, path: str, count: int) -> None:
        self._current()
        self._setup = self._setup._replace(offsets=self._setup.offsets + ((path, count),))

    def _fix_call(self, path: str, call: int) -> None:
        """``envoy.iter = n``: accesses of ``path`` read call ``n`` from now on."""
        self._setup = self._setup._replace(fixed=self._setup.fixed.set(path, call))

    def _loop_over_calls(self, scope: tuple[str, ...], sticky: bool, **selection: Any) -> EachCallContext:
        """A block over calls of the ``scope`` modules; a sticky one opens now and
        stays open until its invoke or this trace ends."""
        context = EachCallContext(self._current(), scope, user_location(), **selection)
        if sticky:
            context._begin(True)
            self._setup = self._setup._replace(sticky=self._setup.sticky + ((context, self._setup.open_invoke),))
        return context

    def _close_sticky(self, record: bool, only_invoke: int | None | Every = EVERY_INVOKE) -> None:
        """Close the sticky loops (those opened in ``only_invoke``, if given), innermost first."""
        while self._setup.sticky and (only_invoke is EVERY_INVOKE or self._setup.sticky[-1][1] == only_invoke):
            context, _ = self._setup.sticky[-1]
            self._setup = self._setup._replace(sticky=self._setup.sticky[:-1])
            context._close(record)

    def _close_last_loop(self, scope: tuple[str, ...]) -> None:
        """End the sticky loop ``with envoy.all():`` opened, at the end of its block."""
        sticky = self._setup.sticky
        for position in range(len(sticky) - 1, -1, -1):
            context, _ = sticky[position]
            if context.scope == scope:
                self._setup = self._setup._replace(sticky=sticky[:position] + sticky[position + 1:])
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
        context = innermost()
        if context is None or context._trace is not self:
            raise TraceError(
                f"the trace opened at {short(self._where)} is not the innermost open trace "
                "in this thread"
            )
        return context


def _holds_proxies(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether inputs hold traced values (proxies) anywhere."""
    if not kwargs and all(type(item) is torch.Tensor for item in inputs):
        return False  # the usual inputs, at a glance (this is on every trace's path)
    return find_leaf((inputs, kwargs), _is_proxy) is not NOT_FOUND


def _is_proxy(value: Any) -> bool:
    return isinstance(value, Proxy)


class Invoker:
    """One invoke of a trace.

    ``given`` is ``(inputs, kwargs)`` as written; ``inputs`` is nnsight 0.4's
    view of them once prepared by the model (`NNsight`: ``(args, kwargs)``;
    `LanguageModel`: ``((encoding,), {})``, so ``invoker.inputs[0][0]["input_ids"]``
    are the token ids), and ``batch_size`` their rows. Only the invoker sets
    its own ``index``, ``batch_size`` and ``prepared``.
    """

    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any], scan: bool = False) -> None:
        self.tracer = tracer
        concrete = not _holds_proxies(inputs, kwargs)
        if not concrete:
            if tracer._parent is None:
                recorded_calls.settle_inputs((inputs, kwargs))  # torch.rand(...) written as the input
            # Saved values of traces that already ran are plain values here.
            inputs, kwargs = settled(inputs), settled(kwargs)
            concrete = not _holds_proxies(inputs, kwargs)
        self._concrete = concrete
        self.given: tuple[tuple[Any, ...], dict[str, Any]] = (inputs, kwargs)
        self.scan = scan
        self.index: int | None = None
        self.batch_size = 0
        self.prepared: Inputs | None = None
        self._prepared: Prepared | None = None

    @property
    def inputs(self) -> Any:
        """The prepared inputs, in nnsight 0.4's shape (prepared now if they were
        not yet: inputs of a trace in a session are prepared when it runs)."""
        prepared = self._prepare()
        if prepared is None:
            return self.given  # values of the session, known only when it runs
        return self.tracer._adapter.invoker_inputs((prepared.args, prepared.kwargs))

    def _prepare(self) -> Prepared | None:
        """Prepare the given inputs (once); ``None`` when they hold values of the session."""
        if self._prepared is None:
            if not self._concrete:
                return None
            inputs, kwargs = self.given
            self._prepared = prepared = prepare(self.tracer._adapter, inputs, kwargs)
            self.batch_size = prepared.size
            self.prepared = (prepared.args, prepared.kwargs)
        return self._prepared

    def __enter__(self) -> Invoker:
        self.index = self.tracer._enter_invoke(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.tracer._exit_invoke(self, exc_type is None)
