"""``check(model, graph, *inputs)``: whole-program checks against the model's
call order, from one fake scan, before anything runs.

Each finding kind is shown on the tiny net and on the GPT-2-shaped model,
together with what the same graph does without `check`: fail at run time
(after the weights ran) or silently give nothing. A clean program gives no
findings, a graph read back from JSON gives the same ones, and `check`
never runs the user's model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import nnsight_pure as nnsight
from nnsight_pure import check
from nnsight_pure.errors import MissedCallsWarning, OutOfOrderError
from nnsight_pure.findings import Finding, Findings, raise_first
from nnsight_pure.graph import Graph
from nnsight_pure.ops import ModuleGet, ModuleSet, Save
from tests.helpers import WithSpare

PROMPT = "The Eiffel Tower is in the city of"


def _graph(model: nnsight.NNsight, fn: Callable[[Any], Any], **kwargs: Any) -> Graph:
    return nnsight.trace(model, fn, **kwargs)


def _outputs_missing(model: nnsight.NNsight, graph: Graph, *inputs: Any, **kwargs: Any) -> None:
    """The run finishes, but what the graph returns never got a value."""
    results = nnsight.run(model, graph, *inputs, **kwargs)
    with pytest.raises(ValueError, match="never reached"):
        results.outputs


def _only(findings: Findings, kind: str) -> Finding:
    assert findings.kinds() == (kind,), str(findings)
    return findings[0]


# --- a write after the model has passed the call --------------------------------------


def _late_write(model: Any) -> Any:
    later = model.layer2.output.save()
    model.layer1.output = model.layer1.output * 0
    return later


def test_out_of_order_write(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _graph(model, _late_write)
    finding = _only(check(model, graph, x), "out_of_order")
    assert "model.layer1.output" in finding.message and "model.layer2.output" in finding.message
    assert finding.source is not None and finding.source.filename == __file__
    assert isinstance(graph.nodes[finding.node].op, ModuleSet)  # the write
    with pytest.raises(OutOfOrderError):
        nnsight.run(model, graph, x)


def test_out_of_order_in_place_write_gpt2(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    def late(model: Any) -> Any:
        model.transformer.h[1].output[0].save()
        model.transformer.h[0].output[0][:] = 0

    graph = _graph(gpt2, late)
    finding = _only(check(gpt2, graph, ids), "out_of_order")
    assert "model.transformer.h.0.output" in finding.message
    with pytest.raises(OutOfOrderError):
        nnsight.run(gpt2, graph, ids)


def test_out_of_order_write_through_any_view_the_run_follows(model: nnsight.NNsight, x: torch.Tensor) -> None:
    # The check follows views exactly as the run's guard does (`.T`, `.view_as`,
    # `.split`...), so what the run would refuse, the check reports.
    def late(model: Any) -> Any:
        after = model.layer2.output.save()
        hidden = model.layer1.output
        hidden.view_as(hidden).T[:] = 0
        return after

    graph = _graph(model, late)
    finding = _only(check(model, graph, x), "out_of_order")
    assert "model.layer1.output" in finding.message
    with pytest.raises(OutOfOrderError):
        nnsight.run(model, graph, x)


def test_reading_an_earlier_call_is_fine(model: nnsight.NNsight, x: torch.Tensor) -> None:
    def read_back(model: Any) -> Any:
        return model.layer2.output.save(), model.layer1.output.save()

    graph = _graph(model, read_back)
    assert not check(model, graph, x)
    assert nnsight.run(model, graph, x).outputs[1].shape == (1, 10)


# --- modules not called, calls not made --------------------------------------------------


def test_module_never_called(x: torch.Tensor) -> None:
    model = nnsight.NNsight(WithSpare())
    graph = _graph(model, lambda m: m.spare.output.save())
    finding = _only(check(model, graph, x), "not_called")
    assert "model.spare" in finding.message and "model.used" in finding.message
    _outputs_missing(model, graph, x)


def test_misspelt_path_suggests_the_nearest_gpt2(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    graph, ref = Graph().add(ModuleGet("transformer.h.0.attnn", "output"), invoke=0)
    graph, _ = graph.add(Save(), (ref,), invoke=0)
    finding = _only(check(gpt2, graph, ids), "not_called")
    assert "did you mean model.transformer.h.0.attn?" in finding.message
    assert "model.transformer.h.0.mlp" in finding.message  # what it does call there


def test_call_beyond_the_count(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _graph(model, lambda m: m.layer1.next().output.save())
    finding = _only(check(model, graph, x), "call_range")
    assert "[call 1]" in finding.message and "only 1 time" in finding.message
    _outputs_missing(model, graph, x)


# --- loops over calls --------------------------------------------------------------------


def _loop_of_three(model: Any) -> Any:
    with model.layer1.iter[0:3]:
        out = model.layer1.output.save()
    return out


def test_loop_beyond_the_calls(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _graph(model, _loop_of_three)
    finding = _only(check(model, graph, x), "loop_range")
    assert "calls 0 to 2" in finding.message and "from call 1 on" in finding.message
    _outputs_missing(model, graph, x)


def test_loop_reading_nothing_of_its_scope(model: nnsight.NNsight, x: torch.Tensor) -> None:
    def elsewhere(model: Any) -> Any:
        with model.layer1.all():
            out = model.layer2.output.save()
        return out

    with pytest.warns(MissedCallsWarning):  # (tracing warns too, when the block closes)
        graph = _graph(model, elsewhere)
    finding = _only(check(model, graph, x), "empty_loop")
    assert finding.is_warning and isinstance(finding.error(), MissedCallsWarning)
    # Run from the graph, it warns nothing: its block just runs once.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nnsight.run(model, graph, x).outputs.shape == (1, 2)


# --- generation: call counts from a scan of generate ------------------------------------


@pytest.fixture(scope="module")
def family() -> str:
    return "gpt2"


@pytest.fixture
def lm(folder: Path) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder))  # lazy: its weights are on the meta device


def test_generate_loop_beyond_max_new_tokens(lm: nnsight.LanguageModel) -> None:
    def steps(model: Any) -> Any:
        with model.transformer.h[1].iter[0:5]:
            out = model.transformer.h[1].output[0].save()
        return out

    graph = _graph(lm, steps, method="generate", max_new_tokens=2)
    finding = _only(check(lm, graph, PROMPT, method="generate", max_new_tokens=2), "loop_range")
    assert "generate(max_new_tokens=2) calls model.transformer.h.1 only 2 times" in finding.message
    assert not check(lm, graph, PROMPT, method="generate", max_new_tokens=5)
    assert not lm.dispatched  # no weights were loaded
    _outputs_missing(lm, graph, PROMPT, method="generate", max_new_tokens=2)


def test_generate_next_beyond_max_new_tokens(lm: nnsight.LanguageModel) -> None:
    graph = _graph(lm, lambda m: m.transformer.h[1].next().next().output[0].save(), method="generate")
    _only(check(lm, graph, PROMPT, method="generate", max_new_tokens=2), "call_range")
    assert not check(lm, graph, PROMPT, method="generate", max_new_tokens=3)
    assert not lm.dispatched
    _outputs_missing(lm, graph, PROMPT, method="generate", max_new_tokens=2)


# --- gradients ---------------------------------------------------------------------------


def _grad_without_backward(model: Any) -> Any:
    hidden = model.layer1.output
    hidden.requires_grad_()
    grad = hidden.grad.save()
    model.layer2.output.sum()
    return grad


def test_grad_with_no_backward(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _graph(model, _grad_without_backward)
    finding = _only(check(model, graph, x), "no_backward")
    assert ".grad" in finding.message
    _outputs_missing(model, graph, x)


def test_grad_after_the_last_backward_gpt2(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    def late(model: Any) -> Any:
        hidden = model.transformer.h[0].output[0]
        hidden.requires_grad_()
        model.lm_head.output.sum().backward()
        return hidden.grad.save()

    graph = _graph(gpt2, late)
    finding = _only(check(gpt2, graph, ids), "no_backward")
    assert "after the last one" in finding.message
    _outputs_missing(gpt2, graph, ids)


def test_grad_before_backward_is_clean(model: nnsight.NNsight, x: torch.Tensor) -> None:
    def fine(model: Any) -> Any:
        hidden = model.layer1.output
        hidden.requires_grad_()
        grad = hidden.grad.save()
        model.layer2.output.sum().backward()
        return grad

    graph = _graph(model, fine)
    assert not check(model, graph, x)
    assert nnsight.run(model, graph, x).outputs.shape == (1, 10)


# --- across invokes ----------------------------------------------------------------------


def test_value_of_a_later_invoke(model: nnsight.NNsight, x: torch.Tensor) -> None:
    tracer = model.trace()
    with pytest.raises(OutOfOrderError):  # without check: fails at run time
        with tracer:
            with tracer.invoke(x):
                late = model.layer2.output
            with tracer.invoke(x):
                model.layer1.output = late[:, :1].expand(1, 10)
    findings = check(model, tracer.graph, invokes=[((x,), {}), ((x,), {})])
    finding = _only(findings, "cross_invoke")
    assert "invoke 0" in finding.message and "invoke 1" in finding.message


def test_cross_invoke_gpt2(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    tracer = gpt2.trace()
    with pytest.raises(OutOfOrderError):
        with tracer:
            with tracer.invoke(ids):
                late = gpt2.lm_head.output
            with tracer.invoke(ids):
                gpt2.transformer.h[0].mlp.output = late[..., :32]
    _only(check(gpt2, tracer.graph, invokes=[((ids,), {}), ((ids,), {})]), "cross_invoke")


# --- shapes ------------------------------------------------------------------------------


def _bad_shape(model: Any) -> Any:
    return (model.layer1.output @ torch.ones(3, 3)).save()


def test_shape_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _graph(model, _bad_shape)
    finding = _only(check(model, graph, x), "shape")
    assert "matmul" in finding.message
    with pytest.raises(RuntimeError):
        nnsight.run(model, graph, x)


def test_shape_of_a_write_gpt2(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    def wrong(model: Any) -> None:
        model.transformer.h[0].mlp.output = torch.zeros(3)

    graph = _graph(gpt2, wrong)
    finding = _only(check(gpt2, graph, ids), "shape")
    assert "has shape (1, 8, 32)" in finding.message


# --- clean programs, JSON, and never running the weights -----------------------------------


def test_clean_programs_have_no_findings(
    model: nnsight.NNsight, x: torch.Tensor, gpt2: nnsight.NNsight, ids: torch.Tensor
) -> None:
    assert str(check(model, _graph(model, lambda m: (m.layer1.output * 2).save()), x)) == "no findings"

    def edit(model: Any) -> Any:
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 0
        return model.lm_head.output.save()

    assert not check(gpt2, _graph(gpt2, edit), ids)


@pytest.mark.parametrize("fn", [_late_write, _loop_of_three, _grad_without_backward, _bad_shape])
def test_json_round_trip_gives_the_same_findings(
    model: nnsight.NNsight, x: torch.Tensor, fn: Callable[[Any], Any]
) -> None:
    graph = _graph(model, fn)
    loaded = nnsight.from_json(nnsight.to_json(graph))
    assert check(model, loaded, x) == check(model, graph, x)
    assert check(model, loaded, x)


class _RealWeightsRaise(torch.nn.Module):
    """A model whose forward refuses to run on real weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = torch.nn.Linear(5, 10)
        self.layer2 = torch.nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.layer1.weight, FakeTensor):
            raise RuntimeError("the real weights ran")
        out: torch.Tensor = self.layer2(self.layer1(x))
        return out


def test_check_never_runs_the_real_weights(x: torch.Tensor) -> None:
    model = nnsight.NNsight(_RealWeightsRaise())
    assert not check(model, _graph(model, lambda m: m.layer2.output.save()), x)
    _only(check(model, _graph(model, _late_write), x), "out_of_order")
    with pytest.raises(RuntimeError, match="the real weights ran"):
        nnsight.run(model, _graph(model, lambda m: m.layer2.output.save()), x)


def test_findings_are_frozen_values(model: nnsight.NNsight, x: torch.Tensor) -> None:
    findings = check(model, _graph(model, _late_write), x)
    finding = findings[0]
    with pytest.raises(AttributeError):
        finding.kind = "shape"  # type: ignore[misc]  # frozen
    assert len(findings) == 1 and list(findings) == [finding]
    assert str(findings).startswith("1. ") and "[out_of_order, at test_check.py:" in str(finding)
    assert hash(findings) == hash(check(model, _graph(model, _late_write), x))


def test_raise_first_raises_as_the_run_would(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(OutOfOrderError, match="writes too late"):
        raise_first(check(model, _graph(model, _late_write), x))
    with pytest.raises(ValueError, match="never gets a value"):
        raise_first(check(model, _graph(model, _grad_without_backward), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raise_first(check(model, _graph(model, lambda m: m.layer1.output.save()), x))  # nothing to raise


def test_what_a_trace_would_run_at_its_exit(lm: nnsight.LanguageModel) -> None:
    """A trace's graph, method name and inputs as the tracer holds them at its
    exit give the findings `check` gives from the inputs as written."""
    from nnsight_pure.program_check import check_invokes, check_prepared

    graph = _graph(lm, lambda m: m.transformer.h[1].next().next().output[0].save(), method="generate")
    adapter = lm._adapter()
    as_given = check_invokes(adapter, graph, "_generate", [((PROMPT,), {})], {"max_new_tokens": 2})
    prepared, _ = lm._prepare_input(PROMPT)
    assert check_prepared(adapter, graph, "_generate", [prepared], {"max_new_tokens": 2}) == as_given
    assert as_given.kinds() == ("call_range",) and "generate(max_new_tokens=2)" in str(as_given)
    with pytest.raises(ValueError, match="never gets a value"):
        raise_first(as_given)
    assert not lm.dispatched


def test_validate_raises_the_first_finding_before_the_model_runs(lm: nnsight.LanguageModel) -> None:
    # Without validate the run would load the weights, generate, and only
    # then find that the third step's value never came.
    with pytest.raises(ValueError, match="never gets a value"):
        with lm.generate(PROMPT, max_new_tokens=2, validate=True):
            lm.transformer.h[1].next().next().output[0].save()
    assert not lm.dispatched


def test_run_with_validate_checks_a_graph_read_from_json(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = nnsight.from_json(nnsight.to_json(_graph(model, _late_write)))
    calls: list[str] = []
    handle = model._model.get_submodule("layer1").register_forward_hook(lambda *_: calls.append("layer1"))
    try:
        with pytest.raises(OutOfOrderError):
            nnsight.run(model, graph, x, validate=True)
        assert calls == []  # found before the model ran
        with pytest.raises(OutOfOrderError):
            nnsight.run(model, graph, x)
        assert calls == ["layer1"]  # without validate: found by the run, after the weights ran
    finally:
        handle.remove()


def test_modules_called_ad_hoc_with_hooks_are_not_judged(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    """A hooked ad-hoc call (an edit's attachment) makes calls the scan never
    sees: reads of that module are left alone, not called \"never called\"."""
    from nnsight_pure.util import WrapperModule

    block = gpt2.transformer.h[0]
    block.probe = WrapperModule()
    with gpt2.edit(ids) as edited:
        block.output = block.probe(block.output, hook=True)
    graph = _graph(edited, lambda m: m.transformer.h[0].probe.output.save())
    assert not check(edited, graph, ids)
    assert nnsight.run(edited, graph, ids).outputs is not None


def test_a_late_write_under_a_condition_says_so(model: nnsight.NNsight, x: torch.Tensor) -> None:
    def conditional(model: Any) -> None:
        flag = model.layer2.output.sum() > 0
        with nnsight.cond(flag):
            model.layer1.output[:] = 0

    finding = _only(check(model, _graph(model, conditional), x), "out_of_order")
    assert "(when its condition holds)" in finding.message


def test_loops_within_the_generation_are_clean(lm: nnsight.LanguageModel) -> None:
    def every_step(model: Any) -> Any:
        block = model.transformer.h[1]
        with block.all():
            block.output[0][:] = 0
        with model.transformer.h[0].iter[0:2]:
            out = model.transformer.h[0].output[0].save()
        return out

    graph = _graph(lm, every_step, method="generate")
    assert not check(lm, graph, PROMPT, method="generate", max_new_tokens=2), "no findings"
    assert not lm.dispatched
