"""Graphs as data: build a graph without running (`trace`), run it on any
inputs (`run`), and make a model that runs it first (`edit`).

``with model.trace(x): body`` is sugar for ``run(model, trace(model, body), x)``:
both record with the same tracer and run through the same
``NNsight._run_invokes``. A graph is a value, so the one built here can be
replayed over a dataset (planned once: the plan cache is keyed on the graph),
compared, hashed, written to JSON and composed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence, TypeVar, overload

import attrs
import torch

from .arguments import freeze
from .contexts import active
from .contexts.tracer import Tracer
from .errors import TraceError
from .graph import Graph, Node
from .hooks import submodule
from .interpreter import run_session
from .memo import PerGraph
from .models.nnsight import NNsight
from .ops import Call
from .passes import as_edit, check_standalone, compose, graph_kind, invoke_count, module_paths
from .printing import format_node
from .proxy import Proxy
from .results import Results
from .source import add_note, describe, short, user_location

F = TypeVar("F", bound=Callable[..., Any])
Invokes = Sequence["tuple[tuple[Any, ...], dict[str, Any]] | None"]


def _wrapper(model: NNsight | torch.nn.Module) -> NNsight:
    if isinstance(model, NNsight):
        return model
    if isinstance(model, torch.nn.Module):
        return NNsight(model)
    raise TypeError(f"expected an NNsight model or a torch.nn.Module, got {type(model).__name__}")


def _method(model: NNsight, method: str | None) -> str | None:
    """A public method name (``"generate"``) as the wrapper method it traces."""
    return None if method is None else type(model).__methods__.get(method, method)


@overload
def trace(model: F) -> F: ...
@overload
def trace(
    model: NNsight | torch.nn.Module,
    fn: Callable[[Any], Any],
    *example_inputs: Any,
    method: str | None = None,
    **kwargs: Any,
) -> Graph: ...
def trace(model: Any, fn: Any = None, *example_inputs: Any, method: str | None = None, **kwargs: Any) -> Any:
    """Build the graph of ``fn(model)`` without running the model.

    ``fn`` is called once with the model wrapper, inside a trace of one
    invoke, and returns what the graph outputs: a proxy, or any nesting of
    dicts, lists and tuples of proxies (and constants). Inputs are not part
    of the graph; give them to `run`. With ``example_inputs`` the model is
    scanned on fake tensors first, so ``fn`` can read ``.shape`` and shape
    errors surface here, at their line (``kwargs`` then go to that scan).
    A wrapper with edits starts the graph with them, as ``model.trace`` does.

    ``trace(fn)`` with a single plain function is nnsight 0.4's decorator:
    calls of the returned function inside a trace become one node (like
    ``nnsight.apply(fn, ...)``), and outside a trace it is just ``fn``.
    """
    if fn is None and not isinstance(model, (NNsight, torch.nn.Module)):
        if not callable(model):
            raise TypeError("nnsight_pure.trace takes (model, fn, *example_inputs), or a function to decorate")
        return _traced_function(model)
    if not callable(fn):
        raise TypeError("nnsight_pure.trace(model, fn, ...) needs fn: a function of the model")
    wrapper = _wrapper(model)
    scanning = bool(example_inputs)
    tracer = Tracer(
        wrapper, _method(wrapper, method), kwargs, user_location(), None, scan=scanning, validate=scanning
    )
    tracer._runs = False
    tracer._why_no_run = (
        "nnsight_pure.trace(...) only builds a graph; run it with nnsight_pure.run(model, graph, "
        "inputs) and read the results' outputs"
    )
    with tracer:
        tracer._open_implicit_invoker(example_inputs, {})
        returned = fn(wrapper)
        tracer._close_sticky(True)  # values made in `.all()` blocks are exported from them
        outputs = freeze(returned, Proxy, tracer._argument)
    return tracer.graph.with_outputs(outputs)


def _traced_function(fn: F) -> F:
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        context = active.innermost()
        if context is None:
            return fn(*args, **kwargs)
        return context.record(Call(fn), args, kwargs)

    return traced  # type: ignore[return-value]  # same signature, recorded inside traces


def run(
    model: NNsight | torch.nn.Module,
    graph: Graph,
    *inputs: Any,
    invokes: Invokes | None = None,
    method: str | None = None,
    keep_result: bool = False,
    **kwargs: Any,
) -> Results:
    """Run ``graph`` on new inputs: one model run, no tracing.

    Positional ``inputs`` are the inputs of a graph's single invoke; a graph
    of several invokes takes ``invokes=[(args, kwargs), ...]`` instead (one
    per invoke; ``None`` for an invoke without inputs). ``kwargs`` go to
    the model's method (``method="generate"`` to generate). A session's
    graph takes no inputs (its traces hold theirs). ``keep_result`` keeps
    what the method returned in ``results.returned``.

    The graph runs exactly as given: a model's edits are not added (a graph
    traced on an edited model already starts with them). Returns `Results`:
    ``results.outputs`` (or ``results["name"]``) in the structure the
    traced function returned them, and ``results.values``, every saved value
    by node index.
    """
    wrapper = _wrapper(model)
    facts = _facts(graph)
    if facts.kind == "session":
        if inputs or invokes is not None or kwargs:
            raise TypeError("a session's graph takes no inputs: each of its traces holds its own")
        return run_session(graph, wrapper._run_trace_node)
    _check_modules(facts.paths, wrapper._model)
    needed = facts.invokes
    if invokes is None:
        if needed > 1:
            raise TypeError(
                f"this graph has {needed} invokes: give each its inputs with "
                "invokes=[(args, kwargs), ...] instead of positional inputs"
            )
        invokes = [(tuple(inputs), {})] if inputs else [None] * needed
    elif inputs:
        raise TypeError("give the inputs either positionally (one invoke) or as invokes=[...], not both")
    elif len(invokes) < needed:
        raise TypeError(f"this graph has {needed} invokes but invokes= gives inputs for {len(invokes)}")
    if not any(invoke is not None for invoke in invokes):
        raise ValueError("run needs inputs for the model: none were given")
    try:
        results, _ = wrapper._run_invokes(graph, _method(wrapper, method), list(invokes), kwargs, None, keep_result=keep_result)
    except BaseException as error:
        # Where run was called is found only now: it costs a stack walk on every run.
        add_note(error, f"nnsight_pure: raised by the model while running the graph given to nnsight_pure.run at\n  {describe(user_location())}")
        raise
    return results


@attrs.frozen
class _Facts:
    """What `run` checks of a graph before running it (pure facts of the value)."""

    kind: str | None
    invokes: int
    paths: Mapping[str, Node]  # each module path named, with the first node naming it


def _find_facts(graph: Graph) -> _Facts:
    check_standalone(graph, "run")
    paths: dict[str, Node] = {}
    for path, node in module_paths(graph):
        paths.setdefault(path, node)
    return _Facts(graph_kind(graph), invoke_count(graph), paths)


_facts = PerGraph(_find_facts)
"""The graph's facts, worked out once per graph object (replays skip the walk)."""


def _check_modules(paths: Mapping[str, Node], root: torch.nn.Module) -> None:
    """Refuse, before anything runs, a graph naming a module ``root`` lacks
    (a graph traced on another model, or read from a file)."""
    for path, node in paths.items():
        try:
            submodule(root, path)
        except AttributeError:
            raise TraceError(
                f"`{format_node(node)}` (made at {short(node.source)}) names the module {path!r}, "
                f"which this {type(root).__name__} does not have: was the graph traced on another model?"
            ) from None


def edit(model: NNsight | torch.nn.Module, graph: Graph, *, inplace: bool = False) -> NNsight:
    """A model whose every later trace runs ``graph`` first: ``model.edit()``
    with a graph value. The edits are ``compose(model.edits, graph)``, made
    to apply to every row; ``inplace=True`` edits ``model`` itself."""
    wrapper = _wrapper(model)
    target = wrapper if inplace else wrapper._shallow_copy()
    edits = as_edit(graph) if wrapper.edits is None else compose(wrapper.edits, as_edit(graph))
    object.__setattr__(target, "_edits", edits)
    return target


graph_facts = _facts
as_wrapper = _wrapper
