"""One small graph per kind of node, by kind name: the fixtures of the legend
pictures (docs/make_legend.py) and of their golden tests (tests/test_vis.py).

Built directly with `Graph.add` (no model, no tracing), so they have no
source lines; the seed example's graphs cover those.
"""

from __future__ import annotations

import operator

import torch

from nnsight_pure.arguments import DictConst, Ref, SliceConst, TensorConst
from nnsight_pure.graph import Graph
from nnsight_pure.ops import (
    ApplyModule,
    Bridge,
    Cache,
    Call,
    CallMethod,
    Cond,
    EachCall,
    Export,
    GetAttr,
    Grad,
    Iterate,
    IterItem,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    Result,
    Save,
    SetAttr,
    SetGrad,
    Skip,
    Stop,
    TraceRun,
)


def _grown(*steps: tuple[Op, tuple[object, ...]]) -> Graph:
    graph = Graph()
    for op, args in steps:
        graph, _ = graph.add(op, args)
    return graph


def example_input() -> torch.Tensor:
    """The input of the `TraceRun` example's one invoke."""
    return torch.zeros(1, 5)


def legend_examples() -> dict[str, Graph]:
    """A small graph showing each kind of node, by kind name. Pure."""
    get = (ModuleGet("layer1", "output"), ())
    body = _grown((IterItem(), ()), (Bridge(0), ()), (Call(operator.add), (Ref(0), Ref(1))))
    trace_body = _grown(get, (Save(), (Ref(0),)))
    return {
        "ModuleGet": _grown(get),
        "ModuleSet": _grown(get, (Call(operator.mul), (Ref(0), 2)), (ModuleSet("layer1", "output"), (Ref(1),))),
        "Skip": _grown((ModuleGet("layer2", "input"), ()), (Skip("layer2"), (Ref(0),))),
        "Result": _grown((Result(), ()), (Save(), (Ref(0),))),
        "Cache": _grown(
            (Cache(("layer1", "layer2"), ("model.layer1", "model.layer2")), ()), (Save(), (Ref(0),))
        ),
        "ModuleAttr": _grown((ModuleAttr("layer1", "weight"), ())),
        "ApplyModule": _grown(get, (ApplyModule("layer2"), (Ref(0),))),
        "Call": _grown(get, (Call(operator.setitem), (Ref(0), (SliceConst(None, None, None), 0), 1.0))),
        "CallMethod": _grown(get, (CallMethod("sum"), (Ref(0),))),
        "GetAttr": _grown(get, (GetAttr("shape"), (Ref(0),))),
        "SetAttr": _grown(get, (SetAttr("flag"), (Ref(0), True))),
        "Save": _grown(get, (Save(), (Ref(0),))),
        "Stop": _grown(get, (Stop(), (Ref(0),))),
        "Grad": _grown(get, (Grad(), (Ref(0),)), (Save(), (Ref(1),))),
        "SetGrad": _grown(get, (Grad(), (Ref(0),)), (Call(operator.mul), (Ref(1), 2)), (SetGrad(), (Ref(0), Ref(2)))),
        "Bridge": _grown((Bridge(0), ()), (Call(operator.neg), (Ref(0),))),
        "IterItem": _grown((IterItem(), ())),
        "Export": _grown((Cond(_grown(get)), (True,)), (Export(0), (Ref(0),))),
        "Cond": _grown(get, (Cond(_grown((Bridge(0), ()), (Save(), (Ref(0),)))), (True, Ref(0)))),
        "Iterate": _grown(get, (Iterate(body), ((0, 1, 2), Ref(0)))),
        "EachCall": _grown((EachCall(trace_body, 0, None, 1, ("layer1",)), ())),
        "TraceRun": _grown((TraceRun(trace_body), ((((TensorConst(example_input()),), DictConst(())),),))),
    }
