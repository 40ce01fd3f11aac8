"""What a run leaves behind: the saved values, and why anything else is missing.

Pure value; the interpreter makes one per run and the shell reads it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import attrs

from .arguments import DictConst, ListConst, thaw
from .events import ProgramKey
from .graph import Graph
from .ops import Grad, SetGrad
from .plan import plan_for
from .printing import format_node, invoke_label
from .source import short


@attrs.frozen(eq=False)
class Results:
    """The outcome of running a graph once.

    ``values`` maps node indexes to the saved values that the run produced;
    ``stopped`` says whether an early stop ended the run; ``blocked`` maps
    each invoke whose program did not finish to ``(step, waited)``: the node
    it stopped at and the node it was waiting for (a module access, or a
    node of another invoke). ``children`` holds, per context node (a
    condition, a loop, a trace of a session), the results of the last run of
    its body. ``returned`` is the method's own result, kept only on request
    (``trace=False``, or ``run(..., keep_result=True)``).

    ``graph`` is the graph that ran, when the run came from `nnsight_pure.run`:
    then `outputs` (and ``results[key]``) give the graph's outputs in the
    structure its function returned them.
    """

    values: Mapping[int, Any]
    stopped: bool = False
    blocked: Mapping[ProgramKey, tuple[int, int]] = attrs.field(factory=dict)
    children: Mapping[int, Results] = attrs.field(factory=dict)
    returned: Any = None  # what the model's method returned, when asked for
    graph: Graph | None = None  # the graph that ran (set by nnsight_pure.run)

    def has(self, index: int) -> bool:
        return index in self.values

    def get(self, index: int) -> Any:
        return self.values[index]

    @property
    def outputs(self) -> Any:
        """The graph's outputs, in the structure they were returned in
        (`ValueError`, saying why, if one of them has no value)."""
        return thaw(self._output_tree(), cast(Sequence[object], _Lookup(self)))

    def __getitem__(self, key: Any) -> Any:
        """One entry of the outputs: ``results["logits"]`` for a dict,
        ``results[0]`` for a tuple or list. Only that entry must have a value."""
        tree = self._output_tree()
        if type(tree) is DictConst:
            for name, item in tree.items:
                if name == key:
                    return thaw(item, cast(Sequence[object], _Lookup(self)))
            names = [name for name, _ in tree.items]
            raise KeyError(f"no output named {key!r}; the outputs are {names!r}")
        if isinstance(tree, (tuple, ListConst)):
            items = tree.items if isinstance(tree, ListConst) else tree
            return thaw(items[key], cast(Sequence[object], _Lookup(self)))
        raise TypeError("the graph's outputs are a single value, not a dict or a sequence: use .outputs")

    def _output_tree(self) -> object:
        if self.graph is None or self.graph.outputs is None:
            raise ValueError(
                "these results have no outputs: only a graph built with nnsight_pure.trace(model, fn) "
                "(fn returning what to output) and run with nnsight_pure.run has them"
            )
        return self.graph.outputs


class _Lookup:
    """The values of a run by node index, explaining any that is missing."""

    def __init__(self, results: Results) -> None:
        self._results = results

    def __getitem__(self, index: int) -> Any:
        results = self._results
        if index in results.values:
            return results.values[index]
        assert results.graph is not None
        raise ValueError("output " + missing_value_message(results.graph, index, results, saved=True))


def missing_value_message(graph: Graph, index: int, results: Results | None, saved: bool) -> str:
    """Why node ``index`` has no value after its trace: not saved, stopped, or never reached."""
    node = graph.nodes[index]
    what = f"`{format_node(node)}` (made at {short(node.source)})"
    if not saved:
        return (
            f"{what} has no value: it was not saved. Only saved values outlive the "
            "trace: call .save() on it inside the trace."
        )
    if results is None:
        return f"{what} has no value: its trace never ran (it raised or is still open)."
    if results.stopped:
        return f"{what} has no value: the run was stopped early, before it was computed."
    blocked = results.blocked.get(plan_for(graph).program_of[index])
    if blocked is not None:
        at, waited = blocked
        blocker = graph.nodes[waited]
        if at != waited:
            why = f"that node of {invoke_label(blocker.invoke)} never ran"
        elif isinstance(blocker.op, (Grad, SetGrad)):
            why = "no backward pass reached that value after its .grad was read"
        else:
            why = "that module was not called (that many times) in this run"
        return (
            f"{what} has no value: it was never reached. Its program was still waiting for "
            f"`{format_node(blocker)}` (made at {short(blocker.source)}) when the model "
            f"returned: {why}."
        )
    return f"{what} has no value: it was never computed in this run."  # pragma: no cover
