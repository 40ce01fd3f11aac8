"""The straight run (interpreter/straight.py) against the general fold.

Every graph of the battery runs twice: as the library picks (the straight
run when the plan allows it) and with the straight run turned off (the
general fold and scheduler). Everything a run leaves must be the same: the
saved values, the model's output, the warnings, the error and its notes,
and no hook left behind. Each case also says which way it must go, so
that the battery keeps covering both (a fallback case that went straight,
or the reverse, fails), and a few are checked against plain torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.interpreter import run as run_module
from nnsight_pure.interpreter import straight
from nnsight_pure.plan import plan_for
from tests.helpers import tiny_net

Case = Callable[[nnsight.NNsight, torch.Tensor], list[Any]]


def _save_output(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        hidden = model.layer1.output.save()
    return [hidden]


def _save_all_kinds(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        first = model.layer1.input.save()
        inputs = model.layer2.inputs.save()
        out = model.layer2.output.save()
        total = (model.layer1.output.sum() * 2).save()
    return [first, inputs, out, total]


def _write_in_place(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        model.layer1.output[:, :3] = 0
        out = model.layer2.output.save()
    return [out]


def _set_output(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        out = model.output.save()
    return [out]


def _set_input(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        model.layer2.input = model.layer2.input + 1
        out = model.layer2.output.save()
    return [out]


def _read_backwards(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        late = model.layer2.output.save()
        early = model.layer1.output.save()  # kept for its reader since its call
    return [late, early]


def _read_twice(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        a = model.layer1.output
        model.layer2.output.save()
        b = model.layer1.output
        total = (a + b).save()
    return [total]


def _write_after_later_read(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        model.layer2.output.save()
        model.layer1.output = model.layer1.output * 0  # layer1 ran before layer2: out of order
    return []


def _write_in_place_after_later_read(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        hidden = model.layer1.output
        model.layer2.output.save()
        hidden[:] = 0  # in place, outside layer1's call
    return []


def _write_never_executed(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        out = model.layer2.output.save()
        model.layer1.next().output = torch.zeros(1, 10)  # layer1 is called once
        never = model.layer2.output.save()
    return [out, never]


def _error_in_op(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        (model.layer1.output @ torch.ones(3, 3)).save()
    return []


def _result(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x) as tracer:
        hidden = model.layer1.output.save()
        returned = tracer.result.save()
    return [hidden, returned]


def _replay(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    graph = nnsight.trace(model, lambda m: {"h": m.layer1.output, "o": m.layer2.output * 3})
    first = nnsight.run(model, graph, x).outputs
    second = nnsight.run(model, graph, x + 1).outputs
    return [first, second]


def _replay_with_write(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    def fn(m: Any) -> Any:
        m.layer1.output = m.layer1.output.clamp(min=0.1)
        return m.output

    graph = nnsight.trace(model, fn)
    return [nnsight.run(model, graph, x).outputs, nnsight.run(model, graph, -x).outputs]


# --- cases the straight run must leave to the general fold ---------------------------


def _two_invokes(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace() as tracer:
        with tracer.invoke(x):
            a = model.layer1.output.save()
        with tracer.invoke(x * 2):
            b = model.layer2.output.save()
    return [a, b]


def _stop(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        hidden = model.layer1.output.save()
        model.layer1.output.stop()
        never = model.layer2.output.save()
    return [hidden, never]


def _cond(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > -1e9):
            out = model.layer2.output.save()
    return [out]


def _skip(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        model.layer1.skip(torch.zeros(1, 10))
        out = model.layer2.output.save()
    return [out]


def _cache(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x) as tracer:
        cache = tracer.cache()
    return [cache["layer1"].output, cache["layer2"].output]


def _grad(model: nnsight.NNsight, x: torch.Tensor) -> list[Any]:
    with model.trace(x):
        grad = model.layer1.output.grad.save()
        model.output.sum().backward()
    return [grad]


STRAIGHT: dict[str, Case] = {
    "save_output": _save_output, "save_all_kinds": _save_all_kinds, "write_in_place": _write_in_place,
    "set_output": _set_output, "set_input": _set_input, "read_backwards": _read_backwards,
    "read_twice": _read_twice, "write_after_later_read": _write_after_later_read,
    "write_in_place_after_later_read": _write_in_place_after_later_read,
    "write_never_executed": _write_never_executed, "error_in_op": _error_in_op, "result": _result,
    "replay": _replay, "replay_with_write": _replay_with_write,
}
GENERAL: dict[str, Case] = {
    "two_invokes": _two_invokes, "stop": _stop, "cond": _cond, "skip": _skip, "cache": _cache, "grad": _grad,
}


def _plain(value: Any) -> Any:
    """A saved value (or a proxy's, or why it has none) as comparable data."""
    if hasattr(value, "value") and not isinstance(value, torch.Tensor):
        try:
            value = value.value
        except Exception as error:  # no value: compare why
            return ("no value", type(error).__name__, str(error))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().tolist())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _observe(case: Case, straight_allowed: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[bool]]:
    """Run ``case`` on a fresh model: what it left, and which way each run went."""
    went: list[bool] = []
    real = straight.straight_run

    def chosen(*args: Any) -> Any:
        picked = real(*args) if straight_allowed else None
        went.append(picked is not None)
        return picked

    monkeypatch.setattr(run_module, "straight_run", chosen)
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome: Any = ("ok", _plain(case(model, x)))
        except Exception as error:
            outcome = ("raised", type(error).__name__, str(error), list(getattr(error, "__notes__", [])))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    seen = [(w.category.__name__, str(w.message)) for w in caught]
    weights = [p.detach().tolist() for p in net.parameters()]
    monkeypatch.undo()
    return (outcome, seen, hooks, weights), went


@pytest.mark.parametrize("name", sorted(STRAIGHT))
def test_straight_cases_match_the_general_fold(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, went_fast = _observe(STRAIGHT[name], True, monkeypatch)
    slow, went_slow = _observe(STRAIGHT[name], False, monkeypatch)
    assert went_fast and all(went_fast), "this case must take the straight run"
    assert not any(went_slow)
    assert fast == slow
    assert fast[2] == 0  # no hook left behind


@pytest.mark.parametrize("name", sorted(GENERAL))
def test_other_plans_fall_back_to_the_general_fold(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, went = _observe(GENERAL[name], True, monkeypatch)
    slow, _ = _observe(GENERAL[name], False, monkeypatch)
    assert went and not any(went), "this case must fall back to the general fold"
    assert fast == slow


def test_the_battery_sees_what_it_should(monkeypatch: pytest.MonkeyPatch) -> None:
    """The outcomes compared above are the real ones (checked by hand in plain
    torch), so the comparison is not between two empty runs."""
    net = tiny_net()
    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(7))
    hidden = net.layer1(x)
    outcome, seen, hooks, _ = _observe(_save_output, True, monkeypatch)[0]
    assert outcome == ("ok", [("tensor", hidden.detach().tolist())]) and not seen and hooks == 0
    doubled = net.layer2(hidden * 2)
    assert _observe(_set_output, True, monkeypatch)[0][0] == ("ok", [("tensor", doubled.detach().tolist())])
    backwards = _observe(_read_backwards, True, monkeypatch)[0][0]
    assert backwards == ("ok", [("tensor", net.layer2(hidden).detach().tolist()), ("tensor", hidden.detach().tolist())])
    out_of_order = _observe(_write_after_later_read, True, monkeypatch)[0][0]
    assert out_of_order[0] == "raised" and out_of_order[1] == "OutOfOrderError"
    never = _observe(_write_never_executed, True, monkeypatch)[0]
    assert any(category == "UnexecutedInterventionWarning" for category, _ in never[1])
    error = _observe(_error_in_op, True, monkeypatch)[0][0]
    assert error[0] == "raised" and error[3], "the error names the user's line"


def test_straight_steps_are_worked_out_once_per_plan() -> None:
    model = nnsight.NNsight(tiny_net())
    graph = nnsight.trace(model, lambda m: m.layer1.output)
    plan = plan_for(graph)
    steps = straight.straight_steps(plan)
    assert steps is not None and straight.straight_steps(plan) is steps


def test_a_straight_replay_keeps_nothing_alive_by_itself() -> None:
    """The straight run holds no cycle: with the garbage collector off, a
    replay's saved value dies with its results."""
    import gc
    import weakref

    model = nnsight.NNsight(tiny_net())
    graph = nnsight.trace(model, lambda m: m.layer1.output)
    x = torch.rand(1, 5)
    gc.collect()
    gc.disable()
    try:
        results = nnsight.run(model, graph, x)
        ref = weakref.ref(results.outputs)
        del results
        assert ref() is None
    finally:
        gc.enable()


def test_gpt2_saves_and_an_edit_go_straight_and_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPT-2-shaped model: block outputs saved, one block's hidden state
    zeroed in place; the straight run and the general fold agree, and the
    zeroed logits are those of plain torch with the same edit by hook."""
    from tests.helpers import tiny_gpt2

    net = tiny_gpt2()
    model = nnsight.NNsight(net)
    ids = torch.tensor([[1, 5, 7, 9]])

    def fn(m: Any) -> Any:
        first = m.transformer.h[0].output
        first[0][:] = 0
        saved = [first, m.transformer.h[1].output]
        return {"blocks": saved, "logits": m.lm_head.output}

    graph = nnsight.trace(model, fn)
    assert plan_for(graph).straight is not None
    fast = _plain(nnsight.run(model, graph, ids).outputs)
    monkeypatch.setattr(run_module, "straight_run", lambda *args: None)
    slow = _plain(nnsight.run(model, graph, ids).outputs)
    assert fast == slow

    def zero(module: torch.nn.Module, args: Any, output: Any) -> Any:
        output[0][:] = 0
        return output

    handle = net.transformer.h[0].register_forward_hook(zero)
    try:
        expected = net(ids).logits
    finally:
        handle.remove()
    assert fast["logits"] == _plain(expected)
