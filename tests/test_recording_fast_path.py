"""The recording fast path (`GraphContext.record`) and the general one
(`_record`) make the same nodes: the first trace of a line takes the general
path (it fills the tables), later ones the fast path; their graphs must be
equal, share their nodes, keep constants exact and name the right lines."""

from __future__ import annotations

import gc
import math
import operator
from typing import Any

import torch

import nnsight_pure as nnsight
from nnsight_pure.ops import Call


def _model() -> nnsight.NNsight:
    torch.manual_seed(0)
    return nnsight.NNsight(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))


def _record(model: nnsight.NNsight, x: torch.Tensor) -> tuple[Any, list[Any]]:
    with model.trace(x) as tracer:
        h: Any = model[0].output
        saved = [
            (h * 2.0).save(), (h * 2).save(), (h * -0.0).save(), (h * 0.0).save(), (h * True).save(),
            (h + h).save(), nnsight.save(torch.relu(h)), (h * 1.0001 - 3).save(),
        ]
    return tracer.graph, saved


def test_the_fast_path_makes_the_general_paths_nodes() -> None:
    model = _model()
    x = torch.rand(2, 3)
    first, first_values = _record(model, x)  # general path: the lines are new
    second, second_values = _record(model, x)  # fast path
    assert first == second and hash(first) == hash(second)
    assert all(a is b for a, b in zip(first.nodes, second.nodes))  # shared, not merely equal
    wrapped: Any = model._model
    h = wrapped[0](x)
    expected = [h * 2.0, h * 2, h * -0.0, h * 0.0, h * True, h + h, torch.relu(h), h * 1.0001 - 3]
    for values in (first_values, second_values):
        for got, want in zip(values, expected):
            assert torch.equal(got.value, want)
    # Constants stay exact: 2.0 and 2, -0.0 and 0.0, True and 1 are different nodes.
    constants = [node.args[1] for node in second.nodes if node.op == Call(operator.mul)]
    assert [type(c) for c in constants[:5]] == [float, int, float, float, bool]
    assert math.copysign(1.0, constants[2]) == -1.0 and math.copysign(1.0, constants[3]) == 1.0


def test_lines_are_right_after_code_objects_are_freed() -> None:
    """The tables of user lines are keyed by the code object's id; a freed
    code object's id reused by new code must not give the old lines."""
    model = _model()
    x = torch.rand(1, 3)
    for round_ in range(20):
        padding = "\n" * round_
        source = (
            f"def record(model, x):{padding}\n    with model.trace(x) as tracer:\n"
            "        y = (model[0].output * 3).save()\n    return tracer.graph\n"
        )
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<round {round_}>", "exec"), namespace)
        for _ in range(2):  # the second run takes the fast path
            graph = namespace["record"](model, x)
            mul = next(node for node in graph.nodes if node.op == Call(operator.mul))
            assert mul.source is not None
            assert (mul.source.filename, mul.source.lineno) == (f"<round {round_}>", 3 + round_)
        del namespace
        gc.collect()
