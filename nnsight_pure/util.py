"""``WrapperModule``, at the path nnsight 0.4 code imports it from (``nnsight.util``).

A module that returns its input: attach one (``model.layer1.probe =
WrapperModule()``) and route a value through it with ``hook=True``, and that
value gets ``.input``/``.output`` hook points of its own in later traces.
"""

from __future__ import annotations

from typing import Any

import torch


class WrapperModule(torch.nn.Module):
    """Returns its single positional argument (or the tuple of them); ignores keywords."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 else args
