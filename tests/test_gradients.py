"""Gradients: `.grad` reads and writes inside a trace, against torch.autograd.grad.

Rewrites nnsight 0.4's grad scenarios (grad setting, retain_grad, grad,
multi_grad) as tests of our own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from tests.helpers import TinyNet, hook_counts


def _reference(
    net: TinyNet, x: torch.Tensor, scale_grad: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d loss / d layer1 output, d loss / d layer2 output, layer1.weight.grad) by hand,
    the gradient at layer1's output multiplied by ``scale_grad`` on its way back."""
    net.zero_grad()
    hidden = net.layer1(x)
    if scale_grad != 1.0:
        hidden.register_hook(lambda g: g * scale_grad)
    out = net.layer2(hidden)
    loss = out.sum()
    g_hidden, g_out = torch.autograd.grad(loss, (hidden, out), retain_graph=True)
    loss.backward()
    assert net.layer1.weight.grad is not None
    weight_grad = net.layer1.weight.grad.clone()
    net.zero_grad()
    return g_hidden * scale_grad if scale_grad != 1.0 else g_hidden, g_out, weight_grad


def test_read_gradients(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        g_hidden = model.layer1.output.grad.save()
        g_out = model.layer2.output.grad.save()
        g_again = model.layer1.output.grad.save()  # several reads of one value
        model.output.sum().backward()
    ref_hidden, ref_out, _ = _reference(net, x)
    assert torch.allclose(g_hidden.value, ref_hidden)
    assert torch.allclose(g_out.value, ref_out)
    assert torch.equal(g_again.value, g_hidden.value)


def test_grad_setting(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        original = model.layer1.output.grad.clone().save()
        model.layer1.output.grad = model.layer1.output.grad * 2
        doubled = model.layer1.output.grad.save()
        model.output.sum().backward()
    assert torch.equal(original.value * 2, doubled.value)
    # The replacement is what flows on, into the weights.
    assert net.layer1.weight.grad is not None
    traced_weight_grad = net.layer1.weight.grad.clone()
    _, _, weight_grad = _reference(net, x, scale_grad=2.0)
    assert torch.allclose(traced_weight_grad, weight_grad)


def test_in_place_edit_of_a_gradient(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        before = model.layer1.output.grad.clone().save()
        model.layer1.output.grad[:] = 0
        model.output.sum().backward()
    assert before.value.abs().sum() > 0
    assert net.layer1.weight.grad is not None and torch.all(net.layer1.weight.grad == 0)
    net.zero_grad()


def test_gradient_of_a_module_input(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        g_in = model.layer2.input.grad.save()
        model.output.sum().backward()
    ref_hidden, _, _ = _reference(net, x)
    assert torch.allclose(g_in.value, ref_hidden)


def test_several_backward_passes(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        hidden = model.layer1.output
        logits = model.output
        first = hidden.grad.save()  # binds to the first backward
        logits.sum().backward(retain_graph=True)
        second = hidden.grad.save()  # written after it: binds to the second
        (logits * 2).sum().backward()
    assert torch.allclose(second.value, first.value * 2)


def test_retain_grad(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        hidden = model.layer1.output.save()
        hidden.retain_grad()
        model.output.sum().backward()
    ref_hidden, _, _ = _reference(net, x)
    assert torch.allclose(hidden.value.grad, ref_hidden)
    assert torch.allclose(hidden.grad, ref_hidden)  # after the trace, .grad is the tensor's


def test_gradient_of_one_invokes_rows(model: nnsight.NNsight, net: TinyNet) -> None:
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            g_a = model.layer1.output.grad.save()
        with tracer.invoke(b):
            g_b = model.layer1.output.grad.save()
        (model.output ** 2).sum().backward()
    hidden = net.layer1(torch.cat([a, b]))
    (full,) = torch.autograd.grad((net.layer2(hidden) ** 2).sum(), hidden)
    assert torch.allclose(g_a.value, full[:1])
    assert torch.allclose(g_b.value, full[1:])


def test_setting_the_gradient_of_one_invokes_rows(model: nnsight.NNsight, net: TinyNet) -> None:
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.layer1.output.grad = torch.zeros(1, 10)
        with tracer.invoke(b):
            pass
        model.output.sum().backward()
    assert net.layer1.weight.grad is not None
    batch = torch.cat([a, b])
    hidden = net.layer1(batch)
    hidden.register_hook(lambda g: torch.cat([torch.zeros(1, 10), g[1:]]))
    (weight_grad,) = torch.autograd.grad(net.layer2(hidden).sum(), net.layer1.weight)
    assert torch.allclose(net.layer1.weight.grad, weight_grad)
    net.zero_grad()


def test_gpt2_block_gradient(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    with gpt2.trace(ids):
        block = gpt2.transformer.h[0].output
        grad = block.grad.save()
        gpt2.output.logits[0, -1].max().backward()
    seen: dict[str, Any] = {}
    handle = gpt2_module.transformer.h[0].register_forward_hook(lambda m, i, o: seen.__setitem__("h0", o))
    logits = gpt2_module(ids).logits
    handle.remove()
    (ref,) = torch.autograd.grad(logits[0, -1].max(), seen["h0"])
    assert torch.allclose(grad.value, ref, atol=1e-6)
    gpt2_module.zero_grad()


def test_grad_read_without_backward_says_so(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        grad = model.layer1.output.grad.save()
    with pytest.raises(ValueError, match="no backward pass reached that value"):
        _ = grad.value


def test_grad_of_something_that_takes_no_gradient(net: TinyNet, x: torch.Tensor) -> None:
    net.requires_grad_(False)
    model = nnsight.NNsight(net)
    hooks = hook_counts(net)
    with pytest.raises(RuntimeError, match="does not require grad") as caught:
        with model.trace(x):
            model.layer1.output.grad.save()  # no gradient here
    assert "no gradient here" in "\n".join(getattr(caught.value, "__notes__", []))
    assert hook_counts(net) == hooks
    with pytest.raises(RuntimeError, match="does not require grad") as caught:
        with model.trace(x):
            model.output.sum().backward()  # nothing requires grad
    assert "nothing requires grad" in "\n".join(getattr(caught.value, "__notes__", []))


def test_grad_inside_a_condition_is_refused(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="cannot be used inside a condition or loop"):
        with model.trace(x) as tracer:
            with tracer.cond(True):
                model.layer1.output.grad.save()


def test_gradient_hooks_are_removed_after_the_run(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        hidden = model.layer1.output.save()
        hidden.grad.save()  # a hook that never fires (no backward)
    assert not hidden.value._backward_hooks
