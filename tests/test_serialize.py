"""The JSON format: exact round trips, stable digests, and refusals.

* ``from_json(to_json(g)) == g`` and the text is canonical (writing the read
  graph gives the same text), for hypothesis-generated graphs holding every
  op kind, nested bodies and every constant kind the format knows.
* Digests are equal for equal graphs, in any process (hash seeds differ).
* A tampered document (unknown callable, private attribute, newer version,
  malformed field) is refused before anything is built or run; a graph that
  cannot be written fails naming its node and the user's line.
"""

from __future__ import annotations

import json
import math
import operator
import os
import pathlib
import subprocess
import sys
from collections import namedtuple
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_pure as nnsight
from nnsight_pure.arguments import DictConst, ListConst, Ref, SliceConst, TensorConst
from nnsight_pure.graph import Graph, check_graph
from nnsight_pure.ops import (
    ApplyModule,
    Bridge,
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
    Save,
    SetAttr,
    SetGrad,
    Stop,
    TraceRun,
)
from nnsight_pure.serialize import VERSION, SerializationError, digest
from nnsight_pure.source import SourceLoc
from tests.helpers import tiny_gpt2, tiny_net
from tests.vis_examples import legend_examples

ROOT = pathlib.Path(__file__).resolve().parent.parent

# --- strategies -------------------------------------------------------------------------

FUNCTIONS = [operator.add, operator.getitem, operator.setitem, torch.sum, torch.nn.functional.relu,
             torch.Tensor.softmax, torch.linalg.norm, math.sqrt, print, len, torch.where]
METHODS = ["sum", "mean", "view", "append", "__getitem__", "keys"]


def tensors() -> st.SearchStrategy[TensorConst]:
    def make(shape: list[int], dtype: torch.dtype, seed: int) -> TensorConst:
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn(shape, generator=generator) * 10
        if dtype == torch.float32:
            values = values.flatten()
            if values.numel():
                values[0] = math.nan  # NaN constants must survive too
            values = values.view(shape)
        return TensorConst(values.to(dtype))

    return st.builds(make, st.lists(st.integers(0, 3), max_size=3),
                     st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]), st.integers(0, 99))


SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4)
    | st.complex_numbers(allow_nan=False) | st.binary(max_size=4) | st.just(Ellipsis)
    | st.sampled_from([torch.float32, torch.int8, torch.bfloat16])
    | st.sampled_from([torch.device("cpu"), torch.device("meta")])
    | st.lists(st.integers(0, 9), max_size=3).map(torch.Size)
    | st.sampled_from([torch.sum, operator.neg, max])  # callables as constants
)


def constants(refs: int) -> st.SearchStrategy[object]:
    leaves: st.SearchStrategy[object] = SCALARS | tensors()
    if refs:
        leaves = leaves | st.integers(0, refs - 1).map(Ref)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3).map(tuple)
        | st.lists(inner, max_size=3).map(lambda items: ListConst(tuple(items)))
        | st.lists(st.tuples(st.text(max_size=3) | st.integers(), inner), max_size=3).map(
            lambda items: DictConst(tuple(items)))
        | st.builds(SliceConst, inner, inner, inner),
        max_leaves=6,
    )


@st.composite
def ops(draw: st.DrawFn, size: int, depth: int, body: str | None) -> Op:
    """One op, its kind drawn first (so that only the chosen kind's body is drawn)."""
    paths = st.sampled_from(["", "layer1", "transformer.h.0.mlp"])
    kinds = ["get", "set", "attr", "apply", "call", "method", "getattr", "setattr", "save", "stop", "grad", "setgrad"]
    kinds += ["bridge"] if body is not None else []
    kinds += ["item"] if body == "iterate" else []
    kinds += ["cond", "iterate", "each", "trace"] if depth < 2 else []
    kinds += ["export"] if size else []
    match draw(st.sampled_from(kinds)):
        case "get":
            return ModuleGet(draw(paths), draw(st.sampled_from(["output", "input", "inputs"])), draw(st.integers(0, 3)))
        case "set":
            return ModuleSet(draw(paths), "output", draw(st.integers(0, 2)))
        case "attr":
            return ModuleAttr(draw(paths), draw(st.sampled_from(["weight", "bias"])))
        case "apply":
            return ApplyModule(draw(paths), draw(st.booleans()))
        case "call":
            return Call(draw(st.sampled_from(FUNCTIONS)))
        case "method":
            return CallMethod(draw(st.sampled_from(METHODS)))
        case "getattr":
            return GetAttr("shape")
        case "setattr":
            return SetAttr("requires_grad")
        case "save":
            return Save()
        case "stop":
            return Stop()
        case "grad":
            return Grad()
        case "setgrad":
            return SetGrad()
        case "bridge":
            return Bridge(draw(st.integers(0, 2)))
        case "item":
            return IterItem()
        case "cond":
            return Cond(draw(graphs(depth + 1, "cond")))
        case "iterate":
            return Iterate(draw(graphs(depth + 1, "iterate")))
        case "each":
            return EachCall(
                draw(graphs(depth + 1, "each")), draw(st.integers(0, 2)), draw(st.none() | st.integers(3, 5)), 1,
                draw(st.sampled_from([("",), ("layer1", "layer2")])), draw(st.sampled_from([(), (0, 2)])),
            )
        case "trace":
            return TraceRun(draw(graphs(depth + 1, "trace")), draw(st.none() | st.just("generate")))
        case _:
            return Export(draw(st.integers(0, 3)))


@st.composite
def graphs(draw: st.DrawFn, depth: int = 0, body: str | None = None) -> Graph:
    """A graph of any op kinds (not meant to run): nested bodies, every constant kind, outputs."""
    graph = Graph()
    for _ in range(draw(st.integers(0, 5 if depth == 0 else 3))):
        size = len(graph)
        op = draw(ops(size, depth, body))
        if isinstance(op, Export):
            args: list[object] = [Ref(draw(st.integers(0, size - 1)))]
        else:
            args = draw(st.lists(constants(size), max_size=3))
            while isinstance(op, (GetAttr, SetAttr, CallMethod)) and args and callable(args[0]):
                args.pop(0)  # an attribute or method of a callable constant is refused (by design)
        kwargs = draw(st.dictionaries(st.sampled_from(["dim", "keepdim", "out"]), constants(size), max_size=2))
        source = draw(st.none() | st.builds(SourceLoc, st.text(max_size=8), st.integers(1, 999), st.text(max_size=5)))
        graph, _ = graph.add(op, tuple(args), kwargs, source, draw(st.none() | st.integers(0, 2)))
    if len(graph) and draw(st.booleans()):
        graph = graph.with_outputs(draw(constants(len(graph))))
    return graph


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_any_graph_round_trips_exactly(graph: Graph) -> None:
    text = nnsight.to_json(graph)
    read = nnsight.from_json(text)
    check_graph(read)
    assert read == graph and hash(read) == hash(graph)
    assert nnsight.to_json(read) == text  # canonical: one text per graph
    assert [node.source for node in read.nodes] == [node.source for node in graph.nodes]
    assert digest(read) == digest(graph)


def test_legend_examples_round_trip() -> None:
    for name, graph in legend_examples().items():
        assert nnsight.from_json(nnsight.to_json(graph)) == graph, name


def test_tensor_constants_are_stored_exactly() -> None:
    values = torch.tensor([1.0, -0.0, math.inf, math.nan, 1e-45], dtype=torch.float64)
    graph, _ = Graph().add(Call(torch.add), (TensorConst(values), TensorConst(torch.arange(3, dtype=torch.int16))))
    read = nnsight.from_json(nnsight.to_json(graph))
    stored = read.nodes[0].args[0]
    assert isinstance(stored, TensorConst) and stored.tensor.dtype == torch.float64
    assert torch.equal(stored.tensor.view(torch.int64), values.view(torch.int64))  # bit for bit


def test_scalar_types_stay_distinct() -> None:
    one, _ = Graph().add(Call(operator.mul), (2, 1))
    one_float, _ = Graph().add(Call(operator.mul), (2, 1.0))
    one_bool, _ = Graph().add(Call(operator.mul), (2, True))
    assert len({one, one_float, one_bool}) == 3
    assert len({nnsight.to_json(g) for g in (one, one_float, one_bool)}) == 3
    for graph in (one, one_float, one_bool):
        assert type(nnsight.from_json(nnsight.to_json(graph)).nodes[0].args[1]) is type(graph.nodes[0].args[1])


def test_a_traced_session_round_trips_and_runs_the_same() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)
    with model.session() as session:
        with model.trace(x):
            hidden = model.layer1.output
        with session.iter([1, 2, 3]) as scale:
            with model.trace(x):
                model.layer1.output = hidden * scale
                total = model.output.sum().save()
            with session.cond(total > -1e9):
                nnsight.log("step", scale)
    graph = session.graph
    read = nnsight.from_json(nnsight.to_json(graph))
    assert read == graph
    first, second = _saved(nnsight.run(model, graph)), _saved(nnsight.run(model, read))
    assert len(first) == 1 and first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    expected = net.layer2(net.layer1(x) * 3).sum()  # the loop's last run
    assert torch.allclose(next(iter(first.values())), expected)


def _saved(results: nnsight.Results, where: tuple[int, ...] = ()) -> dict[tuple[int, ...], Any]:
    """Every saved tensor of a run, nested runs included, by position."""
    found = {where + (index,): value for index, value in results.values.items() if isinstance(value, torch.Tensor)}
    for index, child in results.children.items():
        found.update(_saved(child, where + (index,)))
    return found


def test_gpt2_graph_round_trips() -> None:
    model = nnsight.NNsight(tiny_gpt2())
    tokens = torch.tensor([[5, 6, 7]])

    def patch(m: Any) -> Any:
        m.transformer.h[0].mlp.output[:, -1] = 0
        return {"logits": m.lm_head.output[:, -1].softmax(-1), "attn": m.transformer.h[1].attn.output[0]}

    graph = nnsight.trace(model, patch)
    read = nnsight.from_json(nnsight.to_json(graph, indent=2))
    assert read == graph
    assert torch.equal(nnsight.run(model, read, tokens)["logits"], nnsight.run(model, graph, tokens)["logits"])


# --- digests ----------------------------------------------------------------------------

_DIGEST_SCRIPT = """
import torch, nnsight_pure as nnsight
from collections import OrderedDict
net = torch.nn.Sequential(OrderedDict([("layer1", torch.nn.Linear(5, 10)), ("layer2", torch.nn.Linear(10, 2))]))
model = nnsight.NNsight(net)
def fn(m):
    m.layer1.output[:, 0:2] = torch.tensor([0.5, -1.0])
    return {"z": m.layer2.output.sum(dim=-1, keepdim=True), "a": [m.layer1.output * 1.5, {"k": 3}]}
from nnsight_pure.serialize import digest
print(digest(nnsight.trace(model, fn)))
"""


def test_equal_functions_give_equal_digests_in_other_processes() -> None:
    namespace: dict[str, Any] = {}
    exec(_DIGEST_SCRIPT.replace("print(", "result = ("), namespace)
    here = namespace["result"]
    others = [
        subprocess.Popen([sys.executable, "-c", _DIGEST_SCRIPT], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)})
        for seed in ("1", "2")
    ]
    seen = {here}
    for process in others:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        seen.add(out.strip())
    assert len(seen) == 1 and len(here) == 64


def test_digest_ignores_source_lines_but_not_content() -> None:
    model = nnsight.NNsight(tiny_net())

    def first(m: Any) -> Any:
        return m.layer1.output * 2

    def second(m: Any) -> Any:

        return m.layer1.output * 2  # same program, other line

    def third(m: Any) -> Any:
        return m.layer1.output * 3

    a, b, c = (nnsight.trace(model, fn) for fn in (first, second, third))
    assert a == b and digest(a) == digest(b)
    assert a != c and digest(a) != digest(c)


# --- refusals ---------------------------------------------------------------------------


def _document(graph: Graph) -> dict[str, Any]:
    return json.loads(nnsight.to_json(graph))  # type: ignore[no-any-return]


def _simple() -> Graph:
    graph, ref = Graph().add(ModuleGet("layer1", "output"), invoke=0)
    graph, ref = graph.add(Call(torch.relu), (ref,), invoke=0)
    return graph.with_outputs(ref)


@pytest.mark.parametrize(
    "name",
    ["os.system", "builtins.getattr", "builtins.eval", "builtins.__import__", "torch.from_file", "torch.load",
     "operator.call", "operator.attrgetter", "torch.Tensor.__class__", "torch.Tensor.__reduce_ex__",
     "torch.Tensor.apply_", "torch.nn.functional.__builtins__", "subprocess.run", "torch._C._nn.linear"],
)
def test_callables_off_the_whitelist_are_refused(name: str) -> None:
    document = _document(_simple())
    document["graph"]["nodes"][1]["op"]["fn"] = name
    with pytest.raises(SerializationError, match="not on the whitelist"):
        nnsight.from_json(json.dumps(document))


def test_refused_callables_are_never_called(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[object] = []
    monkeypatch.setattr(os, "system", lambda *args: called.append(args))
    document = _document(_simple())
    document["graph"]["nodes"][1]["op"]["fn"] = "os.system"
    document["graph"]["nodes"][1]["args"] = ["touch " + str(tmp_path / "pwned")]
    with pytest.raises(SerializationError):
        nnsight.from_json(json.dumps(document))
    assert not called and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("op", "match"),
    [
        ({"type": "GetAttr", "name": "__class__"}, "private attribute"),
        ({"type": "SetAttr", "name": "_hidden"}, "private attribute"),
        ({"type": "CallMethod", "name": "format"}, "the method 'format'"),
        ({"type": "CallMethod", "name": "tofile"}, "the method 'tofile'"),
        ({"type": "CallMethod", "name": "__reduce_ex__"}, "the method"),
        ({"type": "ModuleGet", "path": "layer1", "kind": "weights", "call": 0}, "field 'kind'"),
        ({"type": "ModuleGet", "path": "layer1", "kind": "output", "call": "0"}, "field 'call'"),
        ({"type": "ModuleGet", "path": "layer1", "kind": "output", "call": 0, "extra": 1}, "unknown field"),
        ({"type": "ModuleGet", "path": "layer1"}, "missing a field"),
        ({"type": "Eval"}, "unknown op kind"),
    ],
)
def test_tampered_ops_are_refused(op: dict[str, Any], match: str) -> None:
    document = _document(_simple())
    document["graph"]["nodes"][1]["op"] = op
    with pytest.raises(SerializationError, match=match):
        nnsight.from_json(json.dumps(document))


def test_newer_versions_and_other_documents_are_refused() -> None:
    document = _document(_simple())
    assert document["version"] == VERSION
    document["version"] = VERSION + 1
    with pytest.raises(SerializationError, match=f"version {VERSION + 1}.*upgrade"):
        nnsight.from_json(json.dumps(document))
    for text in ("[]", '{"format": "pickle", "version": 1}', "not json", '{"format": "nnsight_pure.graph"}'):
        with pytest.raises(SerializationError):
            nnsight.from_json(text)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["graph"]["nodes"][1].update(args=[{"ref": 7}]),  # a ref past the node
        lambda d: d["graph"]["nodes"][1].update(args=[{"eval": "1"}]),  # an unknown tag
        lambda d: d["graph"]["nodes"][1].update(invoke="0"),
        lambda d: d["graph"].update(outputs={"ref": 9}),
        lambda d: d["graph"]["nodes"][1].update(args=[{"callable": "os.system"}]),
        lambda d: d["graph"]["nodes"][1].update(args=[{"tensor": "bm90IGEgdGVuc29y"}]),
        lambda d: d["graph"].pop("nodes"),
    ],
)
def test_malformed_documents_are_refused(tamper: Any) -> None:
    document = _document(_simple())
    tamper(document)
    with pytest.raises(SerializationError):
        nnsight.from_json(json.dumps(document))


def test_a_run_value_cannot_be_called_as_a_sort_key() -> None:
    graph, ref = Graph().add(ModuleGet("layer1", "output"))
    graph, _ = graph.add(Call(sorted), ((1, 2),), {"key": ref})
    with pytest.raises(SerializationError, match="key function"):
        nnsight.to_json(graph)
    fine, _ = Graph().add(Call(sorted), ((1, -2),), {"key": abs})
    assert nnsight.from_json(nnsight.to_json(fine)) == fine


def test_unserializable_graphs_name_the_node_and_line() -> None:
    model = nnsight.NNsight(tiny_net())

    def with_lambda(m: Any) -> Any:
        return nnsight.apply(lambda value: value * 2, m.layer1.output)  # the line named

    graph = nnsight.trace(model, with_lambda)
    line = with_lambda.__code__.co_firstlineno + 1
    with pytest.raises(SerializationError, match=rf"<lambda>.*test_serialize.py:{line}\).*not on the whitelist"):
        nnsight.to_json(graph)

    Pair = namedtuple("Pair", "a b")
    opaque, _ = Graph().add(Call(operator.add), (Pair(1, 2), object()))
    with pytest.raises(SerializationError, match="Pair"):
        nnsight.to_json(opaque)
    private, _ = Graph().add(GetAttr("_modules"), (1,))
    with pytest.raises(SerializationError, match="private attribute"):
        nnsight.to_json(private)
    outputs = Graph().with_outputs(ListConst((object(),)))
    with pytest.raises(SerializationError, match="outputs"):
        nnsight.to_json(outputs)


def test_log_survives_a_library_replacing_print(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray (its progress bars) puts its own function in ``builtins.print`` for
    good; a log recorded after that must still serialize, and print through
    whatever ``print`` is when it runs."""
    import builtins

    real = builtins.print

    def replaced(*args: Any, **kwargs: Any) -> None:
        real("[replaced]", *args, **kwargs)

    monkeypatch.setattr(builtins, "print", replaced)
    model = nnsight.NNsight(tiny_net())
    graph = nnsight.trace(model, lambda m: nnsight.log("out", m.output.shape[-1]))
    read = nnsight.from_json(nnsight.to_json(graph))
    assert read == graph
    nnsight.run(model, read, torch.rand(1, 5))
    assert capsys.readouterr().out == "[replaced] out 2\n"
