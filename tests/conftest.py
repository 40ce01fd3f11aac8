from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from tests.helpers import tiny_gpt2, tiny_net

torch.set_num_threads(1)


@pytest.fixture
def net() -> torch.nn.Sequential:
    return tiny_net()


@pytest.fixture
def model(net: torch.nn.Sequential) -> nnsight.NNsight:
    return nnsight.NNsight(net)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(1, 5)


@pytest.fixture
def gpt2_module() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def gpt2(gpt2_module: GPT2LMHeadModel) -> nnsight.NNsight:
    return nnsight.NNsight(gpt2_module)


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(3, 100, (1, 8))
