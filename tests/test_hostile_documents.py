"""Documents written by an attacker: what a loaded graph can and cannot do.

* The two routes of issue 16 that wrote a file (``handle_torch_function``
  calling ``storage.from_file``; ``SetAttr`` on ``torch.nn.functional.Tensor``)
  are refused, and a hypothesis search over attribute and method chains
  from run values creates no file and leaves ``torch.Tensor`` as it was.
* A loaded graph runs under the guard (no callable, module or storage
  value; no attribute set on a callable), also after pickling; the same
  graph traced in code runs as before.
* ``from_json`` raises nothing but `SerializationError`, for malformed
  numbers, devices, versions, nesting, and mutations of real documents.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import pickle
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_pure as nnsight
from nnsight_pure.guard import checked_target
from nnsight_pure.serialize import SerializationError
from tests.helpers import tiny_net


def _document(*nodes: dict[str, Any]) -> str:
    return json.dumps({"format": "nnsight_pure.graph", "version": 1, "graph": {"nodes": list(nodes), "outputs": None}})


def _node(op: dict[str, Any], *args: Any) -> dict[str, Any]:
    return {"op": op, "args": list(args), "invoke": 0}


_OUTPUT = _node({"type": "ModuleGet", "path": "layer1", "kind": "output", "call": 0})


def _tensor_attributes() -> dict[str, int]:
    return {name: id(value) for name, value in vars(torch.Tensor).items()}


@pytest.fixture
def cwd(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def _run_document(text: str) -> None:
    """Load and run ``text`` on a tiny net; whatever it raises is swallowed
    (the tests look at what it did)."""
    try:
        graph = nnsight.from_json(text)
    except SerializationError:
        return
    try:
        nnsight.run(nnsight.NNsight(tiny_net()), graph, torch.rand(1, 5))
    except Exception:
        pass


def test_handle_torch_function_route_is_refused_at_load(cwd: pathlib.Path) -> None:
    text = _document(
        _OUTPUT,
        _node({"type": "CallMethod", "name": "untyped_storage"}, {"ref": 0}),
        _node({"type": "GetAttr", "name": "from_file"}, {"ref": 1}),
        _node(
            {"type": "Call", "fn": "torch.nn.functional.handle_torch_function"},
            {"ref": 2}, {"tuple": [{"ref": 0}]}, "x.bin", True, 16,
        ),
    )
    with pytest.raises(SerializationError, match="untyped_storage"):
        nnsight.from_json(text)
    _run_document(text)
    # The function that calls what it is handed is off the list by itself.
    other = text.replace('"untyped_storage"', '"clone"')
    with pytest.raises(SerializationError, match="handle_torch_function"):
        nnsight.from_json(other)
    _run_document(other)
    assert list(cwd.iterdir()) == []


def test_storage_and_callables_reached_by_attribute_are_refused_at_run_time(cwd: pathlib.Path) -> None:
    # `.untyped_storage()` is off the method list; `.data` is fine, its
    # `.new_empty` (a bound method) is a callable reached by attribute.
    with pytest.raises(SerializationError, match="untyped_storage"):
        nnsight.from_json(_document(_OUTPUT, _node({"type": "CallMethod", "name": "untyped_storage"}, {"ref": 0})))
    text = _document(
        _OUTPUT,
        _node({"type": "GetAttr", "name": "data"}, {"ref": 0}),
        _node({"type": "GetAttr", "name": "new_empty"}, {"ref": 1}),
        _node({"type": "Save"}, {"ref": 2}),
    )
    graph = nnsight.from_json(text)
    with pytest.raises(SerializationError, match=r"reading \.new_empty gave a callable") as error:
        nnsight.run(nnsight.NNsight(tiny_net()), graph, torch.rand(1, 5))
    assert "%2 = %1.new_empty" in "".join(getattr(error.value, "__notes__", []))  # names the node
    assert list(cwd.iterdir()) == []


def test_setattr_on_a_class_constant_is_refused(cwd: pathlib.Path) -> None:
    before = _tensor_attributes()
    for target in ("torch.nn.functional.Tensor", "torch.Tensor.sum", "torch.relu"):
        text = _document(
            _OUTPUT,
            _node({"type": "SetAttr", "name": "evil"}, {"callable": target}, {"callable": "torch.relu"}),
            _node({"type": "CallMethod", "name": "evil"}, {"ref": 0}, "x.bin", True, 16),
        )
        with pytest.raises(SerializationError):
            nnsight.from_json(text)
        _run_document(text)
    assert _tensor_attributes() == before
    assert not hasattr(torch.Tensor, "evil")
    assert list(cwd.iterdir()) == []
    # At run time too: no attribute is set on a class, a callable or a module.
    for value in (torch.Tensor, torch.relu, torch.nn.functional):
        with pytest.raises(SerializationError, match="setting `.evil`"):
            checked_target(value, "evil")


_NAMES = sorted(
    {name for name in dir(torch.Tensor) if not name.startswith("_")}
    | {name for name in dir(torch.UntypedStorage) if not name.startswith("__")}
    | {"from_file", "untyped_storage", "storage", "numpy", "tofile", "ctypes", "data_as", "grad_fn", "__call__"}
)
_SAFE_TO_TRY = [  # leave out what only wastes time (a backward pass, a huge allocation)
    name for name in _NAMES if name not in {"backward", "resize_", "new_empty_strided", "expand"}
]
_ARGS = st.lists(st.sampled_from(["x.bin", True, 16, 0, 1, {"ref": 0}]), max_size=3)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    chain=st.lists(st.tuples(st.booleans(), st.sampled_from(_SAFE_TO_TRY), _ARGS), min_size=1, max_size=4),
    finish=st.sampled_from(["none", "handle", "call_method"]),
)
def test_attribute_and_method_chains_from_run_values_write_no_file(
    chain: list[tuple[bool, str, list[Any]]], finish: str, cwd: pathlib.Path
) -> None:
    before = _tensor_attributes()
    nodes = [_OUTPUT]
    for is_method, name, args in chain:
        last = {"ref": len(nodes) - 1}
        if is_method:
            nodes.append(_node({"type": "CallMethod", "name": name}, last, *args))
        else:
            nodes.append(_node({"type": "GetAttr", "name": name}, last))
    last = {"ref": len(nodes) - 1}
    if finish == "handle":
        handler = {"type": "Call", "fn": "torch.nn.functional.handle_torch_function"}
        nodes.append(_node(handler, last, {"tuple": [{"ref": 0}]}, "x.bin", True, 16))
    elif finish == "call_method":
        nodes.append(_node({"type": "CallMethod", "name": "from_file"}, last, "x.bin", True, 16))
    nodes.append(_node({"type": "Save"}, {"ref": len(nodes) - 1}))
    _run_document(_document(*nodes))
    assert list(cwd.iterdir()) == []
    assert _tensor_attributes() == before


def test_a_loaded_graph_keeps_its_guard_through_pickle_and_a_traced_one_is_unguarded() -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        method = model.layer1.output.data.new_zeros  # a callable reached by attribute...
        saved = nnsight.apply(lambda f: f(2).shape, method).save()
    assert tuple(saved.value) == (2,)  # ...is fine in code the user wrote
    text = _document(
        _OUTPUT,
        _node({"type": "GetAttr", "name": "data"}, {"ref": 0}),
        _node({"type": "GetAttr", "name": "new_zeros"}, {"ref": 1}),
        _node({"type": "Save"}, {"ref": 2}),
    )
    for graph in (nnsight.from_json(text), pickle.loads(pickle.dumps(nnsight.from_json(text)))):
        with pytest.raises(SerializationError, match="gave a callable"):
            nnsight.run(model, graph, x)
    # The loaded graph's plan is its own: the same structure traced in code is not refused.
    with model.trace(x):
        fine = model.layer1.output.data.new_zeros
        kept = nnsight.apply(lambda f: f(1).shape, fine).save()
    assert tuple(kept.value) == (1,)
    del tracer


def test_a_loaded_graph_computes_as_plain_torch() -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        h = model.layer1.output
        out = (torch.nn.functional.gelu(h).sum(dim=-1) + torch.linalg.norm(h)).save()
    graph = nnsight.from_json(nnsight.to_json(tracer.graph))
    results = nnsight.run(model, graph, x)
    hidden = tiny_layer1(model)(x)
    expected = torch.nn.functional.gelu(hidden).sum(dim=-1) + torch.linalg.norm(hidden)
    (value,) = results.values.values()
    assert torch.allclose(value, expected)
    assert torch.allclose(out.value, expected)


# --- only SerializationError comes out ------------------------------------------------


def _must_refuse(text: Any) -> None:
    with pytest.raises(SerializationError):
        nnsight.from_json(text)


def test_deep_nesting_is_refused() -> None:
    _must_refuse("[" * 100000 + "]" * 100000)
    nested = '{"tuple": [' * 2000 + '{"ref": 0}' + "]}" * 2000
    _must_refuse(_document(_OUTPUT, _node({"type": "Save"}, "NESTED")).replace('"NESTED"', nested))
    cond = '{"nodes": [{"op": {"type": "Cond", "body": '
    body = cond * 1000 + '{"nodes": [], "outputs": null}' + '}, "args": [true]}], "outputs": null}' * 1000
    _must_refuse('{"format": "nnsight_pure.graph", "version": 1, "graph": ' + body + "}")
    # A document just inside the bound is read.
    within = '{"tuple": [' * 50 + '{"ref": 0}' + "]}" * 50
    nnsight.from_json(_document(_OUTPUT, _node({"type": "Save"}, "NESTED")).replace('"NESTED"', within))


@pytest.mark.parametrize(
    "text",
    [
        _document(_OUTPUT, _node({"type": "Save"}, {"ref": 1e999})).replace("Infinity", "1e999"),
        _document(_OUTPUT, _node({"type": "Save"}, {"ref": 0.5})),
        _document(dict(_OUTPUT, source=["f.py", 1, "f"])).replace('1, "f"', '1e999, "f"'),
        _document(dict(_OUTPUT, source=["f.py", -1, "f"])),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"device": "no-such-device"})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"device": -1})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, 7)).replace("7", "7" * 5000),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"size": ["a"]})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"slice": [1]})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"float": 3})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, {"bytes": "***"})),
        _document(_OUTPUT, _node({"type": "Call", "fn": "torch.add"}, {"ref": 0}, 1.5)).replace("1.5", "NaN"),
        _document(_OUTPUT).replace('"version": 1', '"version": 0'),
        _document(_OUTPUT).replace('"version": 1', '"version": -1'),
        _document(_OUTPUT).replace('"version": 1', '"version": true'),
        '{"format": "nnsight_pure.graph", "version": 1, "graph": []}',
        '{"format": "nnsight_pure.graph", "version": 1, "graph": {"nodes": [5]}}',
        b"\xff\xfe",
    ],
)
def test_malformed_documents_raise_only_serialization_error(text: Any) -> None:
    _must_refuse(text)


def _real_documents() -> list[str]:
    model = nnsight.NNsight(tiny_net())
    with model.trace() as tracer:
        with tracer.invoke(torch.rand(1, 5)):
            h = model.layer1.output
            model.layer2.output[0] = (h[:, :2] * 2.5).sum(dim=-1, keepdim=True)
        with tracer.invoke(torch.rand(1, 5)):
            with nnsight.cond(h.sum() > 0):
                model.layer1.output.save()
            torch.softmax(model.layer2.output, dim=-1).to(torch.float64).save()  # type: ignore[attr-defined]
    return [nnsight.to_json(tracer.graph), nnsight.to_json(tracer.graph, sources=False)]


_REAL = _real_documents()
_REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.sampled_from([1e308, -0.0, 10**4000]),
    st.text(max_size=8),
    st.sampled_from([[], {}, [[]], {"ref": -1}, {"tuple": 5}, {"device": "?"}, {"callable": "os.system"}]),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_documents_give_a_graph_or_serialization_error(data: st.DataObject) -> None:
    document = json.loads(data.draw(st.sampled_from(_REAL)))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(document))[1:]
        path = data.draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        how = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if how == "replace":
            parent[path[-1]] = data.draw(_REPLACEMENTS)
        elif how == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = [copy.deepcopy(parent[path[-1]])] * 2
        if not isinstance(document, dict) or not list(_paths(document))[1:]:
            break
    text = json.dumps(document)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.sampled_from(["", "[", "}", "1e999", "-", '"', "\\u0000"])) + text[cut:]
    try:
        graph = nnsight.from_json(text)
    except SerializationError:
        return
    assert nnsight.from_json(nnsight.to_json(graph)) == graph


def tiny_layer1(model: nnsight.NNsight) -> torch.nn.Module:
    layer = model._model.get_submodule("layer1")
    return layer
