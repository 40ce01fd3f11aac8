"""``envoy.source``: operations inside a forward, compared with the same
computation done by hand in plain torch on a tiny GPT-2 attention."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nnsight_pure as nnsight
from nnsight_pure import forwards, operations
from nnsight_pure.caches import LISTINGS

N_EMBD, N_HEAD = 16, 2


def gpt2(attn: str = "eager", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=100, n_positions=32,
                        bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config)
    torch.nn.Module.eval(model)
    return model


IDS = torch.tensor([[5, 7, 9, 11, 3], [4, 8, 15, 16, 23]])


def by_hand(attn: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPT-2's attention on ``x`` (its ln_1 output), step by step in plain torch."""
    b, t, _ = x.shape
    d = N_EMBD // N_HEAD
    c_attn = x @ attn.c_attn.weight + attn.c_attn.bias
    q, k, v = c_attn.split(N_EMBD, dim=2)

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.view(b, t, N_HEAD, d).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    softmax = scores.softmax(-1)
    merged = (softmax @ v).transpose(1, 2).reshape(b, t, N_EMBD)
    c_proj = merged @ attn.c_proj.weight + attn.c_proj.bias
    return {"c_attn": c_attn, "q": q, "k": k, "v": v, "softmax": softmax, "merged": merged, "c_proj": c_proj}


def test_values_match_by_hand_eager() -> None:
    net = gpt2()
    model = nnsight.NNsight(net)
    src = model.transformer.h[0].attn.source
    with model.trace(IDS):
        x = model.transformer.h[0].ln_1.output.save()
        c_attn = src.c_attn_0.output.save()
        split = src.split_0.output.save()
        softmax = src.softmax_0.output.save()
        c_proj_in = src.c_proj_0.input.save()
        c_proj = src.c_proj_0.output.save()
        out = model.output.logits.save()
    hand = by_hand(net.transformer.h[0].attn, x)
    torch.testing.assert_close(c_attn, hand["c_attn"])
    torch.testing.assert_close(split[0], hand["c_attn"][..., :N_EMBD])
    torch.testing.assert_close(softmax, hand["softmax"])
    torch.testing.assert_close(c_proj_in, hand["merged"])
    torch.testing.assert_close(c_proj, hand["c_proj"])
    torch.testing.assert_close(out, net(IDS).logits)  # reading changes nothing


def test_sdpa_is_one_operation() -> None:
    net = gpt2("sdpa")
    model = nnsight.NNsight(net)
    src = model.transformer.h[0].attn.source
    names = src.listing(IDS).names()
    assert "scaled_dot_product_attention_0" in names and "softmax_0" not in names
    with model.trace(IDS):
        x = model.transformer.h[0].ln_1.output.save()
        attended = src.scaled_dot_product_attention_0.output.save()
    hand = by_hand(net.transformer.h[0].attn, x)
    torch.testing.assert_close(attended, hand["softmax"] @ hand["v"])


def test_child_calls_are_one_operation_each() -> None:
    net = gpt2()
    model = nnsight.NNsight(net)
    listing = model.transformer.h[0].attn.source.listing(IDS)
    first = [seen.name for seen in listing.calls[0]]
    assert first[0] == "c_attn_0" and "c_proj_0" in first
    assert "addmm_0" not in first  # Conv1D's own torch calls are the child's
    functions = {seen.name: seen.function for seen in listing.calls[0]}
    assert functions["c_attn_0"] == "Conv1D" and functions["split_0"] == "Tensor.split"
    assert functions["softmax_0"] == "torch.nn.functional.softmax"
    where = listing.calls[0][first.index("split_0")].where
    assert where is not None and where.filename.endswith("modeling_gpt2.py")
    text = str(listing)
    assert "split_0" in text and "modeling_gpt2.py:" in text and ".split(" in text


def test_set_and_skip_match_by_hand() -> None:
    net = gpt2()
    model = nnsight.NNsight(net)
    attn: Any = net.transformer.h[0].attn
    src = model.transformer.h[0].attn.source
    uniform = torch.ones(2, N_HEAD, 5, 5) / 5
    with model.trace(IDS):
        x = model.transformer.h[0].ln_1.output.save()
        v = src.transpose_1.output.save()  # the values, as heads
        src.softmax_0.output = uniform
        attn_out = model.transformer.h[0].attn.output[0].save()
    hand = by_hand(attn, x)
    torch.testing.assert_close(v, hand["v"])
    merged = (uniform @ hand["v"]).transpose(1, 2).reshape(2, 5, N_EMBD)
    torch.testing.assert_close(attn_out, merged @ attn.c_proj.weight + attn.c_proj.bias)

    with model.trace(IDS):
        inp = model.transformer.h[0].input.save()
        src.c_proj_0.skip(torch.zeros(2, 5, N_EMBD))
        block = model.transformer.h[0].output.save()
    block0: Any = net.transformer.h[0]
    block = block[0] if isinstance(block, tuple) else block
    torch.testing.assert_close(block, inp + block0.mlp(block0.ln_2(inp)))


def test_invokes_narrow_rows() -> None:
    net = gpt2()
    model = nnsight.NNsight(net)
    src = model.transformer.h[0].attn.source
    with model.trace(IDS):
        whole = src.softmax_0.output.save()
    with model.trace() as tracer:
        with tracer.invoke(IDS[:1]):
            first = src.softmax_0.output.save()
        with tracer.invoke(IDS[1:]):
            src.softmax_0.output = torch.zeros(1, N_HEAD, 5, 5)
            second = src.softmax_0.output.save()
            proj = src.c_proj_0.input.save()
    torch.testing.assert_close(first, whole[:1])
    assert torch.equal(second, torch.zeros(1, N_HEAD, 5, 5))
    assert torch.equal(proj, torch.zeros(1, 5, N_EMBD))


class Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(self.inner(x))
        return out


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * 2


def test_next_json_and_replay() -> None:
    torch.manual_seed(0)
    net = Twice()
    model = nnsight.NNsight(net)
    x = torch.randn(2, 3)
    with model.trace(x):
        first = model.inner.source.relu_0.output.save()
        model.inner.next().source.mul_0.output = torch.zeros(2, 3)
        out = model.output.save()
    lin = net.inner.linear
    torch.testing.assert_close(first, torch.relu(lin(x)))
    assert torch.equal(out, torch.zeros(2, 3))

    def program(model: Any) -> Any:
        model.inner.source.mul_0.output = torch.zeros(2, 3)  # the first call's
        return {"second": model.inner.next().source.linear_0.output, "out": model.output}

    graph = nnsight.from_json(nnsight.to_json(nnsight.trace(model, program)))
    results = nnsight.run(model, graph, x)
    torch.testing.assert_close(results["second"], lin.bias.expand(2, 3))  # the second call sees zeros
    torch.testing.assert_close(results["out"], torch.relu(lin.bias.expand(2, 3)) * 2)


def test_edit_and_check() -> None:
    torch.manual_seed(0)
    net = Twice()
    model = nnsight.NNsight(net)
    x = torch.randn(2, 3)
    with model.edit() as edited:
        edited.inner.source.relu_0.output = torch.ones(2, 3)
    with edited.trace(x):
        out = edited.output.save()
    assert torch.equal(out, torch.relu(net.inner.linear(torch.ones(2, 3) * 2)) * 2)
    with model.trace(x, validate=True):  # an operation site is no "never called" finding
        seen = model.inner.source.linear_0.output.save()
    torch.testing.assert_close(seen, net.inner.linear(x))


def test_unknown_name_raises_with_close_names() -> None:
    model = nnsight.NNsight(gpt2())
    with pytest.raises(AttributeError, match="did you mean softmax_0"):
        with model.trace(IDS):
            model.transformer.h[0].attn.source.sofmax_0.output.save()


def test_listing_needs_inputs_for_a_plain_model() -> None:
    model = nnsight.NNsight(Twice())
    text = repr(model.inner.source)
    assert "needs inputs" in text and "listing(" in text
    with pytest.raises(nnsight.TraceError if hasattr(nnsight, "TraceError") else Exception, match="needs inputs"):
        model.inner.source.listing()
    with model.trace(torch.randn(2, 3)):
        assert "relu_0" in str(model.inner.source)


def test_listing_is_cached() -> None:
    model = nnsight.NNsight(Twice())
    x = torch.randn(2, 3)
    listing = model.inner.source.listing(x)
    assert model.inner.source.listing(x) is listing
    assert len(listing.calls) == 2 and listing.names() == {"linear_0", "relu_0", "mul_0"}
    assert len(LISTINGS) >= 1


def test_zero_cost_when_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """No forward is wrapped and no mode is pushed when the plan has no operation sites."""
    pushed: list[Any] = []
    wrapped: list[Any] = []
    real_enter = operations.OperationMode.__enter__
    real_wrapper = forwards._wrapper

    def enter(self: Any) -> Any:
        if self.world is not None:  # (a listing's recording mode is not the run's)
            pushed.append(self)
        return real_enter(self)  # type: ignore[no-untyped-call]  # torch's mode is unannotated

    def wrapper(*args: Any) -> Any:
        wrapped.append(args)
        return real_wrapper(*args)

    monkeypatch.setattr(operations.OperationMode, "__enter__", enter)
    monkeypatch.setattr(forwards, "_wrapper", wrapper)
    net = gpt2()
    model = nnsight.NNsight(net)
    with model.trace(IDS):
        model.transformer.h[0].attn.output[0].save()
    assert pushed == [] and wrapped == []
    with model.trace(IDS):
        model.transformer.h[0].attn.source.softmax_0.output.save()
    assert len(pushed) == 1 and len(wrapped) == 1
    assert all("forward" not in m.__dict__ for m in net.modules())  # everything restored


def test_cost_when_used() -> None:
    """A trace with one .source read against a plain trace (the ratio is printed; docs/source.md)."""
    model = nnsight.NNsight(gpt2())
    src = model.transformer.h[0].attn.source

    def plain() -> None:
        with model.trace(IDS):
            model.transformer.h[0].attn.output[0].save()

    def sourced() -> None:
        with model.trace(IDS):
            src.softmax_0.output.save()

    start = time.perf_counter()
    sourced()  # the first one makes the listing
    first = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = {}
        for name, fn in (("plain", plain), ("sourced", sourced)):
            fn()
            best = math.inf
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(5):
                    fn()
                best = min(best, (time.perf_counter() - start) / 5)
            times[name] = best
    ratio = times["sourced"] / times["plain"]
    print(f"\nplain {times['plain'] * 1e3:.2f} ms, with .source {times['sourced'] * 1e3:.2f} ms "
          f"(ratio {ratio:.2f}); first trace (discovery) {first * 1e3:.1f} ms")
    assert ratio < 5
