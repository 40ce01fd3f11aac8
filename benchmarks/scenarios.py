"""The benchmark scenarios: each a group of cases timed against hand-written hooks.

Every group has a ``baseline``: the same work done with plain torch hooks,
registered for one forward and removed after it (the physical floor). The
library's cases are a fresh trace (tracing + planning + running) and a
replay (``run`` of a graph built once with ``trace``); with the ``nnsight``
package importable, nnsight's trace joins each group. Before timing, each
case's result is checked against the baseline's (``torch.equal``).
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import attrs
import torch

import nnsight_pure
from benchmarks.device import on

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

Case = Callable[[], Any]


@attrs.frozen
class Group:
    """Cases doing the same work, the first being the hand-written-hooks baseline."""

    name: str
    title: str
    cases: dict[str, Case]
    baseline: str
    check: Callable[[Any, Any], bool]
    per: int = 1  # calls of the model per case call (a loop of 100 traces: 100)
    events: int = 1  # hook events (hooked module calls) in one call of the baseline
    rounds: int | None = None  # fewer rounds/samples for slow groups (None: the run's own)
    samples: int | None = None


def nnsight_available() -> bool:
    return importlib.util.find_spec("nnsight") is not None


def _their_value(proxy: Any) -> Any:
    """A saved value of nnsight: ``.value`` in 0.4, the value itself from 0.5 on."""
    return getattr(proxy, "value", proxy)


def _their_save_all(nnsight: Any, proxies: list[Any]) -> Any:
    """Save a list of values in a trace: each ``.save()`` in 0.4; ``nnsight.save(list)``
    from 0.5 on (a list built inside the block does not come out otherwise)."""
    if hasattr(nnsight, "save"):
        return nnsight.save(proxies)
    return [proxy.save() for proxy in proxies]


# --- models ---------------------------------------------------------------------------


class Tiny(torch.nn.Sequential):
    """The seed example's two-layer net (attributes typed for mypy)."""

    layer1: torch.nn.Linear
    layer2: torch.nn.Linear


def tiny() -> Tiny:
    torch.manual_seed(423)
    return on(Tiny(OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2))))


def chain() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return on(torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(12)]))


def gpt2() -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=256, n_head=8, vocab_size=1000, n_positions=128, use_cache=False)
    model = GPT2LMHeadModel(config)
    torch.nn.Module.eval(model)
    return on(model)


# --- the hand-written floor ------------------------------------------------------------


class HookDict:
    """Forward hooks on ``modules`` for one block: each output (or, with
    ``edit``, its replacement) recorded by name; removed on exit."""

    def __init__(self, modules: dict[str, torch.nn.Module], edit: Callable[[str, Any], Any] | None = None) -> None:
        self.modules = modules
        self.edit = edit
        self.seen: dict[str, Any] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> dict[str, Any]:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.seen

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if self.edit is not None:
                output = self.edit(name, output)
            self.seen[name] = output
            return output

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


# --- groups -----------------------------------------------------------------------------


def tiny_cases() -> dict[str, Case]:
    """The tiny model saving layer1.output: hand-written hooks, a fresh trace,
    a replay, and nnsight's trace when it is importable (scenario 1 and the
    loop of 10,000 traces, benchmarks/loop.py)."""
    net = tiny()
    model = nnsight_pure.NNsight(net)
    x = on(torch.rand(1, 5))

    def hooks() -> Any:
        with HookDict({"layer1": net.layer1}) as seen:
            net(x)
        return seen["layer1"]

    def trace() -> Any:
        with model.trace(x):
            hidden = model.layer1.output.save()
        return hidden.value

    graph = nnsight_pure.trace(model, lambda m: m.layer1.output)

    def replay() -> Any:
        return nnsight_pure.run(model, graph, x).outputs

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace, "nnsight_pure replay": replay}
    if nnsight_available():
        import nnsight

        theirs = nnsight.NNsight(tiny())

        def their_trace() -> Any:
            with theirs.trace(x):
                hidden = theirs.layer1.output.save()
            return _their_value(hidden)

        cases["nnsight trace"] = their_trace
    return cases


def tiny_group() -> Group:
    return Group("tiny", "1. tiny model (Linear(5,10) → Linear(10,2)), one trace saving layer1.output",
                 tiny_cases(), "hand-written hooks", _same)


def tiny_loop_group() -> Group:
    net = tiny()
    model = nnsight_pure.NNsight(net)
    inputs = [on(torch.rand(1, 5)) for _ in range(100)]

    def hooks() -> Any:
        out = []
        for x in inputs:
            with HookDict({"layer1": net.layer1}) as seen:
                net(x)
            out.append(seen["layer1"])
        return out

    def traces() -> Any:
        out = []
        for x in inputs:
            with model.trace(x):
                hidden = model.layer1.output.save()
            out.append(hidden.value)
        return out

    graph = nnsight_pure.trace(model, lambda m: m.layer1.output)

    def replays() -> Any:
        return [nnsight_pure.run(model, graph, x).outputs for x in inputs]

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": traces, "nnsight_pure replay": replays}
    return Group("tiny_loop", "1b. tiny model, a loop of 100 traces (times per trace)", cases,
                 "hand-written hooks", _same, per=100)


def chain_group() -> Group:
    net = chain()
    model = nnsight_pure.NNsight(net)
    x = on(torch.rand(1, 16))
    modules: dict[str, torch.nn.Module] = {str(i): module for i, module in enumerate(net)}

    def hooks() -> Any:
        with HookDict(modules) as seen:
            net(x)
        return [seen[str(i)] for i in range(12)]

    def trace() -> Any:
        with model.trace(x):
            saved = [model[i].output.save() for i in range(12)]
        return [proxy.value for proxy in saved]

    graph = nnsight_pure.trace(model, lambda m: [m[i].output for i in range(12)])

    def replay() -> Any:
        return nnsight_pure.run(model, graph, x).outputs

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace, "nnsight_pure replay": replay}
    if nnsight_available():
        import nnsight

        theirs = nnsight.NNsight(chain())

        def their_trace() -> Any:
            with theirs.trace(x):
                saved = _their_save_all(nnsight, [theirs[i].output for i in range(12)])
            return [_their_value(proxy) for proxy in saved]

        cases["nnsight trace"] = their_trace
    return Group("chain", "2. chain of 12 Linear(16,16), saving all 12 outputs", cases, "hand-written hooks", _same,
                 events=12)


def _block_output(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def gpt2_groups() -> list[Group]:
    net = gpt2()
    model = nnsight_pure.NNsight(net)
    ids = on(torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1)))
    blocks: dict[str, torch.nn.Module] = {str(i): block for i, block in enumerate(net.transformer.h)}

    def hooks() -> Any:
        with HookDict(blocks) as seen:
            net(ids)
        return [_block_output(seen[str(i)]) for i in range(12)]

    def trace() -> Any:
        with model.trace(ids):
            saved = [model.transformer.h[i].output.save() for i in range(12)]
        return [_block_output(proxy.value) for proxy in saved]

    graph = nnsight_pure.trace(model, lambda m: [m.transformer.h[i].output for i in range(12)])

    def replay() -> Any:
        return [_block_output(value) for value in nnsight_pure.run(model, graph, ids).outputs]

    saves: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace, "nnsight_pure replay": replay}

    def zero(name: str, output: Any) -> Any:
        if name == "5":
            _block_output(output)[:] = 0
        return output

    def hooks_zero() -> Any:
        with HookDict({"5": net.transformer.h[5], "lm_head": net.lm_head}, zero) as seen:
            net(ids)
        return seen["lm_head"]

    def trace_zero() -> Any:
        with model.trace(ids):
            model.transformer.h[5].output[:] = 0
            logits = model.lm_head.output.save()
        return logits.value

    def zero_and_read(m: Any) -> Any:
        m.transformer.h[5].output[:] = 0
        return m.lm_head.output

    zero_graph = nnsight_pure.trace(model, zero_and_read)

    def replay_zero() -> Any:
        return nnsight_pure.run(model, zero_graph, ids).outputs

    zeros: dict[str, Case] = {"hand-written hooks": hooks_zero, "nnsight_pure trace": trace_zero,
                              "nnsight_pure replay": replay_zero}
    if nnsight_available():
        import nnsight

        theirs = nnsight.NNsight(gpt2())

        def their_saves() -> Any:
            with theirs.trace(ids):
                saved = _their_save_all(nnsight, [theirs.transformer.h[i].output for i in range(12)])
            return [_block_output(_their_value(proxy)) for proxy in saved]

        def their_zero() -> Any:
            with theirs.trace(ids):
                theirs.transformer.h[5].output[:] = 0
                logits = theirs.lm_head.output.save()
            return _their_value(logits)

        saves["nnsight trace"] = their_saves
        zeros["nnsight trace"] = their_zero
    return [
        Group(
            "gpt2_saves", "3a. GPT-2 12×256, ids 1×32: save the 12 block outputs", saves, "hand-written hooks", _same,
            events=12,
        ),
        Group(
            "gpt2_zero", "3b. GPT-2 12×256: zero block 5's output, save the logits", zeros, "hand-written hooks", _same,
            events=2,
        ),
    ]


def _ops_cases(count: int, net: torch.nn.Sequential, theirs: Any) -> dict[str, Case]:
    """``count`` chained ``x = x * 1.0001`` on one activation (the chain's 6th output)."""
    model = nnsight_pure.NNsight(net)
    x = on(torch.rand(1, 16, generator=torch.Generator().manual_seed(3)))

    def hooks() -> Any:
        result: list[Any] = []

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            value = output
            for _ in range(count):
                value = value * 1.0001
            result.append(value)

        handle = net[5].register_forward_hook(hook)
        try:
            net(x)
        finally:
            handle.remove()
        return result[0]

    def trace() -> Any:
        with model.trace(x):
            value = model[5].output
            for _ in range(count):
                value = value * 1.0001
            saved = value.save()
        return saved.value

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace}
    if theirs is not None:

        def their_trace() -> Any:
            with theirs.trace(x):
                value = theirs[5].output
                for _ in range(count):
                    value = value * 1.0001
                saved = value.save()
            return _their_value(saved)

        cases["nnsight trace"] = their_trace
    return cases


def _their_chain() -> Any:
    if not nnsight_available():
        return None
    import nnsight

    return nnsight.NNsight(chain())


def _ops_rounds(count: int) -> tuple[int | None, int | None]:
    """N = 10000 takes tens of ms a trace: fewer rounds keep the run short."""
    return (10, 3) if count >= 10000 else (None, None)


def ops_groups(counts: tuple[int, ...] = (10, 100, 1000, 10000)) -> list[Group]:
    """4: one group per N, each case against the hooks doing the same N ops."""
    net, theirs = chain(), _their_chain()
    return [
        Group(f"ops_{count}", f"4. one trace recording {count} chained ops on one activation",
              _ops_cases(count, net, theirs), "hand-written hooks", _same, *((1, 1) + _ops_rounds(count)))
        for count in counts
    ]


SLOPES = {"ops_slope": (100, 1000), "ops_slope_big": (1000, 10000)}


def ops_slope_groups() -> list[Group]:
    """4b: for each pair of N (100 and 1000; 1000 and 10000) every tool's two
    counts in one group, so that each round gives a slope (µs per op)
    measured moments apart for every tool."""
    net, theirs = chain(), _their_chain()
    groups = []
    for name, counts in SLOPES.items():
        cases: dict[str, Case] = {}
        for count in counts:
            for tool, case in _ops_cases(count, net, theirs).items():
                cases[f"{tool}, N={count}"] = case
        groups.append(Group(name, f"4b. cost per recorded op, N = {counts[0]} to {counts[1]}", cases,
                            f"hand-written hooks, N={counts[1]}", lambda a, b: True, 1, 1, *_ops_rounds(counts[1])))
    return groups


def _detached(value: Any) -> Any:
    """What a hand-written cache keeps of a module's output: its tensors detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(item) for item in value)
    return value


def _hidden(value: Any) -> Any:
    """The tensor a cache comparison looks at: the output itself, its first
    item (a tuple or a transformers ``ModelOutput``)."""
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return value[0] if isinstance(value, tuple) else value


def cache_group() -> Group:
    """9: ``tracer.cache()`` of every module of the GPT-2-shaped model against
    forward hooks on every module storing its output (detached) by name."""
    net = gpt2()
    model = nnsight_pure.NNsight(net)
    ids = on(torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1)))
    modules = dict(net.named_modules())
    names = ["model." + name if name else "model" for name in modules]

    def hooks() -> Any:
        seen: dict[str, Any] = {}

        def keeper(name: str) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                seen[name] = _detached(output)

            return hook

        handles = [module.register_forward_hook(keeper(name)) for name, module in zip(names, modules.values())]
        try:
            net(ids)
        finally:
            for handle in handles:
                handle.remove()
        return [_hidden(seen[name]) for name in names if name in seen]

    def trace() -> Any:
        with model.trace(ids) as tracer:
            cache = tracer.cache()
        return [_hidden(entry.output) for entry in cache.value.values()]

    with model.trace(ids) as tracer:
        tracer.cache()
    graph = tracer.graph

    def replay() -> Any:
        (cache,) = nnsight_pure.run(model, graph, ids).values.values()
        return [_hidden(entry.output) for entry in cache.values()]

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace, "nnsight_pure replay": replay}
    return Group("cache", "9. GPT-2 12×256, ids 1×32: cache every module's output (tracer.cache())", cases,
                 "hand-written hooks", _same, events=len(modules))
