"""Edits: default graphs run before every later trace; attachments; clear_edits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from nnsight_pure.util import WrapperModule
from tests.helpers import TinyNet, hooked_run


def test_an_edit_runs_in_every_later_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.edit() as edited:
        edited.layer1.output[:] = 0
    ref, _ = hooked_run(net, x, replace={"layer1": torch.zeros_like})
    for _ in range(2):
        with edited.trace(x):
            out = edited.output.save()
        assert torch.equal(out.value, ref)
    with model.trace(x):  # the original wrapper is unchanged
        plain = model.output.save()
    assert torch.equal(plain.value, net(x))
    assert edited is not model and edited._model is model._model


def test_edits_then_the_traces_own_interventions(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.edit() as edited:
        model.layer1.output[:] = 1  # model or edited: the same envoys
    with edited.trace(x):
        seen = edited.layer1.output.clone().save()  # sees the edit: it ran first
        edited.layer1.output[:, 0] = 5
        out = edited.output.save()
    expected = torch.ones(1, 10)
    expected[:, 0] = 5
    assert torch.equal(seen.value, torch.ones(1, 10))
    assert torch.allclose(out.value, net.layer2(expected))


def test_inplace_edits_and_clear_edits(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.edit(inplace=True) as same:
        model.layer1.output[:] = 0
    assert same is model
    with model.trace(x):
        zeroed = model.output.save()
    model.clear_edits()
    with model.trace(x):
        restored = model.output.save()
    assert torch.equal(zeroed.value, net.layer2(torch.zeros(1, 10)))
    assert torch.equal(restored.value, net(x))


def test_edits_compose_and_a_copy_keeps_the_original_intact(
    model: nnsight.NNsight, net: TinyNet, x: torch.Tensor
) -> None:
    with model.edit(inplace=True):
        model.layer1.output[:] = 1
    with model.edit() as both:
        model.layer2.output[:] = model.layer2.output * 3
    with model.trace(x):
        first_only = model.output.save()
    with both.trace(x):
        first_and_second = both.output.save()
    assert torch.allclose(first_only.value, net.layer2(torch.ones(1, 10)))
    assert torch.allclose(first_and_second.value, net.layer2(torch.ones(1, 10)) * 3)
    assert model.edits is not None and both.edits is not None and len(both.edits) > len(model.edits)


def test_an_edit_with_a_batch_of_one_applies_to_every_row(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel) -> None:
    block = gpt2.transformer.h[0]
    block.probe = WrapperModule()
    with gpt2.edit(torch.randint(3, 100, (1, 5))) as edited:
        block.output = block.probe(block.output, hook=True)
    ids = torch.randint(3, 100, (2, 6))
    with edited.trace(ids):
        probed = edited.transformer.h[0].probe.output.save()
        logits = edited.output.logits.save()
    assert probed.value.shape[0] == 2  # not narrowed: the edit sees the whole batch
    assert torch.allclose(logits.value, gpt2_module(ids).logits, atol=1e-5)


def test_the_attachment_pattern(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel) -> None:
    # nnsight 0.4's test_editing: an attached module (with a child) called with
    # hook=True in an edit, then traced and zeroed in a later trace.
    class ComplexModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.one = WrapperModule()

        def forward(self, x: torch.Tensor) -> Any:
            return self.one(x)

    layer = gpt2.transformer.h[0]
    layer.attachment = ComplexModule()
    with gpt2.edit() as edited:
        acts = layer.output
        layer.output[:] = layer.attachment(acts)  # hooked: inside an edit
    ids = torch.randint(3, 100, (1, 8))
    with gpt2.trace(ids):
        layer.output[:] *= 0.0
        original_output = gpt2.output.logits.save()
    with edited.trace(ids):
        one = layer.attachment.one.output.clone().save()
        layer.attachment.output *= 0.0
        edited_output = edited.output.logits.save()
    assert torch.all(one.value != 0)
    assert torch.allclose(edited_output.value, original_output.value)


def test_an_edit_of_a_missing_module_fails_at_its_line(model: nnsight.NNsight) -> None:
    with pytest.raises(AttributeError, match="has no submodule or attribute 'layer9'"):
        with model.edit() as edited:
            edited.layer9.output[:] = 0
    assert model.edits is None


def test_values_of_an_edit_say_why_they_have_none(model: nnsight.NNsight) -> None:
    with model.edit() as edited:
        hidden = edited.layer1.output.save()
    with pytest.raises(ValueError, match="edits are not run where they are written"):
        _ = hidden.value


def test_edits_take_no_invokes(model: nnsight.NNsight, x: torch.Tensor) -> None:
    editor = model.edit()
    with pytest.raises(nnsight.TraceError, match="they take no invokes"):
        with editor:
            with editor.invoke(x):
                pass
    assert model.edits is None


def test_parameter_safety(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    before = net.layer1.weight.detach().clone()
    with model.trace(x):
        model.layer1.weight[:] = 0
    with model.trace(x):
        weight = model.layer1.weight.save()
    assert torch.equal(weight.value, before) and torch.equal(net.layer1.weight, before)
