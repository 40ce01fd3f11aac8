"""``scan=True`` and ``validate=True`` on Hugging Face models, under the
installed transformers (4.x or 5.x).

transformers reads tensor data in Python (the SDPA mask asks whether the
attention mask is all ones; ``generate`` whether every row has finished),
which plain fake tensors cannot answer. A scan keeps the values of what is
computed from the inputs alone, and ``generate`` scans as a run of all its
steps. The user's hooks, global ones included, never see a fake tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import nnsight_pure as nnsight
from tests import lm_models
from tests.lm_models import AS_GPT2, BLOCK_RETURNS_TUPLE, FAMILIES, hidden

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def lm(folder: Path, family: str) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder), rename=AS_GPT2[family])


@pytest.fixture(scope="module")
def hf_logits(folder: Path) -> Any:
    model = lm_models.plain(folder)
    with torch.no_grad():
        return model(**lm_models.encode(lm_models.tokenizer(), PROMPT)).logits


def _hidden(block: Any, family: str) -> Any:
    return block.output[0] if BLOCK_RETURNS_TUPLE[family] else block.output


def _tokens(lm: nnsight.LanguageModel, text: str) -> int:
    return len(lm.tokenizer(text)["input_ids"])


@pytest.mark.parametrize("dispatch", [False, True], ids=["lazy", "dispatch"])
def test_scan_a_trace(folder: Path, family: str, dispatch: bool) -> None:
    lm = nnsight.LanguageModel(str(folder), rename=AS_GPT2[family], dispatch=dispatch)
    with lm.scan(PROMPT):
        width = _hidden(lm.transformer.h[0], family).shape
        vocab = lm.output.logits.shape
    assert width == (1, _tokens(lm, PROMPT), lm_models.WIDTH)
    assert vocab == (1, _tokens(lm, PROMPT), len(lm.tokenizer))
    assert lm.dispatched == dispatch


def test_scan_and_validate_then_run(lm: nnsight.LanguageModel, family: str) -> None:
    """Shapes known while tracing are the shapes of the real run."""
    with lm.trace(PROMPT, scan=True, validate=True):
        lm.transformer.h[1].mlp.output = lm.transformer.h[1].mlp.output * 2
        shape = _hidden(lm.transformer.h[1], family).shape
        last = _hidden(lm.transformer.h[1], family).save()
        logits = lm.output.logits.save()
    assert shape == last.value.shape and logits.value.shape[-1] == len(lm.tokenizer)


def test_validate_alone(lm: nnsight.LanguageModel, hf_logits: Any) -> None:
    """``validate=True`` without ``scan=True`` (fake values of the trace's own
    computations) on a trace and a generation, then the real values."""
    with lm.trace(PROMPT, validate=True):
        logits = lm.output.logits.save()
    with lm.generate(PROMPT, max_new_tokens=2, validate=True):
        ids = lm.generator.output.save()
    assert torch.allclose(logits.value, hf_logits, atol=1e-5)
    assert ids.value.shape[1] == _tokens(lm, PROMPT) + 2


def test_validate_finds_a_shape_error_before_running(lm: nnsight.LanguageModel) -> None:
    with pytest.raises(ValueError, match="has shape"):
        with lm.trace(PROMPT, scan=True, validate=True):
            lm.transformer.h[0].mlp.output = torch.zeros(1, 2, 3)
    assert not lm.dispatched  # found before any weight was read


def test_scan_a_padded_batch(lm: nnsight.LanguageModel, family: str) -> None:
    """A left-padded batch: the mask is not all ones (transformers 4.x asks)."""
    with lm.trace(scan=True) as tracer:
        with tracer.invoke(["The city", PROMPT]):
            shape = lm.output.logits.shape
            logits = lm.output.logits.save()
    assert shape == logits.value.shape == (2, _tokens(lm, PROMPT), len(lm.tokenizer))


@pytest.mark.parametrize("dispatch", [False, True], ids=["lazy", "dispatch"])
def test_scan_generate(folder: Path, family: str, dispatch: bool) -> None:
    lm = nnsight.LanguageModel(str(folder), rename=AS_GPT2[family], dispatch=dispatch)
    with lm.generate("Hello", max_new_tokens=2, scan=True):
        first = _hidden(lm.transformer.h[-1], family).shape
        ids = lm.generator.output.save()
    assert first == (1, _tokens(lm, "Hello"), lm_models.WIDTH)
    assert ids.value.shape == (1, _tokens(lm, "Hello") + 2)
    with lm.generate(PROMPT, max_new_tokens=3, validate=True, scan=True):
        tokens = nnsight.list().save()
        with lm.lm_head.all():
            tokens.append(lm.lm_head.output[:, -1].argmax(dim=-1))
        ids = lm.generator.output.save()
    assert [int(t) for t in tokens.value] == ids.value[0, -3:].tolist()


def test_scan_generate_with_sampling_and_eos(lm: nnsight.LanguageModel) -> None:
    """The scan of a generation that may stop early or samples: no data is read."""
    with lm.generate(PROMPT, max_new_tokens=3, scan=True, do_sample=True, eos_token_id=[1, 2]):
        shape = lm.lm_head.output.shape
        logits = lm.lm_head.output.save()
    # (generate asks most models for the last position only: 1 token, not 9)
    assert shape == logits.value.shape and shape[-1] == len(lm.tokenizer)


def test_scan_generate_sees_every_step(lm: nnsight.LanguageModel, family: str) -> None:
    with lm.generate(PROMPT, max_new_tokens=3, scan=True):
        third = _hidden(lm.transformer.h[-1].iter[2], family).shape
    assert third == (1, 1, lm_models.WIDTH)


def test_a_scan_of_generate_runs_every_step(lm: nnsight.LanguageModel, family: str) -> None:
    """What the scan of ``generate`` records when given ``max_new_tokens``:
    one call per step, each step one token (the scan's own function, called
    as the tracer calls it)."""
    from nnsight_pure import scan as scan_module

    mode = scan_module.new_mode()
    faked = lm._shallow_copy()
    object.__setattr__(faked, "_handle", lm._handle.with_module(scan_module.fake_copy(lm._model, mode)))
    (args, kwargs), _ = lm._prepare_input(PROMPT)
    seen = scan_module.scan(
        faked._model, faked._generate, args, {**kwargs, "max_new_tokens": 3, "eos_token_id": 1}, mode
    )
    block = lm_models.BLOCKS[family] + ".1"
    steps = [hidden(seen[(block, "post", call)]).shape for call in range(3)]
    assert steps == [(1, _tokens(lm, PROMPT), lm_models.WIDTH), (1, 1, lm_models.WIDTH), (1, 1, lm_models.WIDTH)]
    assert (block, "post", 3) not in seen
    assert seen[("generator", "post", 0)].shape == (1, _tokens(lm, PROMPT) + 3)


# --- the user's hooks never see a fake tensor ---------------------------------------


@pytest.fixture
def global_hooks() -> Iterator[list[tuple[str, Any]]]:
    """Global forward and forward-pre hooks that record what they see and read
    a value (which a fake tensor cannot give)."""
    seen: list[tuple[str, Any]] = []

    def pre(module: torch.nn.Module, args: Any) -> None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                seen.append(("pre", arg))
                float(arg.detach().float().sum())

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            seen.append(("post", output))
            float(output.detach().float().sum())

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre),
        torch.nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_global_hooks_never_see_fakes(
    lm: nnsight.LanguageModel, family: str, global_hooks: list[tuple[str, Any]]
) -> None:
    with lm.scan(PROMPT):
        _ = lm.output.logits.shape
    with lm.trace(PROMPT, scan=True, validate=True):
        lens = lm.lm_head(lm.transformer.ln_f(_hidden(lm.transformer.h[-1], family)))  # an ad-hoc call, faked too
        _ = lens.shape
        logits = lm.output.logits.save()
    with lm.generate("Hello", max_new_tokens=2, scan=True):
        lm.generator.output.save()
    assert global_hooks and not any(isinstance(value, FakeTensor) for _, value in global_hooks)
    assert any(value.shape == logits.value.shape for _, value in global_hooks)  # the real runs were seen
    wrapped = [hook for hook in torch.nn.modules.module._global_forward_hooks.values()
               if type(hook).__name__ == "_UnlessFake"]
    assert wrapped == []  # unwrapped once the scans ended


def test_the_models_own_hooks_never_see_fakes(folder: Path, family: str) -> None:
    lm = nnsight.LanguageModel(str(folder), rename=AS_GPT2[family], dispatch=True)
    seen: list[Any] = []
    handle = lm._model.get_submodule(lm_models.FINAL_NORM[family]).register_forward_hook(
        lambda m, i, o: seen.append(o)
    )
    try:
        with lm.generate(PROMPT, max_new_tokens=2, scan=True):
            lm.generator.output.save()
    finally:
        handle.remove()
    assert len(seen) == 2 and not any(isinstance(value, FakeTensor) for value in seen)
    assert hidden(seen[0]).shape[1] == _tokens(lm, PROMPT)


def test_a_thread_that_runs_meanwhile_still_calls_global_hooks() -> None:
    """Global hooks are skipped only in the scanning thread."""
    import threading

    from nnsight_pure import scan as scan_module

    calls: list[int] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(1))
    done = threading.Event()
    try:
        with scan_module._hidden_from_global_hooks():
            def other() -> None:
                torch.nn.Linear(2, 2)(torch.ones(1, 2))
                done.set()

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
            torch.nn.Linear(2, 2)(torch.ones(1, 2))  # this thread: skipped
    finally:
        handle.remove()
    assert done.is_set() and calls == [1]
