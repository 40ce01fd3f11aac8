from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from tests import lm_models
from tests.helpers import TinyNet, tiny_gpt2, tiny_net

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _print_restored() -> Iterator[None]:
    """Ray replaces ``builtins.print`` for good once its progress bars start
    (tqdm_ray); put it back so that later tests see the real one."""
    saved = builtins.print
    yield
    builtins.print = saved


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the device tests run: ``NNSIGHT_PURE_DEVICE`` (default ``cpu``), so that
    ``NNSIGHT_PURE_DEVICE=cuda ./scripts/test.sh`` checks a GPU machine."""
    return torch.device(os.environ.get("NNSIGHT_PURE_DEVICE", "cpu"))


@pytest.fixture
def net() -> TinyNet:
    return tiny_net()


@pytest.fixture
def model(net: TinyNet) -> nnsight.NNsight:
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


@pytest.fixture(scope="module")
def folder(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved model of the module's ``family`` fixture (tests/lm_models.py)."""
    return lm_models.save(family, tmp_path_factory.mktemp(f"tiny-{family}"))


@pytest.fixture(scope="module")
def hf(folder: Path) -> Any:
    """The same saved model loaded by plain transformers."""
    return lm_models.plain(folder)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the golden files under tests/golden/ instead of comparing against them",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
