"""LanguageModel on tiny GPT-2-, GPT-J-, Llama- and GPT-NeoX-shaped models
(the families of nnsight's tutorials), under the installed transformers.

Each model is saved with ``save_pretrained`` and loaded by path; every value
is compared with the same computation in plain transformers. ``rename=``
gives every family GPT-2's paths (``model.transformer.h[i]``,
``model.transformer.ln_f``, ``model.lm_head``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests import lm_models
from tests.lm_models import AS_GPT2, BLOCK_RETURNS_TUPLE, BLOCKS, FAMILIES, TRANSFORMERS_MAJOR, hidden

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def lm(folder: Path, family: str) -> nnsight.LanguageModel:
    """The model with GPT-2's names, whatever its family."""
    return nnsight.LanguageModel(str(folder), rename=AS_GPT2[family])


def _encoding(lm: nnsight.LanguageModel, *texts: str) -> Any:
    return lm_models.encode(lm.tokenizer, *texts)


def _hidden(block: Any, family: str) -> Any:
    """The hidden state of a block's output proxy: what a script must write
    for this family in this transformers."""
    return block.output[0] if BLOCK_RETURNS_TUPLE[family] else block.output


def _read(hf: Any, path: str, encoding: Any) -> Any:
    seen: list[Any] = []
    handle = hf.get_submodule(path).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = hf(**encoding).logits
    finally:
        handle.remove()
    return seen[0], logits


def test_blocks_return_what_this_transformers_returns(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    """The table in docs/language-models.md: a block's output is a tuple or
    a tensor depending on the family and the transformers major version."""
    plain, _ = _read(hf, f"{BLOCKS[family]}.0", _encoding(lm, PROMPT))
    with lm.trace(PROMPT):
        block = lm.transformer.h[0].output.save()
    assert isinstance(block.value, tuple) == BLOCK_RETURNS_TUPLE[family] == isinstance(plain, tuple)
    expected_tuple = family == "gptj" or (family in ("gpt2", "neox") and TRANSFORMERS_MAJOR < 5)
    assert BLOCK_RETURNS_TUPLE[family] == expected_tuple
    assert torch.allclose(hidden(block.value), hidden(plain), atol=1e-5)
    assert hidden(block.value).shape == (1, len(lm.tokenizer(PROMPT)["input_ids"]), lm_models.WIDTH)


def test_renamed_paths_reach_the_real_modules(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    encoding = _encoding(lm, PROMPT)
    plain, logits = _read(hf, f"{BLOCKS[family]}.1", encoding)
    with lm.trace(PROMPT):
        last = _hidden(lm.transformer.h[1], family).save()
        normed = lm.transformer.ln_f.output.save()
        out = lm.lm_head.output.save()
    assert torch.allclose(last.value, hidden(plain), atol=1e-5)
    assert torch.allclose(out.value, logits, atol=1e-5)
    assert normed.value.shape == last.value.shape
    assert "transformer" in repr(lm) and ("(h): ModuleList" in repr(lm))


def test_logit_lens_with_adhoc_calls(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    """The tutorials' logit lens: ln_f and lm_head called on a block's output."""
    with lm.trace(PROMPT):
        lens = lm.lm_head(lm.transformer.ln_f(_hidden(lm.transformer.h[-1], family))).save()
        first = lm.lm_head(lm.transformer.ln_f(_hidden(lm.transformer.h[0], family))).save()
        logits = lm.output.logits.save()
    _, plain_logits = _read(hf, f"{BLOCKS[family]}.0", _encoding(lm, PROMPT))
    assert torch.allclose(lens.value, plain_logits, atol=1e-5)
    assert torch.allclose(logits.value, plain_logits, atol=1e-5)
    assert first.value.shape == lens.value.shape and not torch.allclose(first.value, lens.value)


def test_patching_a_block_across_invokes(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    """Zeroing the MLP of block 0, compared with a plain hook doing the same."""
    encoding = _encoding(lm, PROMPT)
    mlp = hf.get_submodule(f"{BLOCKS[family]}.0.mlp")
    handle = mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            expected = hf(**encoding).logits
    finally:
        handle.remove()
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT):
            clean = lm.output.logits.save()
        with tracer.invoke(PROMPT):
            lm.transformer.h[0].mlp.output = torch.zeros_like(lm.transformer.h[0].mlp.output)
            ablated = lm.output.logits.save()
    assert torch.allclose(ablated.value, expected, atol=1e-5)
    assert not torch.allclose(clean.value, expected, atol=1e-3)


def test_an_edit_applies_to_every_later_trace(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    encoding = _encoding(lm, PROMPT)
    mlp = hf.get_submodule(f"{BLOCKS[family]}.1.mlp")
    handle = mlp.register_forward_hook(lambda m, i, o: o * 0.5)
    try:
        with torch.no_grad():
            expected = hf(**encoding).logits
    finally:
        handle.remove()
    with lm.edit() as halved:
        lm.transformer.h[1].mlp.output = lm.transformer.h[1].mlp.output * 0.5
    with halved.trace(PROMPT):
        edited = halved.output.logits.save()
    with lm.trace(PROMPT):
        original = lm.output.logits.save()
    assert torch.allclose(edited.value, expected, atol=1e-5)
    assert not torch.allclose(original.value, expected, atol=1e-3)


def test_gradients_of_a_block(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    """The gradient of the logit sum at the embedding output, as plain autograd gives it."""
    encoding = _encoding(lm, PROMPT)
    embedding = hf.get_input_embeddings()
    seen: list[torch.Tensor] = []

    def keep(m: Any, i: Any, o: torch.Tensor) -> None:
        o.retain_grad()
        seen.append(o)

    handle = embedding.register_forward_hook(keep)
    try:
        hf(**encoding).logits.sum().backward()
    finally:
        handle.remove()
        hf.zero_grad()
    expected = seen[0].grad
    embed_path = {"gpt2": "wte", "gptj": "wte", "llama": "embed_tokens", "neox": "embed_in"}[family]
    with lm.trace(PROMPT):
        grad = getattr(lm.transformer, embed_path).output.grad.save()
        lm.output.logits.sum().backward()
    lm._model.zero_grad()
    assert expected is not None and torch.allclose(grad.value, expected, atol=1e-5)


def test_generation_per_step(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    """``.next()``, ``.all()`` and ``.iter[...]`` read the steps that plain
    greedy generation computes."""
    encoding = _encoding(lm, "The city of")
    plain = lm_models.plain_steps(hf, f"{BLOCKS[family]}.1", encoding, 3)
    expected_ids = lm_models.greedy(hf, encoding, 3)
    with lm.generate("The city of", max_new_tokens=3):
        by_next = [_hidden(lm.transformer.h[1], family).save()]
        by_next.append(_hidden(lm.transformer.h[1].next(), family).save())
        by_next.append(_hidden(lm.transformer.h[1].next(), family).save())
    with lm.generate("The city of", max_new_tokens=3):
        by_all = nnsight.list().save()
        with lm.transformer.h[1].all():
            by_all.append(_hidden(lm.transformer.h[1], family))
        third = _hidden(lm.transformer.h[1].iter[2], family).save()
        ids = lm.generator.output.save()
    assert len(plain) == 3 and len(by_all.value) == 3
    for step in range(3):
        assert torch.allclose(by_next[step].value, plain[step], atol=1e-5), step
        assert torch.allclose(by_all.value[step], plain[step], atol=1e-5), step
    assert torch.allclose(third.value, plain[2], atol=1e-5)
    assert plain[1].shape == (1, 1, lm_models.WIDTH)
    assert torch.equal(ids.value, expected_ids)


def test_a_write_at_every_step(lm: nnsight.LanguageModel, hf: Any, family: str) -> None:
    encoding = _encoding(lm, "The city of")
    mlp = hf.get_submodule(f"{BLOCKS[family]}.1.mlp")
    handle = mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        expected = lm_models.greedy(hf, encoding, 3)
    finally:
        handle.remove()
    with lm.generate("The city of", max_new_tokens=3):
        with lm.transformer.h[1].mlp.all():
            lm.transformer.h[1].mlp.output[:] = 0
        ids = lm.generator.output.save()
    assert torch.equal(ids.value, expected)


def test_padded_invokes_generate_as_each_prompt_alone(lm: nnsight.LanguageModel, hf: Any) -> None:
    prompts = ["The city", "Madison Square Garden is located in"]
    with lm.generate(max_new_tokens=3) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                pass
        ids = lm.generator.output.save()
    for row, prompt in enumerate(prompts):
        alone = lm_models.greedy(hf, _encoding(lm, prompt), 3)
        assert torch.equal(ids.value[row, -3:], alone[0, -3:]), prompt
