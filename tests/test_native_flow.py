"""Native ``if``/``elif``/``else`` and ``for`` on proxies (nnsight 0.4's control-flow handling).

Each form is checked against plain torch, and its graph against the explicit
form (``tracer.cond`` with ``cond.else_``, ``session.iter``) with ``==``.
Also: generation steps, threads, a user's trace function, IPython cells, the
errors, and ``CONFIG.APP.CONTROL_FLOW_HANDLING = False``.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.serialize import from_json, to_json
from nnsight_pure.vis import to_dot
from tests import lm_models
from tests.helpers import TinyNet


def _rule(h: torch.Tensor, t: float) -> int:
    """What the branches below pick, in plain torch."""
    return 1 if h[0, 0] > t else 2 if h[0, 1] > t else 3


@pytest.fixture(autouse=True)
def _no_trace_left() -> Iterator[None]:
    """Every test ends with the trace function it started with (none)."""
    before = sys.gettrace()
    yield
    assert sys.gettrace() is before


# --- if / elif / else --------------------------------------------------------------------


@pytest.mark.parametrize("t", [-10.0, 0.0, 10.0, 0.2])
def test_if_elif_else_against_torch_and_explicit(
    model: nnsight.NNsight, net: TinyNet, x: torch.Tensor, t: float
) -> None:
    with model.trace(x) as native:
        h = model.layer1.output
        picked = nnsight.list().save()
        if h[0, 0] > t:
            picked.append(1)
        elif h[0, 1] > t:
            picked.append(2)
        else:
            picked.append(3)
    with model.trace(x) as explicit:
        h = model.layer1.output
        chosen = nnsight.list().save()
        with explicit.cond(h[0, 0] > t) as first:
            chosen.append(1)
        with first.else_(h[0, 1] > t) as second:
            chosen.append(2)
        with second.else_():
            chosen.append(3)
    assert picked.value == chosen.value == [_rule(net.layer1(x), t)]
    assert native.graph == explicit.graph
    assert from_json(to_json(native.graph)) == native.graph  # a chain is plain graph data


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_edits_the_activation(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor, sign: float) -> None:
    with model.trace(x) as native:
        h = model.layer1.output
        if (h.sum() * sign) > 0:
            h[:, 0] = 0
        else:
            h[:, 1] = 5
        out = model.output.save()
    expected_hidden = net.layer1(x)
    if (expected_hidden.sum() * sign) > 0:
        expected_hidden[:, 0] = 0
    else:
        expected_hidden[:, 1] = 5
    assert torch.allclose(out.value, net.layer2(expected_hidden))
    with model.trace(x) as explicit:
        h = model.layer1.output
        with explicit.cond((h.sum() * sign) > 0) as branch:
            h[:, 0] = 0
        with branch.else_():
            h[:, 1] = 5
        model.output.save()
    assert native.graph == explicit.graph


def test_if_without_else_and_nested(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as native:
        h = model.layer1.output
        seen = nnsight.list().save()
        if h[0, 0] > -100:
            seen.append(0)
            if h[0, 1] > 100:
                seen.append(1)
            else:
                seen.append(2)
                if h[0, 2] > -100:
                    seen.append(3)
            seen.append(4)
        if h[0, 3] > 100:
            seen.append(5)
        seen.append(6)
    assert seen.value == [0, 2, 3, 4, 6]
    with model.trace(x) as explicit:
        h = model.layer1.output
        seen = nnsight.list().save()
        with explicit.cond(h[0, 0] > -100):
            seen.append(0)
            with explicit.cond(h[0, 1] > 100) as inner:
                seen.append(1)
            with inner.else_():
                seen.append(2)
                with explicit.cond(h[0, 2] > -100):
                    seen.append(3)
            seen.append(4)
        with explicit.cond(h[0, 3] > 100):
            seen.append(5)
        seen.append(6)
    assert native.graph == explicit.graph


def test_if_in_a_function_called_in_the_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    def clamp(h: Any) -> None:
        if h[0, 0] > 0:
            h[:, 0] = 0
        else:
            h[:, 0] = 1
        pass  # a statement after the chain (see test_errors_name_the_line)

    with model.trace(x):
        clamp(model.layer1.output)
        out = model.output.save()
    expected = net.layer1(x)
    expected[:, 0] = 0 if expected[0, 0] > 0 else 1
    assert torch.allclose(out.value, net.layer2(expected))


def test_one_line_branches_and_a_branch_calling_a_branch(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    def inner(h: Any) -> None:
        if h[0, 1] > 0: h[:, 1] = 7  # noqa: E701
        h[:, 2] = 8

    with model.trace(x):
        h = model.layer1.output
        if h[0, 0] > -100:
            inner(h)
            assert sys.gettrace() is not None  # installed while a native block is open
        else: h[:, 0] = 9  # noqa: E701
        out = model.output.save()
        assert sys.gettrace() is None  # and gone once it closed
    expected = net.layer1(x)
    if expected[0, 1] > 0:
        expected[:, 1] = 7
    expected[:, 2] = 8
    assert torch.allclose(out.value, net.layer2(expected))


def test_if_in_invokes_and_a_python_loop(model: nnsight.NNsight, net: TinyNet) -> None:
    inputs = [torch.full((1, 5), -1.0), torch.full((1, 5), 1.0)]
    with model.trace() as tracer:
        outs = []
        for batch in inputs:
            with tracer.invoke(batch):
                h = model.layer1.output
                if h.mean() > 0:
                    h[:] = 0
                else:
                    h[:] = 1
                outs.append(model.output.save())
    for batch, out in zip(inputs, outs):
        expected = torch.zeros(1, 10) if net.layer1(batch).mean() > 0 else torch.ones(1, 10)
        assert torch.allclose(out.value, net.layer2(expected))


def test_plain_elif_after_a_traced_if(model: nnsight.NNsight, x: torch.Tensor) -> None:
    flag = True
    with model.trace(x):
        h = model.layer1.output
        seen = nnsight.list().save()
        if h[0, 0] > 100:
            seen.append(1)
        elif flag:
            seen.append(2)
        else:
            seen.append(3)
        seen.append(4)
    assert seen.value == [2, 4]


@pytest.mark.parametrize("flag", [False, True])
def test_a_plain_elif_between_traced_ones(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor, flag: bool) -> None:
    with model.trace(x):
        h = model.layer1.output
        seen = nnsight.list().save()
        if h[0, 0] > 100:
            seen.append(1)
        elif flag:
            seen.append(2)
        elif h[0, 1] > -100:
            seen.append(3)
        else:
            seen.append(4)
        seen.append(5)
    assert seen.value == [2 if flag else 3, 5]


def test_if_inside_a_session_and_its_loop(model: nnsight.NNsight, net: TinyNet) -> None:
    inputs = [torch.full((1, 5), -1.0), torch.full((1, 5), 1.0), torch.full((1, 5), 0.5)]
    with model.session() as native:
        sums = nnsight.list().save()
        with native.iter(inputs) as batch:
            with model.trace(batch):
                total = model.output.sum()
            if total > 0:
                sums.append(total)
            else:
                sums.append(-total)
    expected = [abs(net(batch).sum().item()) for batch in inputs]
    assert [value.item() for value in sums.value] == pytest.approx(expected)


# --- for -----------------------------------------------------------------------------------


def test_for_over_rows_against_torch_and_explicit(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as native:
        rows = nnsight.list().save()
        for value in model.layer1.output[0]:
            if value > 0:
                rows.append(value * 2)
            else:
                rows.append(value)
    expected = [(v * 2 if v > 0 else v).item() for v in net.layer1(x)[0]]
    assert [v.item() for v in rows.value] == pytest.approx(expected)
    with model.trace(x) as explicit:
        rows = nnsight.list().save()
        with explicit.iter(model.layer1.output[0]) as value:
            with explicit.cond(value > 0) as positive:
                rows.append(value * 2)
            with positive.else_():
                rows.append(value)
    assert native.graph == explicit.graph


def test_for_over_a_list_in_a_session(model: nnsight.NNsight, net: TinyNet) -> None:
    inputs = [torch.rand(1, 5) for _ in range(3)]
    with model.session() as native:
        batches = nnsight.list(inputs)
        logits = nnsight.list().save()
        for batch in batches:
            with model.trace(batch):
                logits.append(model.output)
    assert all(torch.allclose(got, net(batch)) for got, batch in zip(logits.value, inputs))
    with model.session() as explicit:
        batches = nnsight.list(inputs)
        logits = nnsight.list().save()
        with explicit.iter(batches) as batch:
            with model.trace(batch):
                logits.append(model.output)
    assert native.graph == explicit.graph


def test_nested_for_and_stop(model: nnsight.NNsight) -> None:
    with model.session():
        grid = nnsight.list([[1, 2], [3, 4], [5, 6]])
        seen = nnsight.list().save()
        for row in grid:
            for item in row:
                seen.append(item)
            if row[0] == 3:
                nnsight.stop()  # ends the outer loop (a break)
    assert seen.value == [1, 2, 3, 4]


def test_a_plain_iterable_stays_a_python_loop(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        seen = nnsight.list().save()
        for n in [1, 2]:  # a Python list: unrolled while tracing, as in nnsight 0.4
            seen.append(n)
    assert seen.value == [1, 2]
    assert "iter" not in str(session.graph)


# --- generation steps --------------------------------------------------------------------


def test_if_in_every_generation_step(tmp_path: Path) -> None:
    folder = lm_models.save("gpt2", tmp_path)
    lm, hf = nnsight.LanguageModel(str(folder)), lm_models.plain(folder)
    prompt = "The Eiffel Tower is in the city of"

    with lm.generate(prompt, max_new_tokens=3):
        with lm.all():
            logits = lm.lm_head.output
            if logits[0, -1, 7] > logits[0, -1, 8]:
                logits[:, -1, 9] = 1e4
            else:
                logits[:, -1, 10] = 1e4
        generated = lm.generator.output.save()

    def steer(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, -1, 9 if output[0, -1, 7] > output[0, -1, 8] else 10] = 1e4
        return output

    handle = hf.lm_head.register_forward_hook(steer)
    try:
        expected = lm_models.greedy(hf, lm_models.encode(lm.tokenizer, prompt), 3)
    finally:
        handle.remove()
    assert torch.equal(generated.value, expected)


# --- pictures, threads, trace functions ----------------------------------------------------


def test_vis_of_a_native_if_equals_the_explicit_form(model: nnsight.NNsight, x: torch.Tensor, tmp_path: Path) -> None:
    with model.trace(x) as native:
        h = model.layer1.output
        if h[0, 0] > 0:
            h[:, 0] = 0
        else:
            h[:, 0] = 1
    with model.trace(x) as explicit:
        h = model.layer1.output
        with explicit.cond(h[0, 0] > 0) as branch:
            h[:, 0] = 0
        with branch.else_():
            h[:, 0] = 1
    # The same picture but for the tooltips, which name each form's own lines.
    for recursive in (False, True):
        drawn = to_dot(native.graph, recursive=recursive)
        assert _untipped(drawn) == _untipped(to_dot(explicit.graph, recursive=recursive))
        assert "if h[0, 0] > 0:" in drawn
    pytest.importorskip("graphviz")
    first = native.vis(title="native", path=tmp_path, format="dot")
    second = explicit.vis(title="native", path=tmp_path / "explicit", format="dot")
    assert _untipped(first.read_text()) == _untipped(second.read_text())


def _untipped(dot: str) -> str:
    """A picture's DOT text less its tooltips (the user's source lines)."""
    return re.sub(r', tooltip="(?:[^"\\]|\\.)*"', "", dot)


def test_two_threads_branch_at_once(net: TinyNet) -> None:
    barrier = threading.Barrier(2)
    results: dict[int, Any] = {}

    def work(sign: float) -> None:
        model = nnsight.NNsight(net)
        x = torch.full((1, 5), sign)
        for _ in range(3):
            with model.trace(x):
                h = model.layer1.output
                barrier.wait(timeout=10)
                if h.sum() * sign > -1e9:
                    barrier.wait(timeout=10)  # both threads inside a native branch
                    h[:] = sign
                else:
                    h[:] = 0
                out = model.output.save()
            results[int(sign)] = out.value
            assert sys.gettrace() is None

    threads = [threading.Thread(target=work, args=(sign,)) for sign in (1.0, -1.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sign in (1, -1):
        assert torch.allclose(results[sign], net.layer2(torch.full((1, 10), float(sign))))


def test_a_users_trace_function_survives(model: nnsight.NNsight, x: torch.Tensor) -> None:
    calls: list[str] = []
    lines: list[int] = []

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            lines.append(frame.f_lineno)
        return local

    def user(frame: FrameType, event: str, arg: Any) -> Any:
        calls.append(frame.f_code.co_name)
        return local if frame.f_code.co_name == "traced" else None

    def mark() -> None:
        pass

    def traced() -> Any:
        with model.trace(x):
            h = model.layer1.output
            if h[0, 0] > 0:
                mark()
            else:
                mark()
            out = model.output.save()
        return out

    sys.settrace(user)
    try:
        out = traced()
        assert sys.gettrace() is user
    finally:
        sys.settrace(None)
    assert out.value.shape == (1, 2)
    assert calls.count("mark") == 2  # called inside the branches, while ours was installed
    first = traced.__code__.co_firstlineno
    assert [first + 1, first + 2, first + 3, first + 4] == lines[:4]  # the user's tracer kept its lines
    assert lines[-1] == first + 8  # (the jump into the else body itself has no line event)


def test_an_error_in_a_branch_closes_it(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            h = model.layer1.output
            if h[0, 0] > -100:
                1 / 0
            else:
                pass
    with model.trace(x):  # the next trace is unaffected
        out = model.output.save()
    assert out.value.shape == (1, 2)


# --- errors ----------------------------------------------------------------------------------


def _one_line() -> int:
    frame = sys._getframe(1)
    return frame.f_lineno


def test_errors_name_the_line(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output
        with pytest.raises(TypeError, match=rf"line {_one_line() + 1}: `while`"):
            while h[0, 0] > 0:
                pass
        with pytest.raises(TypeError, match=rf"line {_one_line() + 1}: `and`/`or`"):
            if h[0, 0] > 0 and True:
                pass
        with pytest.raises(TypeError, match=rf"line {_one_line() + 1}:.*only the test of a native `if`"):
            bool(h[0, 0] > 0)
        with pytest.raises(TypeError, match="comprehension"):
            [1 for value in [1] if h[0, 0] > 0]
        with pytest.raises(TypeError, match="only a plain `for item in proxy:`"):
            list(h)
        with pytest.raises(TypeError, match="`break`"):
            for value in h[0]:
                break
        with pytest.raises(TypeError, match="source of this code"):
            exec("if h[0, 0] > 0:\n    pass\n", {"h": h})

    def last(h: Any) -> None:
        if h[0, 0] > 0:
            pass
        else:
            pass

    with pytest.raises(TypeError, match="cannot be the last statement"):
        with model.trace(x):
            last(model.layer1.output)


def test_else_misuse_says_so(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        h = model.layer1.output
        branch = tracer.cond(h[0, 0] > 0)
        with pytest.raises(nnsight.TraceError, match="must have exited"):
            branch.else_()
        with branch:
            pass
        final = branch.else_()
        with final:
            pass
        with pytest.raises(nnsight.TraceError, match="already has its else"):
            final.else_()


def test_switched_off_gives_the_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    nnsight.CONFIG.APP.CONTROL_FLOW_HANDLING = False
    try:
        with model.trace(x):
            h = model.layer1.output
            with pytest.raises(TypeError, match="truth value of a traced value is unknown while tracing"):
                if h[0, 0] > 0:
                    pass
            with pytest.raises(TypeError, match="iterating"):
                for value in h[0]:
                    pass
    finally:
        nnsight.CONFIG.APP.CONTROL_FLOW_HANDLING = True


# --- IPython --------------------------------------------------------------------------------


def test_in_an_ipython_cell(net: TinyNet) -> None:
    interactive = pytest.importorskip("IPython.core.interactiveshell")
    shell = interactive.InteractiveShell.instance()
    shell.user_ns.update(nnsight=nnsight, torch=torch, net=net)
    cell = """
model = nnsight.NNsight(net)
x = torch.ones(1, 5)
with model.trace(x):
    h = model.layer1.output
    seen = nnsight.list().save()
    if h[0, 0] > 100:
        seen.append(1)
    else:
        seen.append(2)
    for value in h[0, :2]:
        seen.append(value)
"""
    result = shell.run_cell(cell)
    result.raise_error()
    seen = shell.user_ns["seen"].value
    expected = net.layer1(torch.ones(1, 5))[0, :2]
    assert seen[0] == 2 and torch.allclose(torch.stack(seen[1:]), expected)
