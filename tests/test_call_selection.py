"""Call selection (``.all()``, ``.iter[...]``) and early stopping, against plain torch hooks.

Every case that used to hang runs its trace in a thread with a time limit,
so a regression fails instead of hanging the suite. The expected values come
from hooks on the same modules, counting their calls by hand; the nnsight 0.4
behaviour each test reproduces is said in its docstring.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import nnsight_pure as nnsight
from tests.helpers import TinyNet

LIMIT_S = 20.0


def bounded(fn: Callable[[], Any], limit: float = LIMIT_S) -> Any:
    """``fn()``, run in a thread; fails the test if it does not return in time."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome["value"] = fn()
            outcome["warnings"] = caught
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"the trace did not return within {limit} s (it hangs)")
    if "error" in outcome:
        raise outcome["error"]
    for caught in outcome["warnings"]:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    return outcome["value"]


# --- a model that calls some modules several times -----------------------------------


class Looped(torch.nn.Module):
    """Three steps of ``h = a(h); out_t = head(h)``: ``a`` (with ``a.cell``) and
    ``head`` are called three times each, ``final`` once at the end."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.steps = steps
        self.a = torch.nn.Sequential(OrderedDict([("cell", torch.nn.Linear(4, 4)), ("act", torch.nn.Tanh())]))
        self.head = torch.nn.Linear(4, 2)
        self.final = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        outs = []
        for _ in range(self.steps):
            h = self.a(h)
            outs.append(self.head(h))
        result: torch.Tensor = self.final(torch.stack(outs))
        return result


def recorded(module: torch.nn.Module, paths: tuple[str, ...], *args: Any, **kwargs: Any) -> dict[str, list[Any]]:
    """Run ``module`` with a plain forward hook on each path, keeping every call's output."""
    seen: dict[str, list[Any]] = {path: [] for path in paths}
    handles = []
    for path in paths:
        def hook(m: torch.nn.Module, i: Any, o: Any, path: str = path) -> None:
            seen[path].append(o.detach().clone() if isinstance(o, torch.Tensor) else o)

        handles.append(module.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def call_counter(module: torch.nn.Module, path: str) -> tuple[list[int], Any]:
    """A forward pre-hook counting the calls of ``path`` that start (remove the handle after)."""
    calls: list[int] = []
    handle = module.get_submodule(path).register_forward_pre_hook(lambda m, i: calls.append(1))
    return calls, handle


@pytest.fixture
def looped() -> Looped:
    return Looped()


@pytest.fixture
def xs() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(1, 4)


# --- loops that used to hang ---------------------------------------------------------


def test_an_empty_loop_over_calls_ends(looped: Looped, xs: torch.Tensor) -> None:
    """``with model.a.all(): pass`` does nothing and the trace ends (0.4: a no-op)."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("final",), xs)

    def trace() -> Any:
        with model.trace(xs):
            with model.a.all():
                pass
            out = model.output.save()
        return out.value

    assert torch.equal(bounded(trace), plain["final"][0])


def test_a_sticky_loop_with_reads_outside_its_scope_reads_once(looped: Looped, xs: torch.Tensor) -> None:
    """``model.a.all()`` then reads of ``model.head`` only: ``.all()`` applies to
    ``a`` and below it, so ``head`` is read at its first call, and the append
    runs once (0.4 gives one entry); a warning says the loop reads nothing of
    its scope. It used to loop forever."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("head",), xs)
    assert len(plain["head"]) == 3

    def trace() -> Any:
        with model.trace(xs):
            heads = nnsight.list().save()
            model.a.all()
            heads.append(model.head.output)
        return heads.value

    with pytest.warns(nnsight.MissedCallsWarning, match="reads no call of model.a"):
        heads = bounded(trace)
    assert len(heads) == 1
    assert torch.equal(heads[0], plain["head"][0])


def test_tracer_all_without_module_access_runs_once(looped: Looped, xs: torch.Tensor) -> None:
    """``with tracer.all():`` whose body touches no module runs its body once
    (0.4 runs a node that depends on no module access once), with a warning."""
    model = nnsight.NNsight(looped)

    def trace() -> Any:
        with model.trace(xs) as tracer:
            items = nnsight.list().save()
            with tracer.all():
                items.append(1)
            out = model.output.save()
        return items.value, out.value

    with pytest.warns(nnsight.MissedCallsWarning, match="runs once"):
        items, out = bounded(trace)
    assert list(items) == [1]
    assert torch.equal(out, recorded(looped, ("final",), xs)["final"][0])


def test_a_condition_that_is_false_at_every_call_ends_the_loop(looped: Looped, xs: torch.Tensor) -> None:
    """A loop whose in-scope accesses sit in a condition that is false: no
    iteration receives a call of the scope, so the open-ended loop ends
    (it used to wait forever before the model ran)."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("final",), xs)

    def trace() -> Any:
        with model.trace(xs) as tracer:
            flag = model.head.output.sum() > 1e9  # false; outside the scope: computed once
            with model.a.all():
                with tracer.cond(flag):
                    model.a.cell.output[:] = 0
            out = model.output.save()
        return out.value

    assert torch.equal(bounded(trace), plain["final"][0])


# --- values inside and outside the scope ----------------------------------------------


def test_a_loop_reads_its_scope_per_call_and_the_rest_once(looped: Looped, xs: torch.Tensor) -> None:
    """In one body, ``a.cell`` (in scope) is read at each of its three calls and
    ``head`` (outside) once, at its first call, as 0.4's per-module selection does."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("a.cell", "head"), xs)

    def trace() -> Any:
        with model.trace(xs):
            cells = nnsight.list().save()
            heads = nnsight.list().save()
            with model.a.all():
                cells.append(model.a.cell.output)
                heads.append(model.head.output)
                both = (model.a.cell.output.sum() + model.head.output.sum()).save()
        return cells.value, heads.value, both.value

    cells, heads, both = bounded(trace)
    assert len(cells) == 3 and all(torch.equal(a, b) for a, b in zip(cells, plain["a.cell"]))
    assert len(heads) == 1 and torch.equal(heads[0], plain["head"][0])
    # a value from both: the last call's cell with head's first call
    assert torch.allclose(both, plain["a.cell"][2].sum() + plain["head"][0].sum())


def test_model_all_reads_every_module_per_call(looped: Looped, xs: torch.Tensor) -> None:
    """``model.all()`` (the root's scope) makes ``head`` per call too."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("head",), xs)

    def trace() -> Any:
        with model.trace(xs):
            heads = nnsight.list().save()
            model.all()
            heads.append(model.head.output)
        return heads.value

    heads = bounded(trace)
    assert len(heads) == 3 and all(torch.equal(a, b) for a, b in zip(heads, plain["head"]))


def test_a_condition_inside_a_loop_reads_each_call(looped: Looped, xs: torch.Tensor) -> None:
    """Accesses in a condition inside a loop over calls read the loop's call."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("a.cell",), xs)

    def trace() -> Any:
        with model.trace(xs) as tracer:
            cells = nnsight.list().save()
            with model.a.all():
                with tracer.cond(model.a.cell.output.sum() > -1e9):
                    cells.append(model.a.cell.output.clone())
        return cells.value

    cells = bounded(trace)
    assert len(cells) == 3 and all(torch.equal(a, b) for a, b in zip(cells, plain["a.cell"]))


def test_a_write_per_call_next_to_a_read_outside(looped: Looped, xs: torch.Tensor) -> None:
    """A write to ``a.cell`` at every call goes on after a read of ``head``
    (outside the scope) that is written after it in the body."""
    model = nnsight.NNsight(looped)

    def zero(m: Any, i: Any, o: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(o)

    handle = looped.get_submodule("a.cell").register_forward_hook(zero)
    try:
        plain = recorded(looped, ("final", "head"), xs)
    finally:
        handle.remove()

    def trace() -> Any:
        with model.trace(xs):
            with model.a.all():
                model.a.cell.output[:] = 0
                first = model.head.output.save()
            out = model.output.save()
        return first.value, out.value

    first, out = bounded(trace)
    assert torch.equal(out, plain["final"][0])
    assert torch.equal(first, plain["head"][0])


def test_a_read_of_a_later_module_in_a_sticky_loop_does_not_hold_up_the_calls(looped: Looped, xs: torch.Tensor) -> None:
    """``a.all()`` (sticky), a per-call read of ``a.cell``, then ``final`` (called
    once, after every step) in the same body, in two invokes: every call is
    read in each invoke, and ``final`` too (it used to miss calls 1 and 2,
    with a MissedCallsWarning)."""
    model = nnsight.NNsight(looped)
    other = torch.rand(1, 4)
    plain = recorded(looped, ("a.cell", "final"), xs)
    plain_other = recorded(looped, ("a.cell",), other)

    def trace() -> Any:
        with model.trace() as tracer:
            with tracer.invoke(xs):
                cells = nnsight.list().save()
                model.a.all()
                cells.append(model.a.cell.output)
                out = model.final.output.save()
            with tracer.invoke(other):
                others = nnsight.list().save()
                with model.a.cell.all():
                    others.append(model.a.cell.output)
        return cells.value, out.value, others.value

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cells, out, others = bounded(trace)
    assert len(cells) == 3 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cells, plain["a.cell"]))
    assert len(others) == 3 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(others, plain_other["a.cell"]))
    assert torch.allclose(out[:, 0:1], plain["final"][0][:, 0:1], atol=1e-6)


# --- generation on a tiny GPT-2 -------------------------------------------------------

CORPUS = ["The Eiffel Tower is in the city of Paris", "The Colosseum is in the city of Rome"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated in transformers
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=bpe.get_vocab_size(), n_positions=64,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-gpt2-calls")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def lm(folder: Path) -> nnsight.LanguageModel:
    return nnsight.LanguageModel(str(folder))


def _plain_logits(folder: Path, lm: nnsight.LanguageModel, prompt: str, steps: int) -> list[torch.Tensor]:
    """lm_head's output at each generation step, by a forward hook on a plain greedy generate."""
    hf: Any = GPT2LMHeadModel.from_pretrained(folder)
    hf.eval()
    encoding = lm.tokenizer([prompt], return_tensors="pt")
    seen: list[torch.Tensor] = []
    handle = hf.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        hf.generate(**encoding, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return seen


def test_layers_all_does_not_make_lm_head_per_step(folder: Path, lm: nnsight.LanguageModel) -> None:
    """nnsight 0.4 guide: ``model.transformer.h.all()`` then appending
    ``model.lm_head.output`` gives ONE entry (step 0's logits): ``.all()``
    only applies to the layers; ``model.all()`` gives one per step. It used
    to give step 0's logits three times."""
    plain = _plain_logits(folder, lm, "The Eiffel Tower is", 3)
    assert len(plain) == 3

    def layers_only() -> Any:
        with lm.generate("The Eiffel Tower is", max_new_tokens=3):
            logits = nnsight.list().save()
            lm.transformer.h.all()
            logits.append(lm.lm_head.output)
        return logits.value

    def every_module() -> Any:
        with lm.generate("The Eiffel Tower is", max_new_tokens=3):
            logits = nnsight.list().save()
            lm.all()
            logits.append(lm.lm_head.output)
        return logits.value

    with pytest.warns(nnsight.MissedCallsWarning, match="reads no call of model.transformer.h"):
        once = bounded(layers_only)
    assert len(once) == 1 and torch.allclose(once[0], plain[0], atol=1e-5)
    per_step = bounded(every_module)
    assert len(per_step) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(per_step, plain))


def test_a_sticky_loop_per_step_with_the_generator_read_after(folder: Path, lm: nnsight.LanguageModel) -> None:
    """``lm_head.all()`` (sticky), a per-step append of its output, then
    ``model.generator.output`` in the same sticky body: the generator's read
    (once, at the end) does not hold up the steps, so the list has one entry
    per step, as in 0.4 (it used to get one, with a MissedCallsWarning)."""
    plain = _plain_logits(folder, lm, "The Eiffel Tower is", 3)

    def trace() -> Any:
        with lm.generate("The Eiffel Tower is", max_new_tokens=3):
            logits = nnsight.list().save()
            lm.lm_head.all()
            logits.append(lm.lm_head.output)
            ids = lm.generator.output.save()
        return logits.value, ids.value

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, ids = bounded(trace)
    assert len(logits) == 3 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, plain))
    greedy = [int(step[0, -1].argmax()) for step in plain]
    assert ids.shape[-1] >= 3 and ids[0, -3:].tolist() == greedy


# --- stopping -------------------------------------------------------------------------


def test_a_stop_takes_effect_at_the_module_it_names(net: TinyNet, x: torch.Tensor) -> None:
    """``l2 = layer2.output.save(); layer1.output.stop()``: the run stops at
    layer1 (0.4's early-stopping tutorial), so layer2 never runs and ``l2``
    has no value. (It used to run layer2 and fill ``l2``.)"""
    calls, handle = call_counter(net, "layer2")
    try:
        model = nnsight.NNsight(net)
        with model.trace(x):
            l1 = model.layer1.output.save()
            l2 = model.layer2.output.save()  # the program waits here when layer1 runs ...
            model.layer1.output.stop()  # ... but the stop names layer1
    finally:
        handle.remove()
    assert calls == []
    assert torch.equal(l1.value, net.layer1(x))
    with pytest.raises(ValueError, match="stopped early"):
        _ = l2.value


def test_a_stop_lets_every_invoke_finish_its_part_of_that_call(net: TinyNet) -> None:
    """A stop in invoke 0 at layer1 fires after invoke 1 has done what it can at
    layer1 (its save there is kept), and layer2 never runs."""
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    calls, handle = call_counter(net, "layer2")
    try:
        model = nnsight.NNsight(net)
        with model.trace() as tracer:
            with tracer.invoke(a):
                model.layer1.output.stop()
            with tracer.invoke(b):
                other = model.layer1.output.save()
    finally:
        handle.remove()
    assert calls == []
    assert torch.allclose(other.value, net.layer1(b), atol=1e-6)


def test_a_stop_from_a_value_of_two_calls_fires_at_the_later(net: TinyNet, x: torch.Tensor) -> None:
    """A stop on a value computed from layer1 and layer2 takes effect once both
    have run: layer2 runs, nothing after it (the net's output is never read)."""
    calls, handle = call_counter(net, "layer2")
    try:
        model = nnsight.NNsight(net)
        with model.trace(x):
            out = model.output.save()
            (model.layer1.output.sum() + model.layer2.output.sum()).stop()
    finally:
        handle.remove()
    assert calls == [1]
    with pytest.raises(ValueError, match="stopped early"):
        _ = out.value


def test_a_stop_on_gpt2_stops_at_that_block(
    gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    """The early-stopping tutorial on GPT-2: ``h[1]`` is saved first, the stop
    names ``h[0]``: block 1 never runs."""
    plain = recorded(gpt2_module, ("transformer.h.0",), ids)
    calls, handle = call_counter(gpt2_module, "transformer.h.1")
    try:
        with gpt2.trace(ids):
            l1 = gpt2.transformer.h[0].output.save()
            l2 = gpt2.transformer.h[1].output.save()
            gpt2.transformer.h[0].output.stop()
    finally:
        handle.remove()
    assert calls == []
    first = l1.value[0] if isinstance(l1.value, tuple) else l1.value
    expected = plain["transformer.h.0"][0]
    assert torch.allclose(first, expected[0] if isinstance(expected, tuple) else expected, atol=1e-6)
    with pytest.raises(ValueError, match="stopped early"):
        _ = l2.value


def test_a_stop_inside_a_loop_over_calls_ends_the_loop(looped: Looped, xs: torch.Tensor) -> None:
    """Inside a loop over calls a stop ends the loop (the model runs on)."""
    model = nnsight.NNsight(looped)
    plain = recorded(looped, ("a.cell", "final"), xs)

    def trace() -> Any:
        with model.trace(xs):
            cells = nnsight.list().save()
            with model.a.all():
                cells.append(model.a.cell.output)
                model.a.cell.output.stop()
            out = model.output.save()
        return cells.value, out.value

    cells, out = bounded(trace)
    assert len(cells) == 1 and torch.equal(cells[0], plain["a.cell"][0])
    assert torch.equal(out, plain["final"][0])

