"""Trace, replay, cache, skip and generation on the device ``NNSIGHT_PURE_DEVICE`` names.

Each test builds its model and inputs on the ``device`` fixture's device
(cpu unless the variable says otherwise) and compares with the same
computation done in plain torch on that device; saved values must stay on it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import nnsight_pure as nnsight
from tests.helpers import tiny_gpt2, tiny_net
from tests.lm_models import BLOCKS_RETURN_TUPLES, hidden


def _on(value: torch.Tensor, device: torch.device) -> bool:
    return value.device.type == device.type


def _hooked(module: torch.nn.Module, run: Any, edit: Any = None) -> tuple[Any, Any]:
    """(the output ``module`` gave, what ``run()`` returned) with a forward hook on it
    (``edit(output)`` replacing the output when given)."""
    seen: list[Any] = []

    def hook(mod: torch.nn.Module, args: Any, output: Any) -> Any:
        if edit is not None:
            output = edit(output)
        seen.append(output)
        return output

    handle = module.register_forward_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    return seen[0], result


def test_a_trace_on_the_device_equals_hooks_there(device: torch.device) -> None:
    net = tiny_net().to(device)
    model = nnsight.NNsight(net)
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)).to(device)
    hidden_by_hand, out_by_hand = _hooked(net.layer1, lambda: net(x), lambda output: output * 2)
    with model.trace(x):
        model.layer1.output = model.layer1.output * 2
        layer1 = model.layer1.output.save()
        out = model.output.save()
    assert _on(layer1.value, device) and _on(out.value, device)
    assert torch.equal(layer1.value, hidden_by_hand) and torch.equal(out.value, out_by_hand)
    assert not torch.equal(out.value, net(x))  # (the edit changed the output)


def test_a_replay_on_the_device_equals_hooks_there(device: torch.device) -> None:
    net = tiny_net().to(device)
    model = nnsight.NNsight(net)
    graph = nnsight.trace(model, lambda m: m.layer1.output.sum(dim=-1))
    for seed in (1, 2):
        x = torch.rand(2, 5, generator=torch.Generator().manual_seed(seed)).to(device)
        by_hand, _ = _hooked(net.layer1, lambda: net(x))
        value = nnsight.run(model, graph, x).outputs
        assert _on(value, device) and torch.equal(value, by_hand.sum(dim=-1))


def test_a_cache_on_the_device_equals_every_modules_output_there(device: torch.device) -> None:
    net = tiny_gpt2()
    torch.nn.Module.to(net, device)  # in place (transformers' own .to is typed for other arguments)
    model = nnsight.NNsight(net)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3)).to(device)
    blocks = dict(net.transformer.h.named_children())
    outputs: dict[str, Any] = {}
    handles = [block.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, o))
               for name, block in blocks.items()]
    try:
        net(ids)
    finally:
        for handle in handles:
            handle.remove()
    with model.trace(ids) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0], model.transformer.h[1]])
    for name in blocks:
        entry = hidden(cache.value[f"model.transformer.h.{name}"].output)
        assert _on(entry, device) and torch.equal(entry, hidden(outputs[name])), name


def test_a_skip_on_the_device_equals_the_module_replaced_there(device: torch.device) -> None:
    net = tiny_net().to(device)
    model = nnsight.NNsight(net)
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)).to(device)
    value = torch.full((3, 10), 0.5, device=device)
    with model.trace(x):
        model.layer1.skip(value)
        out = model.output.save()
    assert _on(out.value, device) and torch.equal(out.value, net.layer2(value))


def _tokenizer() -> Any:
    """A word-level tokenizer over the tiny GPT-2's 100 ids (pad 0, end 2)."""
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(100)}, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated in transformers
        tokenizer_object=words, pad_token="w0", eos_token="w2", unk_token="w3",
        model_input_names=["input_ids", "attention_mask"],
    )


def _greedy(net: Any, ids: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """Plain transformers generation of ``ids`` (no padding)."""
    out: torch.Tensor = net.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_steered_at_every_step_on_the_device_equals_hooks_there(
    device: torch.device, use_cache: bool
) -> None:
    net = tiny_gpt2()
    torch.nn.Module.to(net, device)  # in place (transformers' own .to is typed for other arguments)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(5)).to(device)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(6)).to(device)
    settings: dict[str, Any] = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "use_cache": use_cache,
                "pad_token_id": 0}

    def steer(output: Any) -> Any:
        hidden(output).add_(vector)
        return output

    with torch.no_grad():
        _, by_hand = _hooked(net.transformer.h[1], lambda: _greedy(net, ids, settings), steer)
        plain = _greedy(net, ids, settings)
    lm = nnsight.LanguageModel(net, tokenizer=_tokenizer())
    with torch.no_grad(), lm.generate(ids, **settings):
        steps = nnsight.list().save()
        with lm.transformer.h[1].all():
            block = lm.transformer.h[1].output
            (block[0] if BLOCKS_RETURN_TUPLES else block)[:] += vector
            steps.append(lm.transformer.h[1].output)
        generated = lm.generator.output.save()
    assert _on(generated.value, device) and torch.equal(generated.value, by_hand)
    assert len(steps.value) == 4 and all(_on(hidden(step), device) for step in steps.value)
    assert not torch.equal(generated.value, plain)  # (the steering changed the tokens)
