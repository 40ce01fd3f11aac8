"""Reading and writing module values on the seed's two-layer net, against plain hooks."""

from __future__ import annotations

import operator
from typing import Any, cast

import pytest
import torch

import nnsight_pure as nnsight
from tests.helpers import TinyNet, hook_counts, hooked_run, parameters_snapshot, same_parameters


def test_save_outputs_equal_plain_hooks(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        l1 = model.layer1.output.save()
        l2 = model.layer2.output.save()
        out = model.output.save()
    ref_out, seen = hooked_run(net, x, read=("layer1", "layer2"))
    assert torch.equal(l1.value, seen["layer1"])
    assert torch.equal(l2.value, seen["layer2"])
    assert torch.equal(out.value, ref_out)


def test_inputs_and_input(model: nnsight.NNsight, x: torch.Tensor, net: TinyNet) -> None:
    with model.trace(x):
        l2_in = model.layer2.input.save()
        l2_inputs = model.layer2.inputs.save()
        root_in = model.input.save()
    _, seen = hooked_run(net, x, read=("layer1",))
    assert torch.equal(l2_in.value, seen["layer1"])
    args, kwargs = l2_inputs.value
    assert torch.equal(args[0], seen["layer1"]) and kwargs == {}
    assert torch.equal(root_in.value, x)


def test_set_output_replaces_what_later_layers_see(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        after = model.layer1.output.save()
        out = model.output.save()
    ref_out, seen = hooked_run(net, x, replace={"layer1": lambda o: o * 2}, read=("layer1",))
    assert torch.equal(out.value, ref_out)
    assert torch.equal(after.value, seen["layer1"])


def test_inplace_setitem_on_output(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        before = model.layer1.output.clone().save()
        model.layer1.output[:, 2:5] = 0
        out = model.output.save()

    def zero(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, 2:5] = 0
        return o

    ref_out, _ = hooked_run(net, x, replace={"layer1": zero})
    plain, seen = hooked_run(net, x, read=("layer1",))
    assert torch.equal(out.value, ref_out)
    assert torch.equal(before.value, seen["layer1"])
    assert not torch.equal(out.value, plain)


def test_set_input_and_inputs(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        model.layer2.input = model.layer2.input + 1
        out1 = model.output.save()
    with model.trace(x):
        model.layer2.inputs = ((torch.ones(1, 10),), {})
        out2 = model.output.save()
    ref1, _ = hooked_run(net, x, replace_input={"layer2": lambda a: (a[0] + 1,)})
    assert torch.equal(out1.value, ref1)
    assert torch.equal(out2.value, net.layer2(torch.ones(1, 10)))


def test_in_place_operator_changes_the_activation(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    # ``h += 1`` acts in place on the tensor, as in plain torch (nnsight 0.4 silently did not).
    with model.trace(x):
        h = model.layer1.output
        h += 1
        out = model.output.save()
    ref, _ = hooked_run(net, x, replace={"layer1": lambda o: o + 1})
    assert torch.equal(out.value, ref)


def test_operators_and_methods(model: nnsight.NNsight, x: torch.Tensor, net: TinyNet) -> None:
    with model.trace(x):
        h = model.layer1.output
        results = [
            (h + 1).save(), (1 + h).save(), (h - 2).save(), (2 - h).save(), (h * 3).save(),
            (3 * h).save(), (h / 2).save(), (2 / (h.abs() + 1)).save(), (h // 1).save(),
            (h % 2).save(), (h ** 2).save(), (2 ** h).save(), (-h).save(), (+h).save(), abs(h).save(),
            (h @ torch.ones(10, 3)).save(), (torch.ones(4, 1) @ h).save(), (h > 0).save(),
            (h >= 0).save(), (h < 0).save(), (h <= 0).save(), (h == h).save(), (h != 0).save(),
            ((h > 0) & (h < 1)).save(), ((h > 0) | (h < -1)).save(), ((h > 0) ^ (h < 1)).save(),
            (~(h > 0)).save(), h.sum(dim=-1).save(), h.mean().save(), h[:, 0].save(), h[0, 1:3].save(),
            h.T.save(), h.shape.save(), h.reshape(2, 5).save(),
        ]
    _, seen = hooked_run(net, x, read=("layer1",))
    v = seen["layer1"]
    expected = [
        v + 1, 1 + v, v - 2, 2 - v, v * 3, 3 * v, v / 2, 2 / (v.abs() + 1), v // 1, v % 2, v ** 2,
        2 ** v, -v, +v, abs(v), v @ torch.ones(10, 3), torch.ones(4, 1) @ v, v > 0, v >= 0, v < 0,
        v <= 0, v == v, v != 0, (v > 0) & (v < 1), (v > 0) | (v < -1), (v > 0) ^ (v < 1), ~(v > 0),
        v.sum(dim=-1), v.mean(), v[:, 0], v[0, 1:3], v.T, v.shape, v.reshape(2, 5),
    ]
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got.value, want)
        else:
            assert got.value == want


def test_torch_functions_dispatch_on_proxies(model: nnsight.NNsight, x: torch.Tensor, net: TinyNet) -> None:
    with model.trace(x):
        h = cast(torch.Tensor, model.layer1.output)
        total = cast(nnsight.Proxy, torch.sum(h)).save()
        soft = cast(nnsight.Proxy, torch.nn.functional.softmax(h, dim=-1)).save()
        cat = cast(nnsight.Proxy, torch.cat([h, torch.zeros(1, 10)], dim=0)).save()
        mixed = cast(nnsight.Proxy, torch.ones(1, 10).add(h)).save()
    _, seen = hooked_run(net, x, read=("layer1",))
    v = seen["layer1"]
    assert torch.equal(total.value, torch.sum(v))
    assert torch.equal(soft.value, torch.softmax(v, dim=-1))
    assert torch.equal(cat.value, torch.cat([v, torch.zeros(1, 10)]))
    assert torch.equal(mixed.value, torch.ones(1, 10).add(v))


def test_creation_functions_take_proxy_shapes(model: nnsight.NNsight, x: torch.Tensor) -> None:
    # nnsight 0.4 patched these globally; here __torch_function__ alone suffices.
    with model.trace(x):
        h = model.layer1.output
        shape = cast(Any, h.shape)
        made = [
            torch.arange(shape[0], shape[1]), torch.empty(shape), torch.eye(shape[0]), torch.full(shape, 5),
            torch.linspace(shape[0], shape[1], 5), torch.logspace(shape[0], shape[1], 5), torch.ones(shape),
            torch.rand(shape), torch.randint(5, shape), torch.randn(shape), torch.randperm(shape[0]),
            torch.zeros(shape), torch.zeros_like(cast(torch.Tensor, h)), torch.zeros((shape[0], 3)),
        ]
        saved = [cast(nnsight.Proxy, tensor).save() for tensor in made]
    shapes = [tuple(p.value.shape) for p in saved]
    assert shapes == [
        (9,), (1, 10), (1, 1), (1, 10), (5,), (5,), (1, 10), (1, 10), (1, 10), (1, 10), (1,), (1, 10), (1, 10), (1, 3)
    ]
    assert torch.equal(saved[3].value, torch.full((1, 10), 5))


def test_setting_example_from_nnsight_readme(model: nnsight.NNsight, x: torch.Tensor) -> None:
    # nnsight 0.4 README, "Setting": noise added through the .output setter.
    torch.manual_seed(7)
    with model.trace(x):
        pre = model.layer1.output.clone().save()
        noise = (0.001 ** 0.5) * torch.randn(pre.shape)
        model.layer1.output = pre + noise
        post = model.layer1.output.save()
    assert pre.value.shape == post.value.shape == (1, 10)
    assert not torch.equal(pre.value, post.value)
    assert torch.allclose(pre.value, post.value, atol=0.2)


def test_adhoc_module_call(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        again = model.layer2(model.layer1.output).save()
        doubled = model.layer2(model.layer1.output * 2).save()
    _, seen = hooked_run(net, x, read=("layer1", "layer2"))
    assert torch.equal(again.value, seen["layer2"])
    assert torch.equal(doubled.value, net.layer2(seen["layer1"] * 2))


def test_adhoc_call_does_not_fire_hooks_or_count(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    # hook=False bypasses hooks: layer2's call index 0 is still the model's own call.
    with model.trace(x):
        fake = model.layer2(torch.zeros(1, 10))
        real = model.layer2.output.save()
        fake_saved = fake.save()
    assert torch.equal(real.value, net(x))
    assert torch.equal(fake_saved.value, net.layer2.bias.expand(1, 2))


def test_weights_are_read_as_clones(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    snapshot = parameters_snapshot(net)
    with model.trace(x):
        weight = model.layer1.weight.save()
        model.layer1.weight[:] = 0
        bias = model.layer1.bias
        manual = (model.layer1.input @ model.layer1.weight.T + bias).save()
        real = model.layer1.output.save()
    assert same_parameters(net, snapshot)
    assert torch.equal(weight.value, net.layer1.weight)
    assert weight.value is not net.layer1.weight
    assert torch.allclose(manual.value, real.value)
    assert isinstance(model.layer1.weight, torch.nn.Parameter)  # outside a trace: the real one


def test_non_tensor_attributes_pass_through(model: nnsight.NNsight) -> None:
    assert model.layer1.in_features == 5
    with model.trace(torch.rand(1, 5)):
        assert model.layer1.out_features == 10


def test_stop_after_a_module(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        l1 = model.layer1.output.save()
        model.layer1.output.stop()
        l2 = model.layer2.output.save()
    assert l1.value.shape == (1, 10)
    with pytest.raises(ValueError, match="stopped early"):
        _ = l2.value


def test_tracer_stop(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        l1 = model.layer1.output.save()
        tracer.stop()
        after = (model.layer1.output + 1).save()
    assert l1.value.shape == (1, 10)
    with pytest.raises(ValueError, match="stopped early"):
        _ = after.value


def test_stop_before_any_access_never_runs_the_model(net: TinyNet, x: torch.Tensor) -> None:
    calls = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        model = nnsight.NNsight(net)
        with model.trace(x) as tracer:
            tracer.stop()
            out = model.output.save()
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match="stopped early"):
        _ = out.value


def test_trace_false_returns_output(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    assert torch.equal(model.trace(x, trace=False), net(x))


def test_method_kwargs_reach_the_model(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    with gpt2.trace(ids, output_hidden_states=True):
        hidden = gpt2.output.hidden_states.save()
    assert len(hidden.value) == 3


def test_get_by_path(model: nnsight.NNsight, x: torch.Tensor) -> None:
    assert model.get("layer1") is model.layer1
    with model.trace(x):
        out = model.get("layer1.output").save()
    assert out.value.shape == (1, 10)


def test_saved_proxy_behaves_like_its_value_after_the_trace(
    model: nnsight.NNsight, x: torch.Tensor, net: TinyNet
) -> None:
    with model.trace(x):
        h = model.layer1.output.save()
    v = h.value
    assert torch.equal(h + 1, v + 1)
    assert torch.equal(2 * h, 2 * v)
    assert torch.equal(h[:, 0], v[:, 0])
    assert torch.equal(torch.sum(cast(torch.Tensor, h)), torch.sum(v))
    assert h.shape == v.shape
    assert str(h) == str(v) and repr(h) == repr(v)
    assert f"{h[0, 0]:.3f}" == f"{v[0, 0]:.3f}"
    assert bool(h.sum() > -100)
    assert len(h) == 1


def test_a_saved_value_patches_a_later_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    other = torch.rand(1, 5)
    with model.trace(other):
        donor = model.layer1.output.save()
    with model.trace(x):
        model.layer1.output = donor
        out = model.output.save()
    assert torch.equal(out.value, net.layer2(net.layer1(other)))


def test_hooks_only_during_the_run_and_user_hooks_untouched(net: TinyNet, x: torch.Tensor) -> None:
    fired = []
    mine = net.layer2.register_forward_hook(lambda m, i, o: fired.append(o.clone()))
    before = hook_counts(net)
    model = nnsight.NNsight(net)
    with model.trace(x):
        assert hook_counts(net) == before  # nothing installed while recording
        model.layer2.output = model.layer2.output * 0
        out = model.output.save()
    assert hook_counts(net) == before
    assert len(fired) == 1 and torch.equal(fired[0], torch.zeros(1, 2))  # ours ran first (prepended)
    assert torch.equal(out.value, torch.zeros(1, 2))
    mine.remove()


def test_repeated_access_is_one_node(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        a = model.layer1.output
        b = model.layer1.output
        model.layer1.output = a + 1
        c = model.layer1.output
    graph = tracer.graph
    assert a._ref == b._ref != c._ref
    assert len([n for n in graph if type(n.op).__name__ == "ModuleGet"]) == 2


def test_method_call_is_one_node(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        model.layer1.output.sum(dim=0).save()
    assert [type(n.op).__name__ for n in tracer.graph] == ["ModuleGet", "CallMethod", "Save"]
    assert "%0.sum(dim=0)" in repr(tracer.graph)


def test_rename_is_envoy_level_only(net: TinyNet, x: torch.Tensor) -> None:
    keys = set(net.state_dict())
    model = nnsight.NNsight(net, rename={"layer1": "first"})
    assert set(net.state_dict()) == keys
    assert not hasattr(net, "first")
    with model.trace(x):
        via_alias = model.first.output.save()
    assert torch.equal(via_alias.value, net.layer1(x))
    assert model.first.path == ".first"
    assert "(first): Linear" in repr(model)


def test_modulelist_indexing_and_output(gpt2: nnsight.NNsight, gpt2_module: Any, ids: torch.Tensor) -> None:
    h = gpt2.transformer.h
    assert len(h) == 2 and h[-1] is h[1] and [e.path for e in h] == [".transformer.h.0", ".transformer.h.1"]
    with gpt2.trace(ids):
        last = gpt2.transformer.h[-1].output.save()
        both = gpt2.transformer.h.output.save()
    _, seen = hooked_run(gpt2_module, ids, read=("transformer.h.0", "transformer.h.1"))
    assert torch.equal(last.value, seen["transformer.h.1"])
    expected = [seen["transformer.h.0"], seen["transformer.h.1"]]
    assert [torch.equal(a, b) for a, b in zip(both.value, expected)] == [True, True]


def test_envoy_call_outside_a_trace_runs_the_module(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    assert torch.equal(model.layer1(x), net.layer1(x))
    assert torch.equal(model(x), net(x))


def test_to_and_device(model: nnsight.NNsight) -> None:
    assert model.to("cpu") is model
    assert model.device == torch.device("cpu")


def test_values_of_a_graph_run_twice_are_equal(model: nnsight.NNsight, x: torch.Tensor) -> None:
    def once() -> torch.Tensor:
        with model.trace(x):
            model.layer1.output[:, 0] = 1
            out = model.output.save()
        return cast(torch.Tensor, out.value)

    assert torch.equal(once(), once())


def test_setattr_and_delitem_record(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        out = model.output
        out.custom_flag = True
        out.save()
    assert [type(n.op).__name__ for n in tracer.graph][:2] == ["ModuleGet", "SetAttr"]
    assert getattr(out.value, "custom_flag") is True
    assert operator.index(torch.tensor(3)) == 3


def test_an_empty_trace_still_runs_the_model_once(net: TinyNet, x: torch.Tensor) -> None:
    calls: list[int] = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(1))
    with nnsight.NNsight(net).trace(x):
        pass
    handle.remove()
    assert calls == [1]
