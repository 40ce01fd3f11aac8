"""WrapperModule: a torch module that returns its input, a hook point to attach.

Attach one (``model.layer1.probe = WrapperModule()``) and route a value
through it with ``hook=True``, and that value gets ``.input``/``.output``
hook points of its own in later traces. nnsight 0.4 scripts import it from
``nnsight.util``; `nnsight_pure.util` re-exports it.
"""

from __future__ import annotations

from typing import Any

import torch


class WrapperModule(torch.nn.Module):
    """Returns its single positional argument (or the tuple of them); ignores keywords."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if len(args) == 1 else args
