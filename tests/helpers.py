"""Reference computations with plain torch hooks, and small test models.

Every intervention test compares nnsight_pure against the same computation
written by hand here, with hooks registered for one forward and removed after.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

import torch
from transformers import GPT2Config, GPT2LMHeadModel


class TinyNet(torch.nn.Sequential):
    """The seed example's two-layer net, with its layers typed for mypy."""

    layer1: torch.nn.Linear
    layer2: torch.nn.Linear


def tiny_net(seed: int = 423) -> TinyNet:
    """The seed example's two-layer net (layer1: Linear(5, 10), layer2: Linear(10, 2))."""
    torch.manual_seed(seed)
    return TinyNet(OrderedDict([("layer1", torch.nn.Linear(5, 10)), ("layer2", torch.nn.Linear(10, 2))]))


class WithSpare(torch.nn.Module):
    """A model with a submodule its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(5, 5)
        self.spare = torch.nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.used(x)
        return out


def tiny_gpt2(n_layer: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    """A GPT-2-shaped model with random weights, from a config (eval mode: no dropout)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )
    model = GPT2LMHeadModel(config)
    torch.nn.Module.eval(model)
    return model


def hooked_run(
    model: torch.nn.Module,
    *args: Any,
    read: tuple[str, ...] = (),
    replace: Mapping[str, Callable[[Any], Any]] | None = None,
    replace_input: Mapping[str, Callable[[Any], Any]] | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``model(*args, **kwargs)`` with hand-written hooks, removed afterwards.

    ``read`` paths have their outputs recorded; ``replace[path](output)``
    returns a module's new output; ``replace_input[path](args)`` its new args.
    Returns the model's output and the recorded values.
    """
    seen: dict[str, Any] = {}
    handles = []
    try:
        for path in read:
            def record(module: torch.nn.Module, inputs: Any, output: Any, path: str = path) -> None:
                seen[path] = output
            handles.append(model.get_submodule(path).register_forward_hook(record))
        for path, fn in (replace or {}).items():
            def swap(module: torch.nn.Module, inputs: Any, output: Any, fn: Callable[[Any], Any] = fn) -> Any:
                return fn(output)
            handles.append(model.get_submodule(path).register_forward_hook(swap, prepend=True))
        for path, fn in (replace_input or {}).items():
            def swap_in(module: torch.nn.Module, inputs: Any, fn: Callable[[Any], Any] = fn) -> Any:
                return fn(inputs)
            handles.append(model.get_submodule(path).register_forward_pre_hook(swap_in))
        output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(forward hooks, forward pre-hooks) per module: to check nothing of ours is left."""
    return {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }


def parameters_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_parameters(model: torch.nn.Module, snapshot: Mapping[str, torch.Tensor]) -> bool:
    now = dict(model.named_parameters())
    return set(now) == set(snapshot) and all(torch.equal(now[k].detach(), v) for k, v in snapshot.items())


def walk(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from walk(item)
