"""``envoy.skip(value)``: a module call that does not run, ``value`` its output.

Every run is compared with the same model whose module was replaced by hand
(a module returning the skip value), and the skipped forward is shown not
to run by counting the calls of a module inside it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests import lm_models
from tests.helpers import TinyNet, tiny_net

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Outer(torch.nn.Module):
    """A module (``inner``) with modules inside it, and a head after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.inner = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.ReLU())
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.inner(x))
        return out


class Pair(torch.nn.Module):
    """A model whose ``block`` returns a tuple ``(hidden, extra)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.block = Block()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, extra = self.block(x)
        out: torch.Tensor = self.head(hidden) + extra
        return out


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x.sum(-1, keepdim=True)


class Constant(torch.nn.Module):
    """What a skipped module is replaced by, by hand: returns a fixed value."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


def _counting(module: torch.nn.Module) -> list[int]:
    """A list that grows by one at each call of ``module``."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _no_forwards_left(root: torch.nn.Module) -> bool:
    return all("forward" not in module.__dict__ for module in root.modules())


@pytest.fixture
def x3() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(3, 5)


# --- one invoke --------------------------------------------------------------------------


def test_skip_equals_the_module_replaced_by_hand(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    value = torch.full((3, 10), 0.5)
    with model.trace(x3):
        model.layer1.skip(value)
        skipped = model.layer1.output.save()
        out = model.output.save()
    by_hand = torch.nn.Sequential(Constant(value), tiny_net().layer2)
    assert torch.equal(skipped.value, value)
    assert torch.allclose(out.value, by_hand(x3))
    assert not torch.allclose(out.value, net(x3))  # (the skip changed something)
    assert _no_forwards_left(net)


def test_the_skipped_forward_and_the_modules_inside_it_do_not_run(x3: torch.Tensor) -> None:
    outer = Outer()
    inside = _counting(outer.inner[0])
    model = nnsight.NNsight(outer)
    with model.trace(x3):
        model.inner.skip(torch.ones(3, 5))
        out = model.output.save()
    assert inside == []
    assert torch.allclose(out.value, outer.head(torch.ones(3, 5)))
    with model.trace(x3):
        out = model.output.save()
    assert inside == [1] and torch.allclose(out.value, outer(x3))


def test_the_value_may_use_the_modules_own_input(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3):
        model.layer2.skip(model.layer2.input[:, :2] * 3)
        out = model.output.save()
    assert torch.allclose(out.value, net.layer1(x3)[:, :2] * 3)


def test_a_value_from_an_earlier_module(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3):
        model.layer2.skip(model.layer1.output[:, 2:4] - 1)
        out = model.output.save()
    assert torch.allclose(out.value, net.layer1(x3)[:, 2:4] - 1)


def test_a_tuple_output_is_replaced_by_a_tuple(x3: torch.Tensor) -> None:
    pair = Pair()
    model = nnsight.NNsight(pair)
    x = x3[:, :4]
    with model.trace(x):
        hidden = model.block.input * 2
        model.block.skip((hidden, torch.zeros(3, 1)))
        out = model.output.save()
    assert torch.allclose(out.value, pair.head(x * 2))


def test_a_skip_after_a_later_modules_output_is_out_of_order(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(nnsight.OutOfOrderError, match="moved past the start of model.layer1's call(?s:.*)skip model"):
        with model.trace(x3):
            late = model.layer2.output
            model.layer1.skip(late.sum() * torch.zeros(3, 10))
    with pytest.raises(nnsight.OutOfOrderError):
        with model.trace(x3):
            model.layer2.output.save()
            model.layer1.skip(torch.zeros(3, 10))
    assert _no_forwards_left(model._module)


def test_an_access_inside_a_skipped_module_warns_and_has_no_value(x3: torch.Tensor) -> None:
    model = nnsight.NNsight(Outer())
    with pytest.warns(nnsight.UnexecutedInterventionWarning, match="inside model.inner, which was skipped"):
        with model.trace(x3):
            model.inner.skip(torch.ones(3, 5))
            never = model.inner[0].output.save()
    with pytest.raises(ValueError, match="never reached"):
        never.value
    findings = nnsight.check(model, nnsight.trace(model, lambda m: (m.inner.skip(torch.ones(3, 5)),
                                                                      m.inner[0].output.save())), x3)
    assert [f.kind for f in findings] == ["not_called"] and "skips that call" in str(findings[0])


def test_check_reports_an_access_inside_a_skip_of_one_invoke(x3: torch.Tensor) -> None:
    model = nnsight.NNsight(Outer())
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            model.inner.skip(torch.ones(1, 5))
            model.inner[0].output.save()  # (the forward runs for invoke 1: rows the skip discards)
        with tracer.invoke(x3[1:]):
            model.inner[0].output.save()
    findings = nnsight.check(model, tracer.graph, invokes=[((x3[:1],), {}), ((x3[1:],), {})])
    assert [(f.kind, tracer.graph.nodes[f.node].invoke) for f in findings] == [("not_called", 0)]


def test_skip_on_a_module_list_is_an_error(x3: torch.Tensor) -> None:
    model = nnsight.NNsight(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(5, 5)])))
    with pytest.raises(nnsight.TraceError, match="ModuleList"):
        with model.trace(x3):
            model[0].skip(x3)


def test_the_graph_prints_the_skip(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3) as tracer:
        model.layer1.skip(model.layer1.input.repeat(1, 2) * 0)
    assert "skip model.layer1 with %" in str(tracer.graph)
    assert 'label="Skip"' in nnsight.to_dot(tracer.graph)


class Twice(torch.nn.Module):
    """A model that calls the same module twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.step = torch.nn.Linear(4, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.step(self.step(h))
        return out


def test_a_constant_skip_in_a_loop_over_calls(x3: torch.Tensor) -> None:
    twice = Twice()
    model = nnsight.NNsight(twice)
    h = x3[:, :4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a body with only a skip does touch its scope's calls)
        with model.trace(h) as tracer:
            with model.step.all():
                model.step.skip(torch.ones(3, 4))
            out = model.output.save()
    assert torch.equal(out.value, torch.ones(3, 4))
    assert list(nnsight.check(model, tracer.graph, h)) == []
    with model.trace(h):
        model.step.next().skip(model.step.input * -1)  # the second call only
        out = model.output.save()
    assert torch.allclose(out.value, -twice.step(h))


def test_skipping_the_whole_model(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    inside = _counting(net.layer1)
    with model.trace(x3):
        model.skip(x3[:, :2] * 3)
        out = model.output.save()
    assert torch.equal(out.value, x3[:, :2] * 3) and inside == [] and _no_forwards_left(net)


# --- invokes -----------------------------------------------------------------------------


def test_a_skip_in_one_invoke_leaves_the_others_computed(net: TinyNet, model: nnsight.NNsight,
                                                         x3: torch.Tensor) -> None:
    calls = _counting(net.layer1)
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            model.layer1.skip(torch.zeros(1, 10))
            first = model.output.save()
        with tracer.invoke(x3[1:]):
            rest = model.output.save()
    assert len(calls) == 1  # one call, on the whole batch
    assert torch.allclose(first.value, net.layer2(torch.zeros(1, 10)))
    assert torch.allclose(rest.value, net(x3[1:]))


def test_skips_of_every_invoke_join_and_the_forward_does_not_run(net: TinyNet, model: nnsight.NNsight,
                                                                 x3: torch.Tensor) -> None:
    hooked = _counting(net.layer1)
    ran: list[int] = []
    original = net.layer1.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        ran.append(1)
        return original(*args, **kwargs)

    net.layer1.forward = counted  # type: ignore[method-assign]
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            model.layer1.skip(torch.zeros(1, 10))
        with tracer.invoke(x3[1:]):
            model.layer1.skip(torch.ones(1, 10))  # one row, spread over the invoke's two
            both = model.layer1.output.save()
        whole = model.output.save()
    assert len(hooked) == 1 and ran == []  # the call happened (its hooks ran), its forward did not
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            model.layer1.skip(torch.zeros(1, 10))
        with tracer.invoke(x3[1:]):
            pass
    assert len(hooked) == 2 and ran == [1]  # (one invoke left: the forward runs for its rows)
    del net.layer1.forward
    expected = torch.cat([torch.zeros(1, 10), torch.ones(2, 10)])
    assert torch.equal(both.value, torch.ones(2, 10))
    assert torch.allclose(whole.value, net.layer2(expected))


def test_skips_in_some_invokes_merge_with_the_computed_rows(net: TinyNet, model: nnsight.NNsight,
                                                            x3: torch.Tensor) -> None:
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            model.layer1.skip(torch.zeros(1, 10))
        with tracer.invoke(x3[1:2]):
            pass
        with tracer.invoke(x3[2:]):
            model.layer1.skip(torch.ones(1, 10))
        hidden = model.layer1.output.save()
    assert torch.allclose(hidden.value, torch.cat([torch.zeros(1, 10), net.layer1(x3[1:2]), torch.ones(1, 10)]))


def test_a_wrong_shape_in_one_invoke_names_the_skip(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"model.layer1.skip\(...\): invoke 0 owns 1 row"):
        with model.trace() as tracer:
            with tracer.invoke(x3[:1]):
                model.layer1.skip(torch.zeros(1, 7))
            with tracer.invoke(x3[1:]):
                pass


# --- the forward wrapper: what was there before, interrupts, threads -----------------------


def test_an_instance_forward_is_wrapped_and_restored_exactly(net: TinyNet, model: nnsight.NNsight,
                                                             x3: torch.Tensor) -> None:
    seen: list[int] = []
    original = net.layer1.forward

    def accelerated(*args: Any, **kwargs: Any) -> Any:  # (as accelerate's hooks set it)
        seen.append(1)
        return original(*args, **kwargs)

    net.layer1.forward = accelerated  # type: ignore[method-assign]
    try:
        with model.trace() as tracer:
            with tracer.invoke(x3[:1]):
                model.layer1.skip(torch.zeros(1, 10))
            with tracer.invoke(x3[1:]):
                rest = model.layer1.output.save()
        assert net.layer1.__dict__["forward"] is accelerated
        assert seen == [1] and torch.allclose(rest.value, original(x3[1:]))
        with model.trace(x3):
            model.layer1.skip(torch.zeros(3, 10))
        assert seen == [1] and net.layer1.__dict__["forward"] is accelerated
        with pytest.raises(nnsight.OutOfOrderError):
            with model.trace(x3):
                model.layer2.output.save()
                model.layer1.skip(torch.zeros(3, 10))
        assert net.layer1.__dict__["forward"] is accelerated
    finally:
        del net.layer1.forward
    assert _no_forwards_left(net)


def test_a_failing_run_leaves_no_wrapped_forward(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(RuntimeError):
        with model.trace(x3):
            model.layer1.skip(torch.zeros(3, 4))  # layer2 cannot take it
    assert _no_forwards_left(net)


def test_another_threads_call_runs_the_real_forward(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    found: dict[str, torch.Tensor] = {}

    def call_in_a_thread(value: torch.Tensor) -> torch.Tensor:
        worker = threading.Thread(target=lambda: found.setdefault("other", net(x3)))
        worker.start()
        worker.join()
        return value

    with model.trace(x3):
        model.layer1.skip(nnsight.apply(call_in_a_thread, torch.zeros(3, 10)))
        out = model.output.save()
    assert torch.allclose(found["other"], tiny_net()(x3))  # the other thread's layer1 ran
    assert torch.allclose(out.value, net.layer2(torch.zeros(3, 10)))


_INTERRUPTS = """
import json, random, signal, time, torch
import nnsight_pure as nnsight
from nnsight_pure import open_blocks as active
from tests.helpers import tiny_net
torch.set_num_threads(1)
random.seed(5)
net = tiny_net()
model = nnsight.NNsight(net)
x = torch.rand(2, 5)
def one():
    with model.trace() as tracer:
        with tracer.invoke(x[:1]):
            model.layer1.skip(model.layer1.input[:, :1].expand(1, 10) * 2)
        with tracer.invoke(x[1:]):
            model.layer2.skip(model.layer2.input[:, :2])
        model.output.save()
start = time.perf_counter()
for _ in range(20):
    one()
per = (time.perf_counter() - start) / 20
def alarm(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, alarm)
found = {"interrupted": 0, "forwards_left": 0, "hooks_left": 0}
for _ in range(300):
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, per * 1.3))
            one()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        found["interrupted"] += 1
    if any("forward" in m.__dict__ for m in net.modules()):
        found["forwards_left"] += 1
        for m in net.modules():
            m.__dict__.pop("forward", None)
    if any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()):
        found["hooks_left"] += 1
        for m in net.modules():
            m._forward_hooks.clear(); m._forward_pre_hooks.clear()
    for context in active.open_contexts()[:1]:
        active.remove(context)
print(json.dumps(found))
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs SIGALRM")
def test_random_interrupts_leave_no_wrapped_forward() -> None:
    done = subprocess.run([sys.executable, "-c", _INTERRUPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["interrupted"] >= 50, found
    assert (found["forwards_left"], found["hooks_left"]) == (0, 0), found


# --- edits, documents, checks ------------------------------------------------------------


def test_an_edit_with_a_skip(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.edit() as edited:
        model.layer1.skip(model.layer1.input[:, :1].expand(-1, 10))
    expected = net.layer2(x3[:, :1].expand(-1, 10))
    with edited.trace(x3):
        out = model.output.save()
    assert torch.allclose(out.value, expected)
    with model.trace(x3):
        plain = model.output.save()
    assert torch.allclose(plain.value, net(x3))
    with model.edit(inplace=True):
        model.layer1.skip(model.layer1.input[:, :1].expand(-1, 10))
    try:
        with model.trace(x3):
            out = model.output.save()
        assert torch.allclose(out.value, expected)
    finally:
        model.clear_edits()
    assert _no_forwards_left(net)


def test_a_skip_through_json_and_replay(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    def skipping(m: Any) -> Any:
        m.layer1.skip(m.layer1.input[:, 1:3].repeat(1, 5))
        return m.output.save()

    graph = nnsight.trace(model, skipping)
    again = nnsight.from_json(nnsight.to_json(graph))
    assert again == graph
    y = x3 * 2
    out = nnsight.run(model, again, y).outputs
    assert torch.allclose(out, net.layer2(y[:, 1:3].repeat(1, 5)))


def test_check_and_validate_treat_a_skip_as_a_write(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    def late(m: Any) -> None:
        m.layer1.skip(m.layer2.output.sum() * torch.zeros(3, 10))

    findings = nnsight.check(model, nnsight.trace(model, late), x3)
    assert [f.kind for f in findings] == ["out_of_order"] and "model.layer1.skip" in str(findings[0])
    good = nnsight.trace(model, lambda m: m.layer1.skip(m.layer1.input[:, :1].expand(-1, 10)))
    assert list(nnsight.check(model, good, x3)) == []
    with pytest.raises(Exception, match=r"replaced by .skip\(...\)\) has shape \(3, 10\)"):
        with model.trace(x3, validate=True):
            model.layer1.skip(torch.zeros(3, 7))
    pair = nnsight.NNsight(Pair())
    with pytest.raises(Exception, match="returns a tuple, but the skip value is a Tensor"):
        with pair.trace(x3[:, :4], validate=True):
            pair.block.skip(torch.zeros(3, 4))


def test_a_scan_sees_the_skip_value(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.scan(x3):
        model.layer1.skip(torch.zeros(3, 10, dtype=torch.float64))
        dtype = model.layer1.output.dtype
    assert dtype == torch.float64


# --- generation: one skip per step --------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm_models.save("gpt2", tmp_path_factory.mktemp("tiny-gpt2-skip"))


class PassOn(torch.nn.Module):
    """A GPT-2 block replaced by hand: at the calls ``steps`` (all when ``None``)
    its output is its input hidden state; otherwise the block runs."""

    def __init__(self, block: torch.nn.Module, steps: set[int] | None) -> None:
        super().__init__()
        self.block = block
        self.steps = steps
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call, self.calls = self.calls, self.calls + 1
        if self.steps is None or call in self.steps:
            return (hidden_states,) if lm_models.BLOCKS_RETURN_TUPLES else hidden_states
        return self.block(hidden_states, *args, **kwargs)


def _by_hand(folder: Path, prompt: str, steps: set[int] | None, new: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The generated ids and each step's logits (lm_head's output) of the
    model with block 1 replaced by `PassOn`."""
    hf = lm_models.plain(folder)
    hf.transformer.h[1] = PassOn(hf.transformer.h[1], steps)
    logits: list[torch.Tensor] = []
    hf.lm_head.register_forward_hook(lambda module, args, out: logits.append(out))
    return lm_models.greedy(hf, lm_models.encode(hf_tokenizer(folder), prompt), new), logits


def hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _same_structure(value: Any) -> Any:
    """A hidden state as block 1 returns it (a tuple under transformers 4)."""
    return (value[0],) if lm_models.BLOCKS_RETURN_TUPLES else value


def _logits_of(lm: nnsight.LanguageModel, body: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate 3 tokens with ``body()`` written in the block: the ids, and
    each step's logits (seen by a hook of our own on lm_head, so the programs'
    order does not matter)."""
    lm.dispatch()
    logits: list[torch.Tensor] = []
    handle = lm.lm_head._module.register_forward_hook(lambda module, args, out: logits.append(out))
    try:
        with lm.generate("The city of", max_new_tokens=3):
            body()
            ids = lm.generator.output.save()
    finally:
        handle.remove()
    return ids.value, logits


def test_skip_at_every_generation_step(folder: Path) -> None:
    lm = nnsight.LanguageModel(str(folder))

    def every_step() -> None:
        with lm.transformer.h[1].all():
            lm.transformer.h[1].skip(_same_structure(lm.transformer.h[1].input))  # block 0's hidden state

    ids, logits = _logits_of(lm, every_step)
    _, plain = _logits_of(lm, lambda: None)
    expected_ids, expected = _by_hand(folder, "The city of", None, 3)
    assert torch.equal(ids, expected_ids) and len(logits) == len(expected) == 3
    for step in range(3):
        assert torch.allclose(logits[step], expected[step], atol=1e-5)
        assert not torch.allclose(plain[step], expected[step], atol=1e-3)
    assert "forward" not in lm.transformer.h[1]._module.__dict__


def test_skip_at_some_steps_with_iter_and_next(folder: Path) -> None:
    lm = nnsight.LanguageModel(str(folder))
    block = lm.transformer.h[1]

    def by_iter() -> None:
        with block.iter[0:3:2]:
            block.skip(_same_structure(block.input))

    def by_next() -> None:
        block.skip(_same_structure(block.input))
        block.next().next().skip(_same_structure(block.input))

    def first_only() -> None:
        block.skip(_same_structure(block.input))

    _, expected = _by_hand(folder, "The city of", {0, 2}, 3)
    _, expected_first = _by_hand(folder, "The city of", {0}, 3)
    assert not torch.allclose(expected[2], expected_first[2], atol=1e-3)  # (the by-hand models differ)
    for body, wanted in ((by_iter, expected), (by_next, expected), (first_only, expected_first)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, got = _logits_of(lm, body)
        assert len(got) == 3
        for step in range(3):
            assert torch.allclose(got[step], wanted[step], atol=1e-5), (body.__name__, step)
