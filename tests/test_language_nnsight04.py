"""nnsight 0.4 script forms on a LanguageModel, under transformers 4.x and 5.x.

``invoker.inputs[0][0]["input_ids"]`` (activation patching, logit lens),
``remote=False`` reaching neither the forward nor ``generate``,
``invoke(prompt, scan=True)`` inside a generation (nnsight 0.4's own
``test_generation``), saved token ids decoded by the tokenizer, and torch
factories recorded in a generation. Each is compared with plain transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests import lm_models
from tests.lm_models import BLOCK_RETURNS_TUPLE, hidden

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def family() -> str:
    return "gpt2"  # (its folder and plain model: tests/conftest.py)


@pytest.fixture
def lm(folder: Path) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder))


def _block(envoy: Any) -> Any:
    """A GPT-2 block's hidden state as a 0.4 script reads it in this transformers."""
    return envoy.output[0] if BLOCK_RETURNS_TUPLE["gpt2"] else envoy.output


def test_invoker_inputs_hold_the_token_ids(lm: nnsight.LanguageModel) -> None:
    expected = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT) as invoker:
            ids = invoker.inputs[0][0]["input_ids"]  # nnsight 0.4's shape: ((encoding,), {})
            mask = invoker.inputs[0][0]["attention_mask"]
            logits = lm.lm_head.output.save()
    assert torch.equal(ids, expected) and torch.equal(mask, torch.ones_like(expected))
    assert logits.value.shape[1] == expected.shape[1]


def test_remote_false_reaches_neither_forward_nor_generate(lm: nnsight.LanguageModel, hf: Any) -> None:
    encoding = lm_models.encode(lm.tokenizer, PROMPT)
    with lm.trace(PROMPT, remote=False):
        logits = lm.lm_head.output.save()
    assert torch.allclose(logits.value, hf(**encoding).logits, atol=1e-5)
    with lm.generate(PROMPT, max_new_tokens=3, remote=False):
        generated = lm.generator.output.save()
    assert torch.equal(generated.value, lm_models.greedy(hf, encoding, 3))


def test_a_scanned_invoke_inside_a_generation(lm: nnsight.LanguageModel, hf: Any) -> None:
    encoding = lm_models.encode(lm.tokenizer, PROMPT)
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(PROMPT, scan=True):
            width = _block(lm.transformer.h[-1]).shape[-1]  # known while tracing
            generated = lm.generator.output.save()
    assert width == lm_models.WIDTH
    assert torch.equal(generated.value, lm_models.greedy(hf, encoding, 3))


def test_saved_ids_decode_with_the_tokenizer(lm: nnsight.LanguageModel, hf: Any) -> None:
    encoding = lm_models.encode(lm.tokenizer, PROMPT)
    with lm.generate(PROMPT, max_new_tokens=2):
        generated = lm.generator.output.save()
    expected = lm_models.greedy(hf, encoding, 2)
    assert lm.tokenizer.batch_decode(generated) == lm.tokenizer.batch_decode(expected)
    assert lm.tokenizer.decode(generated[0]) == lm.tokenizer.decode(expected[0])


def test_logit_lens_as_the_tutorial_writes_it(lm: nnsight.LanguageModel, hf: Any) -> None:
    encoding = lm_models.encode(lm.tokenizer, PROMPT)
    probs = []
    with lm.trace(PROMPT):
        for layer in lm.transformer.h:
            tokens = lm.lm_head(lm.transformer.ln_f(_block(layer)))
            probs.append(torch.nn.functional.softmax(tokens, dim=-1).max(dim=-1).values.save())  # type: ignore[attr-defined]
    states = hf(**encoding, output_hidden_states=True).hidden_states
    for index, saved in enumerate(probs):
        # hidden_states[i + 1] is block i's output (the last one after ln_f, so taken by hand)
        seen: list[Any] = []
        handle = hf.transformer.h[index].register_forward_hook(lambda m, i, o: seen.append(hidden(o)))
        try:
            hf(**encoding)
        finally:
            handle.remove()
        expected = torch.nn.functional.softmax(hf.lm_head(hf.transformer.ln_f(seen[0])), dim=-1).max(dim=-1).values
        assert torch.allclose(saved.value, expected, atol=1e-5)
    assert len(states) == len(probs) + 1


def test_a_factory_in_every_step_of_a_generation(lm: nnsight.LanguageModel, hf: Any) -> None:
    encoding = lm_models.encode(lm.tokenizer, PROMPT)
    with lm.generate(PROMPT, max_new_tokens=3):
        with lm.all():
            # recorded: a zero tensor made at each step, added to the embeddings
            lm.transformer.wte.output = lm.transformer.wte.output + torch.zeros(lm_models.WIDTH)
        generated = lm.generator.output.save()
    assert torch.equal(generated.value, lm_models.greedy(hf, encoding, 3))
