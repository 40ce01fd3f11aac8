"""Loading a LanguageModel as nnsight's tutorials do: ``device_map=``
(``"auto"``, ``"cpu"``, a dict; needs accelerate), lazily on the meta device
or at once with ``dispatch=True``, and ``torch_dtype=`` under the name the
installed transformers takes (4.53 rejects ``dtype=``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests import lm_models
from tests.lm_models import BLOCKS, hidden

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _dict_map(family: str) -> dict[str, str]:
    """Every top-level part of the model, each mapped to the CPU by name."""
    base = BLOCKS[family].split(".")[0]
    return {base: "cpu", lm_models.UNEMBED[family]: "cpu"}


def test_accelerate_is_there() -> None:
    """transformers needs accelerate for any device_map (the lm extra has it)."""
    import importlib.util

    assert importlib.util.find_spec("accelerate") is not None


@pytest.mark.parametrize("dispatch", [False, True], ids=["lazy", "dispatch"])
@pytest.mark.parametrize("device_map", ["auto", "cpu", "dict"])
def test_device_map(folder: Path, hf: Any, family: str, device_map: str, dispatch: bool) -> None:
    mapping: Any = _dict_map(family) if device_map == "dict" else device_map
    lm = nnsight.LanguageModel(str(folder), device_map=mapping, dispatch=dispatch)
    assert lm.dispatched == dispatch
    assert lm.device == (torch.device("cpu") if dispatch else torch.device("meta"))
    with lm.trace(PROMPT):
        logits = lm.output.logits.save()
    assert lm.dispatched and lm.device == torch.device("cpu")
    assert torch.allclose(logits.value, hf(**lm_models.encode(lm.tokenizer, PROMPT)).logits, atol=1e-5)
    with lm.generate(PROMPT, max_new_tokens=2):
        ids = lm.generator.output.save()
    assert torch.equal(ids.value, lm_models.greedy(hf, lm_models.encode(lm.tokenizer, PROMPT), 2))


@pytest.mark.parametrize("keyword", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("dispatch", [False, True], ids=["lazy", "dispatch"])
def test_dtype(folder: Path, family: str, keyword: str, dispatch: bool) -> None:
    """The weights load in the dtype asked for, lazily too (a scan sees it)."""
    import transformers

    dtype: dict[str, Any] = {keyword: torch.bfloat16}
    lm = nnsight.LanguageModel(str(folder), dispatch=dispatch, **dtype)
    assert next(lm._model.parameters()).dtype == torch.bfloat16
    with lm.scan(PROMPT):
        scanned = lm.output.logits.dtype
    assert scanned == torch.bfloat16
    with lm.trace(PROMPT):
        block = lm.get(f"{BLOCKS[family]}.0.output").save()
        logits = lm.output.logits.save()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, **{"dtype" if lm_models.TRANSFORMERS_MAJOR >= 5 else "torch_dtype": torch.bfloat16}
    )
    assert hidden(block.value).dtype == torch.bfloat16
    assert torch.equal(logits.value, hf(**lm_models.encode(lm.tokenizer, PROMPT)).logits)


def test_device_map_and_scan(folder: Path, family: str) -> None:
    """A scan of a model loaded with accelerate's hooks, and after, real runs."""
    lm = nnsight.LanguageModel(str(folder), device_map="auto", dispatch=True)
    with lm.trace(PROMPT, scan=True):
        shape = lm.output.logits.shape
        logits = lm.output.logits.save()
    assert shape == logits.value.shape


@pytest.mark.parametrize(("version", "keyword"), [("4.53.3", "torch_dtype"), ("4.56.0", "dtype"), ("5.0.0", "dtype")])
def test_the_dtype_keyword_follows_the_version(version: str, keyword: str) -> None:
    """transformers before 4.56 takes only ``torch_dtype=`` (4.53's models
    reject ``dtype=``); from 4.56 on ``dtype=``."""
    from types import SimpleNamespace

    from nnsight_pure.models.language import _dtype_keyword

    assert _dtype_keyword(SimpleNamespace(__version__=version)) == keyword
