"""GraphContext: the one mutable cell of the shell, holding the current graph.

Every context (a trace now; sessions, conditions and loops later) owns a
`Graph` value. Recording an operation replaces that value with a new graph
one node longer; the old value is untouched. Once the context has run, it
also holds the run's `Results`, which its proxies read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..arguments import Ref, freeze
from ..errors import TraceError
from ..graph import Graph, SourceLoc, saved_refs
from ..ops import Op
from ..printing import format_node
from ..proxy import Proxy
from ..results import Results, missing_value_message
from ..source import short, user_location

if TYPE_CHECKING:
    from ..models.handle import ModelHandle


class GraphContext:
    """A `with` block that records operations into its own graph value."""

    def __init__(self, handle: ModelHandle, where: SourceLoc | None) -> None:
        self._graph = Graph()
        self._handle = handle
        self._where = where
        self._open = False
        self._closed = False
        self._results: Results | None = None
        self._invoke: int | None = None  # the invoke new nodes belong to

    @property
    def graph(self) -> Graph:
        """The graph recorded so far (an immutable value; later records do not change it)."""
        return self._graph

    @property
    def closed(self) -> bool:
        """True once the block has exited (whether or not it ran)."""
        return self._closed

    @property
    def handle(self) -> ModelHandle:
        """The model this context traces."""
        return self._handle

    # --- recording --------------------------------------------------------------------

    def record(self, op: Op, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Proxy:
        """Append ``op`` applied to ``args``/``kwargs`` and return a proxy of its value."""
        if not self._open:
            raise TraceError(f"the trace opened at {short(self._where)} is not open")
        frozen_args = tuple(freeze(arg, Proxy, self._argument) for arg in args)
        frozen_kwargs = {name: freeze(value, Proxy, self._argument) for name, value in kwargs.items()} if kwargs else None
        self._graph, ref = self._graph.add(op, frozen_args, frozen_kwargs, user_location(), self._invoke)
        return Proxy(self, ref)

    def _argument(self, proxy: Proxy) -> object:
        """What a proxy becomes as an argument of this context's next node."""
        if proxy._pending is not None:
            return proxy._materialize(self)
        owner = proxy._context
        assert proxy._ref is not None
        if owner is self:
            return proxy._ref
        if owner.closed and owner.has_value(proxy._ref):
            # A finished value (saved by an earlier trace) is just a constant here.
            return freeze(owner.value_of(proxy._ref), Proxy, self._argument)
        node = owner.graph.nodes[proxy._ref.index]
        if owner.closed:
            raise TraceError(
                f"`{format_node(node)}` (made at {short(node.source)}) belongs to a trace that "
                "has already closed, and it has no value there: save it in its own trace "
                "(.save()) to use it afterwards."
            )
        raise TraceError(
            f"`{format_node(node)}` (made at {short(node.source)}) belongs to another open trace "
            f"(opened at {short(owner._where)}); a value cannot be used across traces or models "
            "until its trace has run and saved it."
        )

    # --- results ----------------------------------------------------------------------

    def has_value(self, ref: Ref) -> bool:
        return self._results is not None and self._results.has(ref.index)

    def value_of(self, ref: Ref) -> Any:
        """The value of a node after the run, or a `ValueError` saying why there is none."""
        if not self._closed:
            node = self._graph.nodes[ref.index]
            raise ValueError(
                f"`{format_node(node)}` (made at {short(node.source)}) has no value yet: the "
                "trace has not run. Values exist after the `with` block exits (if saved)."
            )
        if self._results is not None and self._results.has(ref.index):
            return self._results.get(ref.index)
        saved = ref.index in saved_refs(self._graph)
        raise ValueError(missing_value_message(self._graph, ref.index, self._results, saved))
