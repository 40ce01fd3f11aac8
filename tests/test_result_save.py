"""``tracer.result`` (what the traced method returned) and ``nnsight_pure.save(x)``.

``tracer.result`` is compared with the method's own return value, called
directly (the model's output for ``trace``, ``generate``'s ids), per invoke;
``save`` with the values the proxies in it stand for.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests import lm_models
from tests.helpers import TinyNet


@pytest.fixture
def x3() -> torch.Tensor:
    torch.manual_seed(4)
    return torch.rand(3, 5)


# --- tracer.result on a tiny net -----------------------------------------------------------


def test_result_is_what_the_forward_returns(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3) as tracer:
        result = tracer.result.save()
        doubled = (tracer.result * 2).save()
    assert torch.equal(result.value, net(x3))
    assert torch.allclose(doubled.value, net(x3) * 2)


def test_result_sees_the_interventions(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3) as tracer:
        model.layer1.output = model.layer1.output * 0
        result = tracer.result.save()
    assert torch.allclose(result.value, net.layer2(torch.zeros(3, 10)))


def test_result_is_this_invokes_rows(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace() as tracer:
        with tracer.invoke(x3[:1]):
            first = tracer.result.save()
        with tracer.invoke(x3[1:]):
            rest = tracer.result.save()
        everything = tracer.result.save()  # (outside the invokes: the whole batch)
    assert torch.allclose(first.value, net(x3[:1])) and first.value.shape == (1, 2)
    assert torch.allclose(rest.value, net(x3[1:])) and rest.value.shape == (2, 2)
    assert torch.allclose(everything.value, net(x3))


def test_result_is_read_only(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="read-only"):
        with model.trace(x3) as tracer:
            tracer.result = torch.zeros(3, 2)


def test_a_write_after_reading_the_result_is_out_of_order(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(nnsight.OutOfOrderError, match="the end of the run"):
        with model.trace(x3) as tracer:
            total = tracer.result.sum()
            model.layer1.output = model.layer1.output + total
    findings = nnsight.check(model, tracer.graph, x3)
    assert [f.kind for f in findings] == ["out_of_order"] and "the end of the run" in str(findings[0])


def test_result_through_json_and_replay(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3) as tracer:
        result = (tracer.result + 1).save()
    graph = nnsight.from_json(nnsight.to_json(tracer.graph))
    assert graph == tracer.graph
    y = x3 * 3
    replayed = nnsight.run(model, graph, y).values[result._ref.index]
    assert torch.allclose(replayed, net(y) + 1)


def test_result_in_a_scan_has_the_returned_shape(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.scan(x3) as tracer:
        shape = tracer.result.shape
    assert tuple(shape) == (3, 2)
    with model.trace(x3, validate=True) as tracer:
        result = tracer.result[:, :1].save()
    assert result.value.shape == (3, 1)


def test_result_in_a_session(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.session():
        with model.trace(x3) as first:
            a = first.result.save()
        with model.trace(x3 * 2) as second:
            b = (second.result + a).save()
    assert torch.allclose(a.value, net(x3))
    assert torch.allclose(b.value, net(x3 * 2) + net(x3))


# --- tracer.result on a language model -----------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm_models.save("gpt2", tmp_path_factory.mktemp("tiny-gpt2-result"))


@pytest.fixture(scope="module")
def hf(folder: Path) -> Any:
    return lm_models.plain(folder)


@pytest.fixture
def lm(folder: Path) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder))


def test_result_of_a_language_model_trace_is_its_output(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.trace("The city of") as tracer:
        logits = tracer.result.logits.save()
    expected = hf(**lm_models.encode(lm.tokenizer, "The city of")).logits
    assert torch.allclose(logits.value, expected, atol=1e-5)


def test_result_of_generate_is_the_ids(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.generate("The city of", max_new_tokens=3) as tracer:
        ids = tracer.result.save()
        old = lm.generator.output.save()  # (the older spelling, kept)
    expected = lm_models.greedy(hf, lm_models.encode(lm.tokenizer, "The city of"), 3)
    assert torch.equal(ids.value, expected) and torch.equal(old.value, expected)


def test_result_of_generate_per_invoke(lm: nnsight.LanguageModel, hf: Any) -> None:
    prompts = ["The city", "Madison Square Garden is"]
    with lm.generate(max_new_tokens=3) as tracer:
        rows = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                rows.append(tracer.result.save())
        both = tracer.result.save()
    for row, prompt in zip(rows, prompts):
        alone = lm_models.greedy(hf, lm_models.encode(lm.tokenizer, prompt), 3)
        assert row.value.shape[0] == 1
        assert torch.equal(row.value[0, -3:], alone[0, -3:]), prompt
    assert torch.equal(both.value, torch.cat([row.value for row in rows]))


def test_result_of_generate_in_a_scan_and_a_session(lm: nnsight.LanguageModel, hf: Any) -> None:
    with lm.generate("The city of", max_new_tokens=3, scan=True, validate=True) as tracer:
        shape = tracer.result.shape
    assert tuple(shape) == (1, 6)
    with lm.session():
        with lm.trace("The city of") as first:
            logits = first.result.logits.save()
        with lm.generate("The city of", max_new_tokens=2) as second:
            ids = second.result.save()
    encoding = lm_models.encode(lm.tokenizer, "The city of")
    assert torch.allclose(logits.value, hf(**encoding).logits, atol=1e-5)
    assert torch.equal(ids.value, lm_models.greedy(hf, encoding, 2))


# --- nnsight_pure.save ---------------------------------------------------------------------


Pair = collections.namedtuple("Pair", "hidden out")


def test_save_of_a_proxy_is_its_save(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3):
        hidden = nnsight.save(model.layer1.output)
        assert isinstance(hidden, nnsight.Proxy)
    assert torch.allclose(hidden.value, net.layer1(x3))


def test_save_of_plain_values_holding_proxies(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.trace(x3) as tracer:
        listed = nnsight.save([model.layer1.output, {"out": model.output, "n": 3}])
        pair = nnsight.save((model.layer1.output, model.output))
    graph = tracer.graph
    with model.trace(x3):
        named = nnsight.save(Pair(model.layer1.output, model.output))
    hidden, out = net.layer1(x3), net(x3)
    assert type(listed.value) is list and listed.value[1]["n"] == 3
    assert torch.allclose(listed.value[0], hidden) and torch.allclose(listed.value[1]["out"], out)
    assert type(pair.value) is tuple and torch.allclose(pair.value[1], out)
    assert type(named.value) is Pair and torch.allclose(named.value.hidden, hidden)
    replayed = nnsight.run(model, nnsight.from_json(nnsight.to_json(graph)), x3 * 2).values[listed._ref.index]
    assert torch.allclose(replayed[1]["out"], net(x3 * 2))


def test_save_of_a_value_without_proxies_is_that_value(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    plain = {"steps": [1, 2]}
    with model.trace(x3) as tracer:
        kept = nnsight.save(plain)
        model.output.save()
    assert kept is plain
    assert "list(" not in str(tracer.graph) and "dict(" not in str(tracer.graph)


def test_save_in_an_invoke_and_a_session(net: TinyNet, model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with model.session():
        with model.trace() as tracer:
            with tracer.invoke(x3[:1]):
                first = nnsight.save([model.output])
            with tracer.invoke(x3[1:]):
                rest = nnsight.save({"out": model.output})
    assert torch.allclose(first.value[0], net(x3[:1])) and torch.allclose(rest.value["out"], net(x3[1:]))


def test_save_outside_a_trace_is_an_error(model: nnsight.NNsight, x3: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="needs an open trace"):
        nnsight.save(torch.zeros(1))
    with model.trace(x3):
        out = model.output.save()
    with pytest.raises(nnsight.TraceError, match="needs an open trace"):
        nnsight.save(out)
