"""``tracer.cache(...)`` against the same values stored by hand-written torch hooks.

Every test compares the cache with forward hooks that store each module's
output (or inputs) themselves, on the same model and inputs: every module of
a tiny net and of a GPT-2-shaped model, post-intervention values, a module
called several times, generation steps of a LanguageModel, invokes, a
stopped run, a replay of the graph and a graph read back from JSON.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure import open_blocks
from nnsight_pure.activation_cache import ActivationCache, CacheEntry
from nnsight_pure.contexts.tracer import Tracer
from nnsight_pure.errors import TraceError
from nnsight_pure.ops import Cache
from tests import lm_models
from tests.helpers import tiny_gpt2, tiny_net


def _hooked_outputs(net: torch.nn.Module, run: Callable[[], Any], inputs: bool = False) -> dict[str, list[Any]]:
    """Every call's output (or ``(args, kwargs)``) of every module of ``net``
    during ``run()``, by cache name, stored by plain forward hooks."""
    seen: dict[str, list[Any]] = {}
    handles = []
    for path, module in net.named_modules():
        name = f"model.{path}" if path else "model"

        def post(module: Any, args: Any, output: Any, name: str = name) -> None:
            seen.setdefault(name, []).append(output)

        def pre(module: Any, args: Any, kwargs: Any, name: str = name) -> None:
            seen.setdefault(name, []).append((args, kwargs))

        if inputs:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if hasattr(a, "to_tuple"):  # a transformers ModelOutput
        return _same(a.to_tuple(), b.to_tuple())
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b)  # (a transformers cache object: the same kind)


def _one(entry: CacheEntry | list[CacheEntry]) -> CacheEntry:
    """The entry of a module called once."""
    assert isinstance(entry, CacheEntry), entry
    return entry


def _the_tracer(model: Any) -> Tracer:
    """The trace `nnsight.trace(model, fn)` is recording (fn gets the wrapper only)."""
    found = [context for context in open_blocks.open_contexts() if isinstance(context, Tracer)]
    assert found
    return found[-1]


# --- every module, against hand-written hooks -----------------------------------------------


def test_every_module_of_a_tiny_net_equals_hooks() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(3, 5)
    expected = _hooked_outputs(net, lambda: net(x))
    with model.trace(x) as tracer:
        cache = tracer.cache()
    value = cache.value
    assert isinstance(value, ActivationCache)
    assert list(value) == ["model", "model.layer1", "model.layer2"]  # the tree order (the hooks: call order)
    assert set(value) == set(expected)
    for name, outputs in expected.items():
        assert torch.equal(_one(value[name]).output, outputs[0])
    assert torch.equal(value.model.layer1.output, net.layer1(x))
    assert value["layer2"] is value["model.layer2"] is value[".layer2"]


def test_every_module_of_gpt2_equals_hooks(gpt2: nnsight.NNsight, gpt2_module: Any, ids: torch.Tensor) -> None:
    expected = _hooked_outputs(gpt2_module, lambda: gpt2_module(ids))
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache()
    value = cache.value
    assert set(value) == set(expected) and len(expected) > 30
    for name, outputs in expected.items():
        assert _same(value[name].output, outputs[0]), name
    assert value.model.transformer.h[1].output is value["model.transformer.h.1"].output
    assert value.model.transformer.h[0].mlp.c_fc.output is value["transformer.h.0.mlp.c_fc"].output


def test_inputs_are_the_hooks_args_and_kwargs(gpt2: nnsight.NNsight, gpt2_module: Any, ids: torch.Tensor) -> None:
    expected = _hooked_outputs(gpt2_module, lambda: gpt2_module(ids), inputs=True)
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache(include_inputs=True, include_output=False)
    value = cache.value
    for name, calls in expected.items():
        assert _same(value[name].inputs, calls[0]), name
    block = value.model.transformer.h[1]
    assert torch.equal(block.input, expected["model.transformer.h.1"][0][0][0])
    assert value["model.transformer.h.1"].output is None
    with pytest.raises(AttributeError, match="include_output=False"):
        block.output
    ids_in = value["model"].input  # the root was called with keywords only or positionally
    assert torch.equal(ids_in, ids)


def test_the_cache_is_one_node_whatever_it_holds(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    with gpt2.trace(ids) as tracer:
        tracer.cache()
    caches = [node for node in tracer.graph.nodes if isinstance(node.op, Cache)]
    assert len(caches) == 1 and len(caches[0].op.modules) > 30
    assert len(tracer.graph.nodes) == 2  # the cache and its save


# --- values after interventions ------------------------------------------------------------


def test_the_cache_sees_values_after_a_write_made_after_it(gpt2: nnsight.NNsight, gpt2_module: Any,
                                                           ids: torch.Tensor) -> None:
    def zero(module: Any, args: Any, output: Any) -> Any:
        lm_models.hidden(output)[:] = 0
        return output

    handle = gpt2_module.transformer.h[0].register_forward_hook(zero)
    try:
        expected = _hooked_outputs(gpt2_module, lambda: gpt2_module(ids))
    finally:
        handle.remove()
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache(["transformer.h.0", gpt2.transformer.h[1], "model.lm_head"], include_inputs=True)
        hidden = gpt2.transformer.h[0].output
        (hidden[0] if lm_models.BLOCKS_RETURN_TUPLES else hidden)[:] = 0
    value = cache.value
    assert list(value) == ["model.transformer.h.0", "model.transformer.h.1", "model.lm_head"]
    assert not lm_models.hidden(value.model.transformer.h[0].output).any()
    assert not value.model.transformer.h[1].input.any()
    for name in value:
        assert _same(value[name].output, expected[name][0]), name


# --- several calls ----------------------------------------------------------------------------


class Thrice(torch.nn.Module):
    """One layer called three times in a forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.layer(x)
        return x


def test_a_module_called_three_times_has_three_entries_in_order() -> None:
    net = Thrice()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 4)
    expected = _hooked_outputs(net, lambda: net(x))
    with model.trace(x) as tracer:
        cache = tracer.cache()
    value = cache.value
    entries = value["model.layer"]
    assert isinstance(entries, list) and len(entries) == 3
    assert all(torch.equal(entry.output, out) for entry, out in zip(entries, expected["model.layer"]))
    assert value.model.layer[2] is entries[2]
    assert isinstance(value["model"], CacheEntry)
    with pytest.raises(TypeError, match="called 3 times"):
        value.model.layer.output


def test_generation_steps_equal_plain_greedy_generation(tmp_path: Path) -> None:
    folder = lm_models.save("gpt2", tmp_path / "gpt2")
    lm = nnsight.LanguageModel(str(folder))
    hf = lm_models.plain(folder)
    encoding = lm_models.encode(lm.tokenizer, "The city of")
    steps = lm_models.plain_steps(hf, "transformer.h.1", encoding, 3)
    generated = lm_models.greedy(hf, encoding, 3)
    with lm.generate("The city of", max_new_tokens=3) as tracer:
        cache = tracer.cache()
    value = cache.value
    blocks = value["model.transformer.h.1"]
    assert isinstance(blocks, list) and len(blocks) == 3
    for entry, expected in zip(blocks, steps):
        assert torch.allclose(lm_models.hidden(entry.output), expected, atol=1e-5)
    assert torch.equal(value.model.generator.output, generated)  # the generated ids: one call
    assert len(value["model.lm_head"]) == 3
    with lm.trace("The city of") as tracer:
        traced = tracer.cache()
    assert "model.generator" not in traced.value and "model.generator" in traced.value.names
    with pytest.raises(KeyError, match="cached but not called"):
        traced.value["model.generator"]


# --- invokes ----------------------------------------------------------------------------------


def test_each_invoke_has_its_rows_and_the_trace_the_whole_batch(gpt2: nnsight.NNsight, gpt2_module: Any) -> None:
    torch.manual_seed(3)
    first, second = torch.randint(3, 100, (1, 6)), torch.randint(3, 100, (2, 6))
    alone = [_hooked_outputs(gpt2_module, functools.partial(gpt2_module, ids)) for ids in (first, second)]
    both = _hooked_outputs(gpt2_module, lambda: gpt2_module(torch.cat([first, second])))
    with gpt2.trace() as tracer:
        with tracer.invoke(first):
            one = tracer.cache(["transformer.h.0", "lm_head"])
        with tracer.invoke(second):
            two = tracer.cache(["transformer.h.0", "lm_head"])
        whole = tracer.cache(["lm_head"])
    for cache, expected in zip((one, two), alone):
        assert torch.allclose(cache.value.model.lm_head.output, expected["model.lm_head"][0], atol=1e-5)
        assert lm_models.hidden(cache.value.model.transformer.h[0].output).shape[0] == \
            lm_models.hidden(expected["model.transformer.h.0"][0]).shape[0]
    assert torch.equal(whole.value.model.lm_head.output, both["model.lm_head"][0])


# --- a stopped run ---------------------------------------------------------------------------


def test_a_stopped_run_keeps_what_came_before_the_stop(gpt2: nnsight.NNsight, gpt2_module: Any,
                                                       ids: torch.Tensor) -> None:
    expected = _hooked_outputs(gpt2_module, lambda: gpt2_module(ids))
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache()
        gpt2.transformer.h[0].output.stop()
    value = cache.value
    assert "model.transformer.h.0.mlp" in value and "model.transformer.h.1" not in value
    assert "model.lm_head" not in value
    for name in value:
        assert _same(value[name].output, expected[name][0]), name
    with pytest.raises(KeyError, match="cached but not called"):
        value.model.lm_head.output


# --- replays and documents -------------------------------------------------------------------


def test_a_replay_and_a_json_document_give_the_same_cache(gpt2: nnsight.NNsight, gpt2_module: Any,
                                                          ids: torch.Tensor) -> None:
    torch.manual_seed(4)
    other = torch.randint(3, 100, (2, 5))
    expected = _hooked_outputs(gpt2_module, lambda: gpt2_module(other))
    with gpt2.trace(ids) as tracer:
        tracer.cache(device="cpu", dtype=torch.float64)
    graph = tracer.graph

    def built(m: Any) -> Any:
        return _the_tracer(m).cache(device="cpu", dtype=torch.float64)

    from_fn = nnsight.trace(gpt2, built)
    document = nnsight.to_json(graph)
    assert '"float64"' in document
    read = nnsight.from_json(document)
    values = [
        next(iter(nnsight.run(gpt2, graph, other).values.values())),
        next(iter(nnsight.run(gpt2, read, other).values.values())),
        nnsight.run(gpt2, from_fn, other).outputs,
    ]
    for value in values:
        assert isinstance(value, ActivationCache) and set(value) == set(expected)
        assert value.model.lm_head.output.dtype == torch.float64
        assert torch.allclose(value.model.lm_head.output, expected["model.lm_head"][0].double())
        assert _one(value["model.transformer.wte"]).output.dtype == torch.float64


# --- storage ---------------------------------------------------------------------------------


def test_detach_and_dtype() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x) as tracer:
        kept = tracer.cache(["layer1"], detach=False)
        detached = tracer.cache(["layer1"], dtype="float16")
    assert kept.value.model.layer1.output.grad_fn is not None
    half = detached.value.model.layer1.output
    assert half.grad_fn is None and half.dtype == torch.float16
    assert torch.equal(half, net.layer1(x).detach().half())


def test_renamed_modules_are_read_by_alias_and_by_real_name(tmp_path: Path) -> None:
    folder = lm_models.save("gpt2", tmp_path / "gpt2")
    lm = nnsight.LanguageModel(str(folder), rename={"transformer": "tf", "h": "layers"})
    hf = lm_models.plain(folder)
    expected = _hooked_outputs(hf, lambda: hf(**lm_models.encode(lm.tokenizer, "The city of")))
    with lm.trace("The city of") as tracer:
        cache = tracer.cache(["tf.layers.0", lm.tf.layers[1], "transformer.h.1"])
    value = cache.value
    assert list(value) == ["model.tf.layers.0", "model.tf.layers.1"]
    assert value["model.transformer.h.0"] is value["tf.layers.0"]
    assert torch.allclose(lm_models.hidden(value.model.tf.layers[1].output),
                          lm_models.hidden(expected["model.transformer.h.1"][0]), atol=1e-5)


# --- errors and text -------------------------------------------------------------------------


def test_errors_name_the_problem(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    other = nnsight.NNsight(tiny_gpt2())
    with gpt2.trace(ids) as tracer:
        with pytest.raises(TraceError, match="'nope' is not a submodule of model.transformer"):
            tracer.cache(["transformer.nope"])
        with pytest.raises(TraceError, match="would cache nothing"):
            tracer.cache(include_output=False)
        with pytest.raises(TypeError, match="torch dtype"):
            tracer.cache(dtype="no-such-dtype")
        with pytest.raises(TypeError, match="another model"):
            tracer.cache([other.transformer.h[0]])
        with pytest.raises(TypeError, match="envoys of this model or module paths"):
            tracer.cache([3])
        with tracer.cond(gpt2.transformer.h[0].output[0].sum() > 0):
            with pytest.raises(TraceError, match="not inside a condition or a loop"):
                tracer.cache()
        cache = tracer.cache(["lm_head"])
    with pytest.raises(KeyError, match="'model.nope' is not in this cache; it holds: model.lm_head"):
        cache.value["model.nope"]
    with pytest.raises(AttributeError, match="include_inputs=True"):
        cache.value.model.lm_head.input


def test_reprs_print_no_tensor_data(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache(["lm_head", "transformer.h.0"])
    value = cache.value
    assert repr(value) == "ActivationCache(2 modules: model.lm_head, model.transformer.h.0)"
    assert repr(value["lm_head"]) == "CacheEntry(output=tensor(1, 8, 100) float32)"
    assert repr(value.model.lm_head) == "<cache path model.lm_head: 1 call>"


def test_an_input_write_shows_in_the_cached_inputs_and_hooks_are_gone_after() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)
    with model.trace(x) as tracer:
        cache = tracer.cache("layer2", include_inputs=True)  # one path, not in a list
        model.layer2.input = torch.zeros(2, 10)
    entry = cache.value["model.layer2"]
    assert not entry.input.any()
    assert torch.equal(entry.output, net.layer2(torch.zeros(2, 10)))
    with model.trace(x) as tracer:
        tracer.cache(model.layer1, include_inputs=True)  # one envoy
        model.layer1.output.stop()
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_module_list_envoy_caches_the_list_itself_which_is_never_called(gpt2: nnsight.NNsight,
                                                                          ids: torch.Tensor) -> None:
    with gpt2.trace(ids) as tracer:
        cache = tracer.cache(gpt2.transformer.h)
    value = cache.value
    assert len(value) == 0 and value.names == ("model.transformer.h",)
    with pytest.raises(KeyError, match="cached but not called"):
        value.model.transformer.h.output
