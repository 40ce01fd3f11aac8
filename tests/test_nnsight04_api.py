"""What nnsight 0.4 scripts write that nnsight_pure once refused or ran differently.

Signatures (``backend=``, ``remote=``, ``validate=``, ``invoke(scan=True)``),
``CONFIG``, ``tracer.invoker``/``invoker.inputs``, the ``nnsight.util``
helpers, calls recorded without a proxy argument (torch factories,
``Parameter``, optimizers, ``zero_grad``), saved values where a tensor is
expected, and unsaved values after the block. Each is checked against plain
torch.
"""

from __future__ import annotations

import copy
import io
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy
import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch.utils.data import DataLoader

import nnsight_pure as nnsight
from nnsight_pure.contexts import recorded_calls
from tests.helpers import TinyNet


@pytest.fixture(autouse=True)
def _config_restored() -> Iterator[None]:
    app = copy.copy(nnsight.CONFIG.APP)
    yield
    nnsight.CONFIG.APP = app


class KeywordsRefused(torch.nn.Module):
    """Fails if any keyword argument reaches its forward (``remote=``, ``scan=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # type: ignore[no-any-return]


# --- signatures ----------------------------------------------------------------------


def test_local_execution_options_are_accepted_and_never_reach_the_model() -> None:
    module = KeywordsRefused()
    model = nnsight.NNsight(module)
    x = torch.rand(2, 3)
    with model.trace(x, backend=None, remote=False, blocking=True, debug=True, validate=False):
        out = model.output.save()
    with model.session(backend=None, remote=False, validate=True, debug=False):
        with model.trace(x):
            in_session = model.output.save()
    assert torch.equal(out.value, module(x))
    assert torch.equal(in_session.value, module(x))


def test_remote_and_backends_are_a_clear_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    for options in ({"remote": True}, {"backend": object()}):
        with pytest.raises(NotImplementedError, match="runs locally"):
            model.trace(x, **options)
        with pytest.raises(NotImplementedError, match="runs locally"):
            model.session(**options)


def test_invoke_scan_knows_shapes_inside_the_block() -> None:
    module = KeywordsRefused()
    model = nnsight.NNsight(module)
    x = torch.rand(4, 3)
    with model.trace() as tracer:
        with tracer.invoke(x, scan=True):
            rows = model.layer.output.shape[0]  # a real int: the invoke was scanned
            assert rows == 4
            out = model.layer.output.save()
    assert torch.equal(out.value, module(x))


def test_session_validate_makes_its_traces_validate(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(RuntimeError):
        with model.session(validate=True):
            with model.trace() as tracer:
                with tracer.invoke(x, scan=True):
                    model.layer1.output @ torch.ones(3, 3)  # a shape error, raised at this line


# --- CONFIG and module names 0.4 scripts use ----------------------------------------


def test_config_has_nnsight_04s_keys() -> None:
    config = nnsight.CONFIG
    assert config.APP.DEBUG and config.APP.FRAME_INJECTION and config.APP.GLOBAL_TRACING
    assert config.APP.CONTROL_FLOW_HANDLING and config.APP.REMOTE_LOGGING and not config.APP.LOGGING
    assert config.API.HOST and config.API.APIKEY is None
    config.APP.DEBUG = False  # a 0.4 script's first line; harmless here
    config.set_default_api_key("key")
    assert config.API.APIKEY == "key"
    config.API.APIKEY = None  # type: ignore[unreachable]  # (mypy keeps the narrowing to str)
    config.save()


def test_global_tracing_off_runs_factories_at_once(model: nnsight.NNsight, x: torch.Tensor) -> None:
    nnsight.CONFIG.APP.GLOBAL_TRACING = False
    with model.trace(x):
        zeros = torch.zeros(3)
    assert type(zeros) is torch.Tensor


def test_tracer_invoker_and_its_prepared_inputs(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace() as tracer:
        assert tracer.invoker is None
        with tracer.invoke(x) as invoker:
            assert tracer.invoker is invoker
            args, kwargs = invoker.inputs  # type: ignore[attr-defined]  # nnsight 0.4's shape: ((args...), kwargs)
            assert args[0] is x and kwargs == {}
            model.output.save()
        assert tracer.invoker is None


def test_util_apply_and_fetch_attr(net: TinyNet) -> None:
    data = {"a": [torch.ones(2), 3], "b": (torch.zeros(1), "s")}
    doubled = nnsight.util.apply(data, lambda t: t * 2, torch.Tensor)
    assert torch.equal(doubled["a"][0], torch.full((2,), 2.0)) and doubled["a"][1] == 3
    assert doubled["b"][1] == "s" and torch.equal(data["a"][0], torch.ones(2))  # type: ignore[arg-type]
    assert nnsight.util.fetch_attr(net, "layer1.weight") is net.layer1.weight
    assert nnsight.util.fetch_attr(net, ".layer2") is net.layer2
    assert nnsight.util.WrapperModule is nnsight.WrapperModule


def test_local_is_an_ordinary_part_of_the_block(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        with nnsight.local():
            doubled = (model.output * 2).save()
        plus_one = nnsight.local(lambda t: t + 1)(model.output).save()
    assert torch.allclose(doubled.value, net(x) * 2)
    assert torch.allclose(plus_one.value, net(x) + 1)


# --- calls recorded without a proxy argument ------------------------------------------


def test_factories_without_traced_arguments_are_recorded(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        zeros = torch.zeros(1, 10).save()  # type: ignore[attr-defined]  # (a proxy inside the block)
        model.layer1.output = torch.ones(1, 10) * 2
        out = model.output.save()
        parameter = torch.nn.Parameter(torch.zeros(3)).save()  # type: ignore[attr-defined]
    assert "zeros(1, 10)" in str(tracer.graph) and "ones(1, 10)" in str(tracer.graph)
    assert torch.equal(zeros.value, torch.zeros(1, 10))
    assert torch.allclose(out.value, net.layer2(torch.full((1, 10), 2.0)))
    assert isinstance(parameter.value, torch.nn.Parameter) and parameter.value.requires_grad


def test_a_factory_in_a_loop_runs_once_per_iteration(model: nnsight.NNsight) -> None:
    with model.session() as session:
        draws = nnsight.list().save()
        with session.iter([0, 1, 2]):
            draws.append(torch.rand(4))
    assert len(draws.value) == 3
    assert not torch.equal(draws.value[0], draws.value[1])


def test_an_input_made_with_a_factory_is_computed_at_once(model: nnsight.NNsight, net: TinyNet) -> None:
    torch.manual_seed(5)
    expected_input = torch.rand(1, 5)
    torch.manual_seed(5)
    with model.trace() as tracer:
        with tracer.invoke(torch.rand(1, 5)):  # recorded, then taken back and run now
            out = model.output.save()
    assert "rand" not in str(tracer.graph)
    assert torch.allclose(out.value, net(expected_input))


def test_an_input_that_cannot_be_known_is_a_clear_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="no value while tracing"):
        with model.trace() as tracer:
            noise = torch.rand(1, 5)
            with tracer.invoke(x):
                model.output.save()
            with tracer.invoke(noise * 2):
                pass


class LowRank(nnsight.util.WrapperModule):
    """An adapter of ``layer2`` built from traced parameters (nnsight's LoRA tutorial shape)."""

    def __init__(self, module: Any, rank: int) -> None:
        super().__init__()
        self.module = module
        self.down = torch.nn.Parameter(torch.ones(10, rank) * 0.1)
        self.up = torch.nn.Parameter(torch.zeros(rank, 2))

    def __call__(self) -> None:
        self.module.output = self.module.output + self.module.input @ self.down @ self.up

    def parameters(self) -> list[Any]:  # type: ignore[override]
        return [self.down, self.up]


def _train_by_hand(
    net: TinyNet, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float
) -> tuple[list[float], torch.Tensor]:
    down = torch.nn.Parameter(torch.ones(10, 2) * 0.1)
    up = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([down, up], lr=lr)
    losses = []
    for inputs, labels in batches:
        hidden = net.layer1(inputs)
        logits = net.layer2(hidden) + hidden @ down @ up
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, up.detach()


def test_training_an_adapter_made_inside_the_session(model: nnsight.NNsight, net: TinyNet) -> None:
    torch.manual_seed(11)
    data = [(torch.rand(5), torch.tensor(index % 2)) for index in range(8)]
    with model.session() as session:
        adapter = LowRank(model.layer2, 2)
        optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
        losses = nnsight.list().save()
        with session.iter(DataLoader(data, batch_size=2)) as batch:  # type: ignore[arg-type]
            with model.trace(batch[0]):
                adapter()
                loss = torch.nn.functional.cross_entropy(model.output, batch[1])
                loss.backward()  # type: ignore[no-untyped-call]
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
        up = adapter.up.save()  # type: ignore[attr-defined]
    batches = list(DataLoader(data, batch_size=2))  # type: ignore[arg-type]
    expected_losses, expected_up = _train_by_hand(net, batches, lr=0.5)
    assert losses.value == pytest.approx(expected_losses)
    assert torch.allclose(up.value, expected_up)
    assert expected_losses[0] != pytest.approx(expected_losses[-1])  # it trained


def test_zero_grad_of_a_real_optimizer_runs_in_the_loop(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    weight = net.layer2.weight
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with model.session() as session:
        grads = nnsight.list().save()
        with session.iter([0, 1]):
            with model.trace(x):
                model.output.sum().backward()
            grads.append(session.apply(lambda: weight.grad.clone()))  # type: ignore[union-attr]
            optimizer.zero_grad()  # recorded: without it the second grad would be twice the first
    assert torch.allclose(grads.value[0], grads.value[1])
    assert weight.grad is None


def test_module_zero_grad_is_recorded(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session():
        with model.trace(x):
            model.output.sum().backward()
        net.zero_grad()  # runs after the trace's backward, not while tracing
    assert net.layer1.weight.grad is None
    net.layer1.weight.grad = torch.ones_like(net.layer1.weight)
    with model.session():
        with model.trace(x):
            model.output.sum().backward()
        kept = nnsight.apply(lambda: net.layer1.weight.grad.clone()).save()
        net.zero_grad()
    assert not torch.equal(kept.value, torch.ones_like(net.layer1.weight))  # accumulated at run time


def test_step_of_a_real_optimizer_says_what_to_write(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net.layer2.weight.detach().clone()
    with pytest.raises(nnsight.TraceError, match=r"session\.apply\(optimizer\.step\)") as caught:
        with model.session():
            with model.trace(x):
                model.output.sum().backward()
            optimizer.step()
    assert "test_nnsight04_api.py" in str(caught.value)
    assert torch.equal(net.layer2.weight, before)
    with model.session() as session:
        with model.trace(x):
            model.output.sum().backward()
        session.apply(optimizer.step)
    assert not torch.equal(net.layer2.weight, before)


def test_sessions_leave_torch_as_it_was(model: nnsight.NNsight, x: torch.Tensor) -> None:
    init, zero_grad = torch.optim.Optimizer.__init__, torch.nn.Module.zero_grad
    hooks = dict(optimizer_module._global_optimizer_pre_hooks)
    with pytest.raises(KeyError):
        with model.session():
            assert torch.optim.Optimizer.__init__ is not init
            raise KeyError("the user's error")
    with model.session():
        with model.trace(x):
            model.output.save()
    assert torch.optim.Optimizer.__init__ is init and torch.nn.Module.zero_grad is zero_grad
    assert dict(optimizer_module._global_optimizer_pre_hooks) == hooks
    assert torch._C._len_torch_function_stack() == 0


def test_another_thread_is_not_recorded_while_a_session_is_open(model: nnsight.NNsight, x: torch.Tensor) -> None:
    opened, done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        opened.wait(10)
        try:
            weight = torch.nn.Parameter(torch.ones(2))
            optimizer = torch.optim.SGD([weight], lr=0.5)
            weight.sum().backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad()
            seen["weight"] = weight.detach().clone()
            seen["zeros"] = torch.zeros(2)
        except BaseException as error:  # pragma: no cover - reported below
            seen["error"] = error
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with model.session():
        opened.set()
        assert done.wait(10)
        with model.trace(x):
            model.output.save()
    thread.join()
    assert "error" not in seen
    assert torch.equal(seen["weight"], torch.full((2,), 0.5))
    assert type(seen["zeros"]) is torch.Tensor


def test_recording_is_suspended_for_the_library_s_own_work(model: nnsight.NNsight, x: torch.Tensor) -> None:
    assert not recorded_calls.recording()
    with model.trace(x):
        assert recorded_calls.recording()
        with recorded_calls.suspended():
            assert type(torch.zeros(1)) is torch.Tensor
    assert not recorded_calls.recording()


# --- saved values after the block ---------------------------------------------------


def test_a_saved_value_is_taken_where_a_tensor_is_expected(
    model: nnsight.NNsight, net: TinyNet, x: torch.Tensor
) -> None:
    with torch.no_grad(), model.trace(x):  # (torch deep-copies only leaf tensors)
        hidden = model.layer1.output.save()
    expected = net.layer1(x).detach()
    assert isinstance(hidden, torch.Tensor)
    assert torch.allclose(torch.as_tensor(numpy.asarray(hidden.detach())), expected)
    assert numpy.allclose(numpy.asarray(hidden), expected.numpy())
    buffer = io.BytesIO()
    torch.save(hidden, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert type(loaded) is torch.Tensor and torch.equal(loaded, expected)
    assert type(copy.deepcopy(hidden)) is torch.Tensor
    assert hidden.tolist() == expected.tolist()


def test_a_tokenizer_decodes_saved_ids() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=  # type: ignore[no-untyped-call]
        Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    model = nnsight.NNsight(torch.nn.Sequential(OrderedDict([("ids", nnsight.util.WrapperModule())])))
    ids = torch.tensor([[1, 2, 3]])
    with model.trace(ids):
        saved = model.ids.output.save()
    assert tokenizer.batch_decode(saved) == tokenizer.batch_decode(ids)


def test_frame_injection_off_keeps_plain_proxies(model: nnsight.NNsight, x: torch.Tensor) -> None:
    nnsight.CONFIG.APP.FRAME_INJECTION = False
    with model.trace(x):
        hidden = model.layer1.output.save()
    assert not isinstance(hidden, torch.Tensor)
    assert isinstance(hidden.value, torch.Tensor)


def test_a_saved_value_of_a_finished_trace_is_a_value_in_the_next(
    model: nnsight.NNsight, net: TinyNet, x: torch.Tensor
) -> None:
    with model.trace(x):
        hidden = model.layer1.output.save()
    with model.trace(hidden[:, :5]):  # an input made from it
        out = model.output.save()
        width = hidden.shape[-1]  # a real number, not a traced one
    assert width == 10
    assert torch.allclose(out.value, net(net.layer1(x)[:, :5]))


# --- unsaved values after the block --------------------------------------------------


def test_printing_an_unsaved_value_says_to_save_it(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        unsaved = model.layer1.output
    with pytest.raises(ValueError, match=r"not saved.*\.save\(\)"):
        print(unsaved)
    with pytest.raises(ValueError, match="not saved"):
        f"{unsaved}"
    assert "not saved" in repr(unsaved)  # (a container's printout still works)
    assert "not saved" in repr([unsaved])


def test_every_traced_builtin_of_nnsight_04(model: nnsight.NNsight) -> None:
    with model.session():
        made = [
            nnsight.bool(1), nnsight.bytes(2), nnsight.int("3"), nnsight.float("4.5"), nnsight.str(6),
            nnsight.complex(1, 2), nnsight.bytearray(b"ab"), nnsight.tuple([1]), nnsight.list((2,)),
            nnsight.set([3]), nnsight.dict(a=4),
        ]
        saved = [value.save() for value in made]
    expected = [True, b"\0\0", 3, 4.5, "6", 1 + 2j, bytearray(b"ab"), (1,), [2], {3}, {"a": 4}]
    assert [value.value for value in saved] == expected
