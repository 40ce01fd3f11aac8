"""LanguageModel on a tiny GPT-2 and a tiny BPE tokenizer, loaded from a folder.

The model and tokenizer are made with random weights / trained on a few
sentences, saved with ``save_pretrained`` and loaded by path, so the real
``from_pretrained`` path runs. Everything is compared with plain transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.util import WrapperModule
from tests import lm_models
from tests.lm_models import CORPUS, hidden

# GPT-2 blocks return a tuple under transformers 4.x (the hidden state is
# ``output[0]``) and a tensor under 5.x; these tests run under both.


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny GPT-2 and tokenizer (random weights; a BPE trained on CORPUS)."""
    return lm_models.save("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def lm(folder: Path) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder))


@pytest.fixture(scope="module")
def hf(folder: Path) -> Any:
    return lm_models.plain(folder)


def _ids(lm: nnsight.LanguageModel, *texts: str) -> Any:
    return lm_models.encode(lm.tokenizer, *texts)


def _greedy(hf: Any, encoding: Any, steps: int, **kwargs: Any) -> torch.Tensor:
    return lm_models.greedy(hf, encoding, steps, **kwargs)


def _hidden_of(block: Any) -> Any:
    """The hidden state of a block's output proxy, in either transformers."""
    return block.output[0] if lm_models.BLOCKS_RETURN_TUPLES else block.output


# --- loading ------------------------------------------------------------------------


def test_weights_load_lazily_and_the_tree_is_there_before(lm: nnsight.LanguageModel, hf: Any) -> None:
    loaded_before, device_before = lm.dispatched, lm.device
    assert not loaded_before and device_before == torch.device("meta")
    assert "(generator): WrapperModule()" in repr(lm) and "(lm_head): Linear" in repr(lm)
    assert lm.config.n_layer == 2 and lm.tokenizer.pad_token == "<pad>"
    with lm.trace("The city of"):
        logits = lm.output.logits.save()
    assert lm.dispatched and lm.device == torch.device("cpu")
    assert torch.allclose(logits.value, hf(**_ids(lm, "The city of")).logits, atol=1e-5)


def test_dispatch_true_loads_at_once(folder: Path) -> None:
    lm = nnsight.LanguageModel(str(folder), dispatch=True)
    assert lm.dispatched and lm.device == torch.device("cpu")


def test_a_scan_needs_no_weights(lm: nnsight.LanguageModel) -> None:
    with lm.scan("The city of"):
        width = _hidden_of(lm.transformer.h[0]).shape[-1]
    assert width == 32 and not lm.dispatched


def test_an_attached_module_survives_loading(lm: nnsight.LanguageModel) -> None:
    lm.transformer.h[0].probe = WrapperModule()
    with lm.trace("The city"):
        lm.transformer.h[0].output = lm.transformer.h[0].probe(lm.transformer.h[0].output, hook=True)
        seen = lm.transformer.h[0].probe.output.save()
    assert lm.dispatched and hidden(seen.value).shape == (1, len(lm.tokenizer("The city")["input_ids"]), 32)


# --- inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["str", "list", "ids", "tensor", "encoding", "dict", "kwarg"])
def test_every_input_form_gives_the_same_logits(lm: nnsight.LanguageModel, hf: Any, form: str) -> None:
    text = "The Eiffel Tower is"
    encoding = _ids(lm, text)
    forms: dict[str, dict[str, Any]] = {
        "str": {"args": (text,)},
        "list": {"args": ([text],)},
        "ids": {"args": (encoding["input_ids"][0].tolist(),)},
        "tensor": {"args": (encoding["input_ids"][0],)},
        "encoding": {"args": (encoding,)},
        "dict": {"args": ({"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]},)},
        "kwarg": {"args": (), "kwargs": {"input_ids": encoding["input_ids"]}},
    }
    inputs = forms[form]
    with lm.trace() as tracer:
        with tracer.invoke(*inputs["args"], **inputs.get("kwargs", {})):
            logits = lm.output.logits.save()
    assert torch.allclose(logits.value, hf(**encoding).logits, atol=1e-5)


def test_padded_invokes_give_what_each_prompt_gives_alone(lm: nnsight.LanguageModel, hf: Any) -> None:
    prompts = ["The city", "Madison Square Garden is located in the", "Rome"]
    with lm.trace() as tracer:
        last = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                last.append(lm.output.logits[:, -1].save())
    for prompt, logits in zip(prompts, last):
        alone = hf(**_ids(lm, prompt)).logits[:, -1]
        assert torch.allclose(logits.value, alone, atol=1e-5), prompt


def test_a_padded_list_in_one_invoke(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.trace(["The city", "The Colosseum is in the city"]):
        last = lm.output.logits[:, -1].save()
    for row, prompt in enumerate(["The city", "The Colosseum is in the city"]):
        assert torch.allclose(last.value[row], hf(**_ids(lm, prompt)).logits[0, -1], atol=1e-5)


def test_labels_give_a_loss(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.trace() as tracer:
        with tracer.invoke("The city of Paris", labels="The city of Paris"):
            loss = lm.output.loss.save()
    encoding = _ids(lm, "The city of Paris")
    assert torch.allclose(loss.value, hf(**encoding, labels=encoding["input_ids"]).loss, atol=1e-5)


def test_bad_input_says_what_it_takes(lm: nnsight.LanguageModel) -> None:
    with pytest.raises(TypeError, match="must be a string, a list of strings, token ids"):
        with lm.trace(3.5):
            pass


# --- generation ---------------------------------------------------------------------


def test_generate_equals_greedy_generate(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.generate("Madison Square", max_new_tokens=4):
        ids = lm.generator.output.save()
    assert torch.equal(ids.value, _greedy(hf, _ids(lm, "Madison Square"), 4))
    assert torch.equal(lm.generate("Madison Square", max_new_tokens=4, trace=False), ids.value)


def test_generate_a_padded_batch(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("The city"):
            pass
        with tracer.invoke("Madison Square Garden is"):
            pass
        ids = lm.generator.output.save()
    for row, prompt in enumerate(["The city", "Madison Square Garden is"]):
        alone = _greedy(hf, _ids(lm, prompt), 3)
        assert torch.equal(ids.value[row, -3:], alone[0, -3:]), prompt


def _plain_steps(hf: Any, lm: nnsight.LanguageModel, path: str, prompt: str, steps: int) -> list[torch.Tensor]:
    return lm_models.plain_steps(hf, path, _ids(lm, prompt), steps)


def test_next_all_and_iter_collect_one_value_per_step(lm: nnsight.LanguageModel, hf: Any) -> None:
    plain = _plain_steps(hf, lm, "transformer.h.1", "The city of", 3)
    assert len(plain) == 3
    with lm.generate("The city of", max_new_tokens=3):
        by_next = [lm.transformer.h[-1].output.save()]
        by_next.append(lm.transformer.h[-1].next().output.save())
        by_next.append(lm.transformer.h[-1].next().output.save())
    with lm.generate("The city of", max_new_tokens=3):
        by_all = nnsight.list().save()
        with lm.transformer.h[-1].all():
            by_all.append(lm.transformer.h[-1].output)
    with lm.generate("The city of", max_new_tokens=3):
        by_iter = nnsight.list().save()
        with lm.transformer.h[-1].iter[0:3:2]:
            by_iter.append(lm.transformer.h[-1].output)
        second = lm.transformer.h[-1].iter[1].output.save()
    with lm.generate("The city of", max_new_tokens=3) as tracer:
        by_tracer = nnsight.list().save()
        with tracer.iter[[0, 2]]:
            by_tracer.append(lm.transformer.h[-1].output)
    for step in range(3):
        assert torch.allclose(hidden(by_next[step].value), plain[step], atol=1e-5)
        assert torch.allclose(hidden(by_all.value[step]), plain[step], atol=1e-5)
    assert len(by_all.value) == 3
    assert [hidden(t).shape for t in by_iter.value] == [plain[0].shape, plain[2].shape]
    assert torch.allclose(hidden(by_iter.value[1]), plain[2], atol=1e-5)
    assert torch.allclose(hidden(second.value), plain[1], atol=1e-5)
    pairs = zip(by_tracer.value, [plain[0], plain[2]])
    assert [torch.allclose(hidden(a), b, atol=1e-5) for a, b in pairs] == [True, True]


def test_a_write_at_every_step(lm: nnsight.LanguageModel, hf: Any) -> None:
    def zero(m: Any, i: Any, o: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(o)

    handle = hf.transformer.h[1].mlp.register_forward_hook(zero)
    try:
        expected = _greedy(hf, _ids(lm, "The city of"), 3)
    finally:
        handle.remove()
    with lm.generate("The city of", max_new_tokens=3):
        with lm.transformer.h[1].mlp.all():
            lm.transformer.h[1].mlp.output[:] = 0
        ids = lm.generator.output.save()
    assert torch.equal(ids.value, expected)


def test_generation_that_stops_early(folder: Path, hf: Any) -> None:
    lm = nnsight.LanguageModel(str(folder))
    first = int(lm.generate("The city of", max_new_tokens=1, trace=False)[0, -1])
    with lm.generate("The city of", max_new_tokens=5, eos_token_id=first):  # stops after one step
        steps = nnsight.list().save()
        with lm.lm_head.all():
            steps.append(lm.lm_head.output)
        fourth = lm.lm_head.iter[3].output.save()
    assert len(steps.value) == 1  # no error for .all()
    with pytest.raises(ValueError, match="not called .that many times."):
        _ = fourth.value


def test_a_loop_written_after_the_generator_warns(lm: nnsight.LanguageModel) -> None:
    with pytest.warns(nnsight.MissedCallsWarning, match="missed calls 0 to 2"):
        with lm.generate("The city", max_new_tokens=3):
            lm.generator.output.save()  # the generator runs last ...
            with lm.lm_head.all():  # ... so this waits until every lm_head call is gone
                lm.lm_head.output.save()


# --- the nnsight 0.4 README, on the tiny model ---------------------------------------


def test_readme_multiple_token_generation(lm: nnsight.LanguageModel, hf: Any) -> None:
    plain = _plain_steps(hf, lm, "transformer.h.1", "The Eiffel Tower is in the city of", 3)
    with lm.generate("The Eiffel Tower is in the city of", max_new_tokens=3):
        hidden_states1 = lm.transformer.h[-1].output.save()
        hidden_states2 = lm.transformer.h[-1].next().output.save()
        hidden_states3 = lm.transformer.h[-1].next().output.save()
    shapes = [hidden(h.value).shape for h in (hidden_states1, hidden_states2, hidden_states3)]
    assert shapes[1:] == [(1, 1, 32), (1, 1, 32)] and shapes[0][1] > 1
    assert torch.allclose(hidden(hidden_states3.value), plain[2], atol=1e-5)


def test_readme_cross_prompt_intervention(lm: nnsight.LanguageModel, hf: Any) -> None:
    source = _ids(lm, "Madison Square Garden is located in the city of")["input_ids"]
    blank = torch.full_like(source, int(source[0, 0]))
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(source):
            embeddings = lm.transformer.wte.output
        with tracer.invoke(blank):
            lm.transformer.wte.output = embeddings
        output = lm.generator.output.save()
    assert torch.equal(output.value[1, -3:], output.value[0, -3:])  # the blank row continues like the source
    greedy = _greedy(hf, {"input_ids": source, "attention_mask": torch.ones_like(source)}, 3)
    assert torch.equal(output.value[0], greedy[0])


def test_readme_adhoc_module_logit_lens(lm: nnsight.LanguageModel) -> None:
    with lm.trace("The Eiffel Tower is in the city of"):
        hidden_states = _hidden_of(lm.transformer.h[-1])  # 0.4 wrote .output[0] (transformers 4)
        lens = lm.lm_head(lm.transformer.ln_f(hidden_states)).save()
        tokens = cast(nnsight.Proxy, torch.softmax(lens, dim=2).argmax(dim=2)).save()
        logits = lm.output.logits.save()
    assert torch.allclose(lens.value, logits.value, atol=1e-5)
    assert torch.equal(tokens.value, logits.value.argmax(dim=2))
    assert isinstance(lm.tokenizer.decode(tokens.value[0]), str)


def test_a_sweep_over_prompts(folder: Path, hf: Any) -> None:
    """A list of prompts in batches (left-padded), each prompt's last logits
    as if it ran alone; the top prompts by the logit of one token."""
    import functools

    prompts = [line[: 8 + 3 * i] for i, line in enumerate(CORPUS * 2)]
    factory = functools.partial(nnsight.LanguageModel, str(folder))
    graph = nnsight.trace(factory(), lambda m: {"last": m.output.logits[:, -1], "token_5": m.output.logits[:, -1, 5]})
    swept = nnsight.sweep(factory, graph, prompts, batch_size=4, progress=False,
                          reduce={"last": nnsight.reducers.concat(), "token_5": nnsight.reducers.top_k(2)})
    alone = torch.cat([hf(**_ids(factory(), prompt)).logits[:, -1] for prompt in prompts])
    assert (swept.batches, swept.examples) == (2, 6)
    assert torch.allclose(swept["last"], alone, atol=1e-5)
    values, indexes = swept["token_5"]
    assert indexes.tolist() == torch.sort(alone[:, 5], descending=True, stable=True).indices[:2].tolist()
