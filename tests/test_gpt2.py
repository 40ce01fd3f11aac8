"""A GPT-2-shaped transformers model built from a config, against plain hooks.

Includes the nnsight 0.4 README's "Operations", "Setting" and "Cross Prompt
Intervention" examples, ported to token ids (no tokenizer: LanguageModel is a
separate issue). In transformers 5 a ``GPT2Block`` returns a tensor, not a
tuple, so these tests read ``h[i].output`` where the README reads ``output[0]``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from tests.helpers import hook_counts, hooked_run


def test_save_every_block(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    with gpt2.trace(ids):
        blocks = [gpt2.transformer.h[i].output.save() for i in range(2)]
        logits = gpt2.output.logits.save()
    ref, seen = hooked_run(gpt2_module, ids, read=("transformer.h.0", "transformer.h.1"))
    assert torch.equal(blocks[0].value, seen["transformer.h.0"])
    assert torch.equal(blocks[1].value, seen["transformer.h.1"])
    assert torch.equal(logits.value, ref.logits)


def test_readme_operations(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    with gpt2.trace(ids):
        hidden_states_pre = gpt2.transformer.h[-1].output.save()
        hs_sum = cast(nnsight.Proxy, torch.sum(cast(torch.Tensor, hidden_states_pre))).save()
        hs_edited = hidden_states_pre + hs_sum
        hs_edited = hs_edited.save()
    _, seen = hooked_run(gpt2_module, ids, read=("transformer.h.1",))
    hidden = seen["transformer.h.1"]
    assert torch.equal(hidden_states_pre.value, hidden)
    assert torch.equal(hs_sum.value, torch.sum(hidden))
    assert torch.equal(hs_edited.value, hidden + torch.sum(hidden))


def test_readme_setting(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    torch.manual_seed(3)
    with gpt2.trace(ids):
        hidden_states_pre = gpt2.transformer.h[-1].mlp.output.clone().save()
        noise = (0.001 ** 0.5) * torch.randn(hidden_states_pre.shape)
        gpt2.transformer.h[-1].mlp.output = hidden_states_pre + noise
        hidden_states_post = gpt2.transformer.h[-1].mlp.output.save()
        logits = gpt2.output.logits.save()
    torch.manual_seed(3)
    noise_ref = (0.001 ** 0.5) * torch.randn(1, 8, 32)
    ref, seen = hooked_run(
        gpt2_module, ids, replace={"transformer.h.1.mlp": lambda o: o + noise_ref}, read=("transformer.h.1.mlp",)
    )
    assert torch.equal(hidden_states_post.value, seen["transformer.h.1.mlp"])
    assert torch.equal(hidden_states_post.value, hidden_states_pre.value + noise_ref)
    assert torch.equal(logits.value, ref.logits)


def test_readme_cross_prompt_intervention(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel) -> None:
    source = torch.randint(3, 100, (1, 10))
    blank = torch.full((1, 10), 5)
    with gpt2.trace() as tracer:
        with tracer.invoke(source):
            embeddings = gpt2.transformer.wte.output
        with tracer.invoke(blank):
            gpt2.transformer.wte.output = embeddings
            patched = gpt2.output.logits.save()
    # The blank prompt, given the source's embeddings, computes what the source computes.
    assert torch.allclose(patched.value, gpt2_module(source).logits, atol=1e-5)
    # ... and the hand-written hook version agrees.
    donor = gpt2_module.transformer.wte(source)
    ref, _ = hooked_run(gpt2_module, blank, replace={"transformer.wte": lambda o: donor})
    assert torch.allclose(patched.value, ref.logits, atol=1e-5)


def test_readme_cross_prompt_with_a_saved_value(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel) -> None:
    source = torch.randint(3, 100, (1, 10))
    with gpt2.trace(source):
        embeddings = gpt2.transformer.wte.output.save()
    with gpt2.trace(torch.full((1, 10), 5)):
        gpt2.transformer.wte.output = embeddings.value
        patched = gpt2.output.logits.save()
    assert torch.allclose(patched.value, gpt2_module(source).logits, atol=1e-5)


def test_logit_lens_with_adhoc_modules(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    with gpt2.trace(ids):
        hidden_states = gpt2.transformer.h[-1].output
        lens = gpt2.lm_head(gpt2.transformer.ln_f(hidden_states)).save()
        tokens = cast(nnsight.Proxy, torch.softmax(lens, dim=2).argmax(dim=2)).save()
        logits = gpt2.output.logits.save()
    assert torch.allclose(lens.value, logits.value, atol=1e-5)
    assert torch.equal(tokens.value, logits.value.argmax(dim=2))


def test_zero_a_block_and_read_the_logits(
    gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    with gpt2.trace(ids):
        gpt2.transformer.h[0].output[:] = 0
        logits = gpt2.lm_head.output.save()
    ref, _ = hooked_run(gpt2_module, ids, replace={"transformer.h.0": torch.zeros_like})
    assert torch.equal(logits.value, ref.logits)


def test_attention_internals_and_kwargs_inputs(
    gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    with gpt2.trace(ids):
        block_inputs = gpt2.transformer.h[0].inputs.save()
        c_attn = gpt2.transformer.h[0].attn.c_attn.output.save()
    args, kwargs = block_inputs.value
    assert args[0].shape == (1, 8, 32) and "position_ids" in kwargs
    _, seen = hooked_run(gpt2_module, ids, read=("transformer.h.0.attn.c_attn",))
    assert torch.equal(c_attn.value, seen["transformer.h.0.attn.c_attn"])


def test_steering_with_a_parameter_gets_its_gradient(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    # Tensor constants are held by reference, so a trained steering vector learns.
    steer = torch.nn.Parameter(torch.zeros(32))
    with gpt2.trace(ids):
        gpt2.transformer.h[0].output = gpt2.transformer.h[0].output + steer
        loss = gpt2.output.logits.sum()
        loss.backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0


def test_no_hooks_left_on_any_module(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    before = hook_counts(gpt2_module)
    with gpt2.trace(ids):
        for block in gpt2.transformer.h:
            block.output.save()
            block.attn.inputs.save()
    assert hook_counts(gpt2_module) == before


def test_repr_shows_the_module_tree(gpt2: nnsight.NNsight, gpt2_module: Any) -> None:
    assert repr(gpt2) == repr(gpt2_module)


def test_equal_graphs_with_different_parameters_each_train_their_own(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    # The two graphs are equal (equal-valued constants), but each holds its own
    # Parameter: a plan shared between them would send both gradients to the first.
    first, second = torch.nn.Parameter(torch.zeros(32)), torch.nn.Parameter(torch.zeros(32))
    tracers = []
    for steer in (first, second):
        with gpt2.trace(ids) as tracer:
            gpt2.transformer.h[0].output = gpt2.transformer.h[0].output + steer
            gpt2.output.logits.sum().backward()
        tracers.append(tracer)  # keep both graphs alive
    assert tracers[0].graph == tracers[1].graph
    assert first.grad is not None and second.grad is not None
    assert torch.equal(first.grad, second.grad)
