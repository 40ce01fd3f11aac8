"""effects.py: one home for what the library knows about ops.

Its answers are pinned to those of the tables it replaced (plan.py's
in-place and view tables, passes.py's purity tables, scan.py's list of what
may run on fakes, serialize.py's whitelist), on a table of representative
ops; and, while plan.py keeps its own copy, to plan's live answers.
"""

from __future__ import annotations

import math
import operator
from typing import Any, get_args

import pytest
import torch

from nnsight_pure import effects, ops, passes
from nnsight_pure.arguments import Ref
from nnsight_pure.graph import Graph, Node
from nnsight_pure.ops import (
    ApplyModule,
    Bridge,
    Call,
    CallMethod,
    Cond,
    ContextOp,
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
    Save,
    SetAttr,
    SetGrad,
    Stop,
    TraceRun,
    print_at_run_time,
)


def square(x: Any) -> Any:
    return x * x

OPS: dict[str, tuple[Op, dict[str, Any]]] = {
    "setitem": (Call(operator.setitem), {}),
    "iadd": (Call(operator.iadd), {}),
    "add": (Call(operator.add), {}),
    "getitem": (Call(operator.getitem), {}),
    "itemgetter": (Call(operator.itemgetter), {}),
    "Tensor.add_": (Call(torch.Tensor.add_), {}),
    "Tensor.requires_grad_": (Call(torch.Tensor.requires_grad_), {}),
    "Tensor.view": (Call(torch.Tensor.view), {}),
    "Tensor.__getitem__": (Call(torch.Tensor.__getitem__), {}),
    "Tensor.__iadd__": (Call(torch.Tensor.__iadd__), {}),
    "Tensor.backward": (Call(torch.Tensor.backward), {}),
    "torch.relu": (Call(torch.relu), {}),
    "torch.relu_": (Call(torch.relu_), {}),
    "torch.rand": (Call(torch.rand), {}),
    "torch.sum out": (Call(torch.sum), {"out": Ref(0)}),
    "F.dropout": (Call(torch.nn.functional.dropout), {}),
    "F.relu": (Call(torch.nn.functional.relu), {}),
    "linalg.norm": (Call(torch.linalg.norm), {}),
    "len": (Call(len), {}),
    "sorted": (Call(sorted), {}),
    "print": (Call(print), {}),
    "print_at_run_time": (Call(print_at_run_time), {}),
    "math.sqrt": (Call(math.sqrt), {}),
    "getattr": (Call(getattr), {}),
    "square": (Call(square), {}),
    "m.add_": (CallMethod("add_"), {}),
    "m.add": (CallMethod("add"), {}),
    "m.add out": (CallMethod("add"), {"out": Ref(0)}),
    "m.sum": (CallMethod("sum"), {}),
    "m.view": (CallMethod("view"), {}),
    "m.transpose": (CallMethod("transpose"), {}),
    "m.__getitem__": (CallMethod("__getitem__"), {}),
    "m.__add__": (CallMethod("__add__"), {}),
    "m.__iadd__": (CallMethod("__iadd__"), {}),
    "m.__setitem__": (CallMethod("__setitem__"), {}),
    "m._private_": (CallMethod("_private_"), {}),
    "m.retain_grad": (CallMethod("retain_grad"), {}),
    "m.requires_grad_": (CallMethod("requires_grad_"), {}),
    "m.append": (CallMethod("append"), {}),
    "m.normal_": (CallMethod("normal_"), {}),
    "m.bernoulli": (CallMethod("bernoulli"), {}),
    "m.item": (CallMethod("item"), {}),
    "m.tolist": (CallMethod("tolist"), {}),
    "m.backward": (CallMethod("backward"), {}),
    "m.upper": (CallMethod("upper"), {}),
    "GetAttr shape": (GetAttr("shape"), {}),
    "SetAttr x": (SetAttr("x"), {}),
    "ModuleGet": (ModuleGet("layer1", "output"), {}),
    "ModuleSet": (ModuleSet("layer1", "output"), {}),
    "ModuleAttr": (ModuleAttr("layer1", "weight"), {}),
    "ApplyModule": (ApplyModule("layer1"), {}),
    "Save": (Save(), {}),
    "Stop": (Stop(), {}),
    "Grad": (Grad(), {}),
    "SetGrad": (SetGrad(), {}),
    "Bridge": (Bridge(0), {}),
    "IterItem": (IterItem(), {}),
    "Export": (Export(0), {}),
    "Cond": (Cond(Graph()), {}),
    "Iterate": (Iterate(Graph()), {}),
    "EachCall": (EachCall(Graph()), {}),
    "TraceRun": (TraceRun(Graph()), {}),
}


EXPECTED = {
    # name: (writes in place, aliases its argument, pure, safe on fakes): the
    # answers of plan.is_inplace, plan._aliases_argument, passes.is_pure and
    # scan._evaluable at main 9b95f88, before the tables moved here.
    'setitem': (True, False, False, True),
    'iadd': (True, False, False, True),
    'add': (False, False, True, True),
    'getitem': (False, True, True, True),
    'itemgetter': (False, False, False, True),
    'Tensor.add_': (True, False, False, True),
    'Tensor.requires_grad_': (False, False, False, True),
    'Tensor.view': (False, True, True, True),
    'Tensor.__getitem__': (False, True, True, True),
    'Tensor.__iadd__': (False, False, False, True),
    'Tensor.backward': (False, False, False, True),
    'torch.relu': (False, False, True, True),
    'torch.relu_': (True, False, False, True),
    'torch.rand': (False, False, False, True),
    'torch.sum out': (False, False, False, True),
    'F.dropout': (False, False, False, True),
    'F.relu': (False, False, True, True),
    'linalg.norm': (False, False, True, True),
    'len': (False, False, True, True),
    'sorted': (False, False, True, False),
    'print': (False, False, False, False),
    'print_at_run_time': (False, False, False, False),
    'math.sqrt': (False, False, True, False),
    'getattr': (False, False, False, True),
    'square': (False, False, False, False),
    'm.add_': (True, False, False, True),
    'm.add': (False, False, False, True),
    'm.add out': (False, False, False, True),
    'm.sum': (False, False, True, True),
    'm.view': (False, True, True, True),
    'm.transpose': (False, True, True, True),
    'm.__getitem__': (False, True, True, True),
    'm.__add__': (False, False, True, True),
    'm.__iadd__': (False, False, False, True),
    'm.__setitem__': (False, False, False, True),
    'm._private_': (False, False, False, True),
    'm.retain_grad': (False, False, False, False),
    'm.requires_grad_': (False, False, False, True),
    'm.append': (False, False, False, True),
    'm.normal_': (True, False, False, True),
    'm.bernoulli': (False, False, False, True),
    'm.item': (False, False, True, False),
    'm.tolist': (False, False, True, False),
    'm.backward': (False, False, False, False),
    'm.upper': (False, False, False, True),
    'GetAttr shape': (False, True, True, True),
    'SetAttr x': (True, False, False, False),
    'ModuleGet': (False, False, True, False),
    'ModuleSet': (False, False, False, False),
    'ModuleAttr': (False, False, True, True),
    'ApplyModule': (False, False, False, True),
    'Save': (False, False, False, False),
    'Stop': (False, False, False, False),
    'Grad': (False, False, True, False),
    'SetGrad': (False, False, False, False),
    'Bridge': (False, False, True, False),
    'IterItem': (False, False, True, False),
    'Export': (False, False, True, False),
    'Cond': (False, False, False, False),
    'Iterate': (False, False, False, False),
    'EachCall': (False, False, False, False),
    'TraceRun': (False, False, False, False),
}

WHITELISTED = {
    'setitem': 'operator.setitem',
    'iadd': 'operator.iadd',
    'add': 'operator.add',
    'getitem': 'operator.getitem',
    'itemgetter': 'operator.itemgetter',
    'Tensor.add_': 'torch.Tensor.add_',
    'Tensor.requires_grad_': 'torch.Tensor.requires_grad_',
    'Tensor.view': 'torch.Tensor.view',
    'Tensor.__getitem__': 'torch.Tensor.__getitem__',
    'Tensor.__iadd__': 'torch.Tensor.__iadd__',
    'Tensor.backward': 'torch.Tensor.backward',
    'torch.relu': 'torch.relu',
    'torch.relu_': 'torch.relu_',
    'torch.rand': 'torch.rand',
    'torch.sum out': 'torch.sum',
    'F.dropout': 'torch.nn.functional.dropout',
    'F.relu': 'torch.nn.functional.relu',
    'linalg.norm': 'torch.linalg.norm',
    'len': 'builtins.len',
    'sorted': 'builtins.sorted',
    'print': 'builtins.print',
    'print_at_run_time': 'nnsight_pure.print',
    'math.sqrt': 'math.sqrt',
    'getattr': None,
    'square': None,
}



def node_of(op: Op, kwargs: dict[str, Any]) -> Node:
    graph, ref = Graph().add(ModuleGet("layer1", "output"))
    graph, _ = graph.add(op, (ref,), kwargs)
    return graph.nodes[1]


@pytest.mark.parametrize("name", sorted(OPS))
def test_effects_answer_as_the_tables_they_replaced(name: str) -> None:
    op, kwargs = OPS[name]
    node = node_of(op, kwargs)
    found = (effects.writes_in_place(node), effects.aliases_argument(node), effects.is_pure(node),
             effects.safe_on_fakes(op))
    assert found == EXPECTED[name]
    assert passes.is_pure(node) is found[2]  # passes asks effects


@pytest.mark.parametrize("name", sorted(WHITELISTED))
def test_whitelisted_names(name: str) -> None:
    op, _ = OPS[name]
    assert isinstance(op, Call)
    assert effects.whitelisted_name(op.fn) == WHITELISTED[name]
    qualified = WHITELISTED[name]
    if qualified is not None:
        assert effects.resolve_whitelisted(qualified) is op.fn


def test_kinds_of_ops() -> None:
    assert frozenset(ops.CONTEXT_OPS) == frozenset(get_args(ContextOp))
    assert ops.TRACE_OPS == (
        ModuleGet, ModuleSet, ops.Skip, ops.Result, ops.Cache, ModuleAttr, ApplyModule, Grad, SetGrad, EachCall
    )
    assert ops.PLAIN_OPS == frozenset(
        {ModuleGet, ModuleSet, ops.Skip, ops.Result, ops.Cache, ModuleAttr, ApplyModule, CallMethod, GetAttr,
         SetAttr, Save, Stop, Grad, SetGrad, Bridge, IterItem, Export}
    )
    every = frozenset(get_args(Op))
    assert ops.PLAIN_OPS | frozenset(ops.CONTEXT_OPS) | {Call} == every
    assert effects.PURE_BUILTINS == frozenset(
        {abs, all, any, bool, dict, divmod, enumerate, float, int, isinstance, len, list, max, min,
         pow, range, reversed, round, set, slice, sorted, str, sum, tuple, zip}
    )


def test_passes_does_not_import_serialize() -> None:
    import ast
    import pathlib

    import nnsight_pure

    root = pathlib.Path(nnsight_pure.__file__).parent
    for name in ("passes.py", "effects.py", "graph.py", "keys.py", "source.py", "printing.py"):
        tree = ast.parse((root / name).read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "serialize" not in imported, name
    assert operator.add in effects.PURE_OPERATORS
    assert torch.Tensor.add_ not in effects.PURE_OPERATORS
