"""Tracer: ``with model.trace(...)``. Records a graph, then runs it once on exit.

The tracer owns the current graph (the only mutable cell of a trace), the
invokes' prepared inputs, and which invoke is open. On exit without error it
batches the invokes and hands the graph to the interpreter; the `Results`
then answer its proxies' ``.value``.
"""

from __future__ import annotations

from contextvars import Token
from typing import TYPE_CHECKING, Any

from ..batching import BatchGroups
from ..errors import TraceError
from ..graph import SourceLoc
from ..interpreter import run_graph
from ..ops import AccessKind, ModuleGet, ModuleSet, Stop
from ..proxy import Proxy
from ..source import short
from . import active
from .base import GraphContext
from .invoker import Invoker

if TYPE_CHECKING:
    from ..models.nnsight import NNsight


class Tracer(GraphContext):
    """The context returned by `NNsight.trace`: record interventions, run on exit."""

    def __init__(
        self,
        model: NNsight,
        method: str | None,
        method_kwargs: dict[str, Any],
        where: SourceLoc | None,
    ) -> None:
        super().__init__(model._handle, where)
        self._model = model
        self._method = method
        self._method_kwargs = method_kwargs
        self._prepared: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._sizes: list[int | None] = []  # per invoke: its rows, or None (no inputs)
        self._invoker: Invoker | None = None
        self._implicit: Invoker | None = None
        self._accesses: dict[tuple[str, AccessKind, int | None], Proxy] = {}
        self._token: Token[tuple[GraphContext, ...]] | None = None

    # --- the context protocol ---------------------------------------------------------

    def __enter__(self) -> Tracer:
        if self._open or self._closed:
            raise TraceError(f"the trace opened at {short(self._where)} cannot be entered twice")
        self._token = active.push(self)
        self._open = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._open = False
        if self._token is not None:
            active.pop(self._token)
            self._token = None
        if self._implicit is not None and self._invoker is self._implicit:
            self._implicit.__exit__(None, None, None)
        # Recording is over: drop what points back at this tracer (proxies in
        # the access cache, invokers), so that no reference cycle keeps saved
        # values alive after the user drops their proxies.
        self._accesses.clear()
        self._implicit = self._invoker = None
        try:
            if exc_type is None:
                self._run()
        finally:
            self._closed = True
            self._prepared.clear()

    def _run(self) -> None:
        model = self._model
        batched: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        for args, kwargs in self._prepared:
            batched = model._batch(batched, *args, **kwargs)
        args, kwargs = batched if batched is not None else ((), {})
        clash = sorted(set(kwargs) & set(self._method_kwargs))
        if clash:
            raise TypeError(
                f"keyword argument(s) {clash} were given both to the invokes and to trace(...); "
                "give each once"
            )
        kwargs = {**kwargs, **self._method_kwargs}
        self._results = run_graph(
            self._graph,
            model._model,
            model.interleave,
            model._method_fn(self._method),
            args,
            kwargs,
            BatchGroups.from_sizes(self._sizes),
            self._where,
        )

    # --- invokes ----------------------------------------------------------------------

    def invoke(self, *inputs: Any, **kwargs: Any) -> Invoker:
        """A context whose accesses see only the rows of ``inputs`` in the batch."""
        return Invoker(self, inputs, kwargs)

    def _enter_invoke(self, invoker: Invoker) -> int | None:
        if self._invoker is not None:
            raise TraceError(
                "an invoke is already open in this trace"
                + (" (model.trace(inputs) opens one for its inputs; use model.trace() "
                   "with no inputs to invoke several times)" if self._invoker is self._implicit else "")
            )
        if self._closed:
            raise TraceError(f"the trace opened at {short(self._where)} has closed")
        if not invoker.inputs and not invoker.kwargs:
            self._sizes.append(None)  # an invoke without inputs sees the whole batch
        else:
            (args, kwargs), size = self._model._prepare_input(*invoker.inputs, **invoker.kwargs)
            self._prepared.append((tuple(args), dict(kwargs)))
            self._sizes.append(size)
            invoker.batch_size = size
            invoker.prepared = (tuple(args), dict(kwargs))
        self._invoker = invoker
        self._invoke = len(self._sizes) - 1
        return self._invoke

    def _exit_invoke(self, invoker: Invoker) -> None:
        if self._invoker is invoker:
            self._invoker = None
            self._invoke = None

    def _open_implicit_invoker(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._implicit = Invoker(self, inputs, kwargs)
        self._implicit.__enter__()

    # --- module accesses (called by envoys) ------------------------------------------

    def _access(self, path: str, kind: AccessKind) -> Proxy:
        """The proxy for a module value in the current invoke (one node per value)."""
        key = (path, kind, self._invoke)
        proxy = self._accesses.get(key)
        if proxy is None:
            proxy = self._current().record(ModuleGet(path, kind, 0))
            self._accesses[key] = proxy
        return proxy

    def _write_access(self, path: str, kind: AccessKind, value: Any) -> None:
        """Replace a module value in the current invoke."""
        self._current().record(ModuleSet(path, kind, 0), (value,))
        # Later reads of this module, in any invoke, must be new nodes that run
        # after the write and see its value: forget the cached accesses.
        for key in [key for key in self._accesses if key[0] == path]:
            del self._accesses[key]

    def _current(self) -> GraphContext:
        context = active.innermost()
        if context is not self:
            raise TraceError(
                f"the trace opened at {short(self._where)} is not the innermost open trace "
                "in this thread"
            )
        return self

    # --- tracer methods ---------------------------------------------------------------

    def stop(self) -> None:
        """End the run when execution reaches this point (early stop)."""
        self._current().record(Stop())
