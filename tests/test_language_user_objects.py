"""LanguageModel leaves the model and the tokenizer a user passes in as they were.

nnsight 0.4 attached a ``generator`` module to the user's model and set
``pad_token`` on the user's tokenizer; here the wrapper keeps both changes
to objects of its own, and ``model.generator.output`` and padding still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import nnsight_pure as nnsight
from tests import lm_models
from tests.lm_models import CORPUS


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm_models.save("gpt2", tmp_path_factory.mktemp("tiny-gpt2-user"))


def _without_pad_token(folder: Path) -> Any:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    return tokenizer


def test_wrapping_changes_neither_the_users_model_nor_tokenizer(folder: Path) -> None:
    hf = lm_models.plain(folder)
    tokenizer = _without_pad_token(folder)
    modules_before = [(name, module) for name, module in hf.named_modules()]
    lm = nnsight.LanguageModel(hf, tokenizer=tokenizer)

    with lm.trace([CORPUS[0], CORPUS[1][:12]]):  # two prompts of different lengths: padded
        logits = lm.lm_head.output.save()
    with lm.generate(CORPUS[1], max_new_tokens=2):
        ids = lm.generator.output.save()

    assert logits.shape[0] == 2
    assert ids.shape[-1] == lm_models.encode(lm.tokenizer, CORPUS[1])["input_ids"].shape[-1] + 2
    assert [(name, module) for name, module in hf.named_modules()] == modules_before
    assert "generator" not in hf._modules
    assert tokenizer.pad_token is None
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token


def test_the_wrapper_shares_the_users_weights(folder: Path) -> None:
    hf = lm_models.plain(folder)
    lm = nnsight.LanguageModel(hf, tokenizer=transformers.AutoTokenizer.from_pretrained(str(folder)))
    prompt = lm_models.encode(lm.tokenizer, CORPUS[2])
    with torch.no_grad():
        hf.lm_head.weight.mul_(2.0)  # a change the user makes later is seen by the wrapper
        expected = hf(**prompt).logits
    with lm.trace(CORPUS[2]):
        logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits, expected)
    assert lm.lm_head._module is hf.lm_head
