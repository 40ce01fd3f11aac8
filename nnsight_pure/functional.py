"""Graphs as data: build a graph without running (`trace`), run it on any
inputs (`run`), and make a model that runs it first (`edit`).

``with model.trace(x): body`` is sugar for ``run(model, trace(model, body), x)``:
both record with the same tracer and run through the same
`runner.run_invokes`. A graph is a value, so the one built here can be
replayed over a dataset (planned once: the plan cache is keyed on the graph),
compared, hashed, written to JSON and composed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, TypeVar, overload

import attrs
import torch

from . import open_blocks as active
from .contexts.tracer import Tracer
from .errors import TraceError
from .events import operation_of
from .findings import Findings, raise_first
from .graph import Graph, Node
from .hooks import submodule
from .interpreter import run_session
from .memo import PerGraph
from .models.nnsight import NNsight
from .ops import Call
from .passes import as_edit, check_standalone, compose, graph_kind, invoke_count, module_paths
from .printing import format_node
from .program_check import Invokes, check_invokes
from .results import Results
from .runner import run_invokes, session_runner
from .source import add_note, describe, short, user_location

F = TypeVar("F", bound=Callable[..., Any])


def as_wrapper(model: NNsight | torch.nn.Module) -> NNsight:
    """``model`` as an `NNsight` wrapper (a plain torch module gets a new one)."""
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
    wrapper = as_wrapper(model)
    scanning = bool(example_inputs)
    tracer = Tracer(
        wrapper._adapter(), _method(wrapper, method), kwargs, user_location(), None, scan=scanning,
        validate=scanning, edits=wrapper.edits, inputs=(example_inputs, {}), never_runs=_BUILDS_ONLY,
    )
    with tracer:
        graph = tracer._outputs(fn(wrapper))  # (values made in `.all()` blocks are exported from them)
    return graph


_BUILDS_ONLY = (
    "nnsight_pure.trace(...) only builds a graph; run it with nnsight_pure.run(model, graph, "
    "inputs) and read the results' outputs"
)


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
    validate: bool = False,
    **kwargs: Any,
) -> Results:
    """Run ``graph`` on new inputs: one model run, no tracing.

    Positional ``inputs`` are the inputs of a graph's single invoke; a graph
    of several invokes takes ``invokes=[(args, kwargs), ...]`` instead (one
    per invoke; ``None`` for an invoke without inputs). ``kwargs`` go to
    the model's method (``method="generate"`` to generate). A session's
    graph takes no inputs (its traces hold theirs). ``keep_result`` keeps
    what the method returned in ``results.returned``. ``validate=True``
    first checks the whole program against the model's calls on fake
    tensors (`check`) and raises the first finding before the model runs
    (for a graph read from a document, say).

    The graph runs exactly as given: a model's edits are not added (a graph
    traced on an edited model already starts with them). Returns `Results`:
    ``results.outputs`` (or ``results["name"]``) in the structure the
    traced function returned them, and ``results.values``, every saved value
    by node index.
    """
    wrapper = as_wrapper(model)
    facts = graph_facts(graph)
    if facts.kind == "session":
        if inputs or invokes is not None or kwargs:
            raise TypeError("a session's graph takes no inputs: each of its traces holds its own")
        return run_session(graph, session_runner(wrapper._adapter()))
    _check_modules(facts.paths, wrapper._model)
    given = _invokes_given(facts.invokes, inputs, invokes)
    if not any(invoke is not None for invoke in given):
        raise ValueError("run needs inputs for the model: none were given")
    adapter, traced = wrapper._adapter(), _method(wrapper, method)
    if validate:
        raise_first(check_invokes(adapter, graph, traced, given, kwargs))
    try:
        results, _ = run_invokes(adapter, graph, given, method=traced, kwargs=kwargs, keep_result=keep_result)
    except BaseException as error:
        # Where run was called is found only now: it costs a stack walk on every run.
        add_note(
            error,
            "nnsight_pure: raised by the model while running the graph given to nnsight_pure.run at\n  "
            + describe(user_location()),
        )
        raise
    return results


def check(
    model: NNsight | torch.nn.Module,
    graph: Graph,
    *inputs: Any,
    invokes: Invokes | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> Findings:
    """Check the whole program ``graph`` against the calls ``model`` makes on
    these inputs, without running the model (program_check.py): writes to
    calls already passed, modules and calls the method never makes, loops
    past the calls or touching none, ``.grad`` with no ``backward()`` after
    it, values another invoke computes too late, shape errors.

    The arguments are `run`'s: positional ``inputs`` for a graph of one
    invoke, or ``invokes=[(args, kwargs), ...]``; ``method="generate"`` and
    its keywords (``max_new_tokens=3``) as the real run gets them. Returns
    the `Findings`, in program order (empty when nothing is wrong).
    """
    wrapper = as_wrapper(model)
    if graph_kind(graph) == "session":
        raise TypeError("check takes a trace's graph; check each trace of a session with its own inputs")
    check_standalone(graph, "check")
    given = _invokes_given(invoke_count(graph), inputs, invokes)
    adapter = wrapper._adapter()
    return check_invokes(adapter, graph, _method(wrapper, method), given, kwargs, shown=method or "forward")


def _invokes_given(
    needed: int, inputs: tuple[Any, ...], invokes: Invokes | None
) -> list[tuple[tuple[Any, ...], dict[str, Any]] | None]:
    """Each invoke's inputs, as `run` and `check` take them: positional
    ``inputs`` for a graph of one invoke, or ``invokes=[(args, kwargs), ...]``
    (``None`` for an invoke without inputs), at least one per invoke."""
    if invokes is None:
        if needed > 1:
            raise TypeError(
                f"this graph has {needed} invokes: give each its inputs with "
                "invokes=[(args, kwargs), ...] instead of positional inputs"
            )
        return [(tuple(inputs), {})] if inputs else [None] * max(needed, 1)
    if inputs:
        raise TypeError("give the inputs either positionally (one invoke) or as invokes=[...], not both")
    if len(invokes) < needed:
        raise TypeError(f"this graph has {needed} invokes but invokes= gives inputs for {len(invokes)}")
    return list(invokes)


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


graph_facts = PerGraph(_find_facts)
"""The graph's facts, worked out once per graph object (replays skip the walk)."""


def _check_modules(paths: Mapping[str, Node], root: torch.nn.Module) -> None:
    """Refuse, before anything runs, a graph naming a module ``root`` lacks
    (a graph traced on another model, or read from a file)."""
    for path, node in paths.items():
        site = operation_of(path)  # an operation site (envoy.source) names its module
        try:
            submodule(root, path if site is None else site[0])
        except AttributeError:
            raise TraceError(
                f"`{format_node(node)}` (made at {short(node.source)}) names the module {path!r}, "
                f"which this {type(root).__name__} does not have: was the graph traced on another model?"
            ) from None


def edit(model: NNsight | torch.nn.Module, graph: Graph, *, inplace: bool = False) -> NNsight:
    """A model whose every later trace runs ``graph`` first: ``model.edit()``
    with a graph value. The edits are ``compose(model.edits, graph)``, made
    to apply to every row; ``inplace=True`` edits ``model`` itself."""
    wrapper = as_wrapper(model)
    target = wrapper if inplace else wrapper._shallow_copy()
    edits = as_edit(graph) if wrapper.edits is None else compose(wrapper.edits, as_edit(graph))
    target._store_edits(edits)
    return target
