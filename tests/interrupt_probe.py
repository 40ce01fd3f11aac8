"""Run small traces with a KeyboardInterrupt (SIGALRM) at a random moment in
each; print what was left behind, as JSON. A leftover whose interrupt landed
on the very entry of ``Tracer.__exit__`` (Python raises it before the first
line of ``__exit__`` runs, and ``with`` does not call ``__exit__`` again) is
counted apart, in ``*_at_exit_entry``: no code of the library can run there. Used by test_interrupts.py (in a
subprocess: the alarm must not hit the test runner) and by hand:

    python -m tests.interrupt_probe 2500
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any

import torch

import nnsight_pure as nnsight
from nnsight_pure import open_blocks as active


def _hooks(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _alarm(*_: Any) -> None:
    raise KeyboardInterrupt


def main(count: int, seed: int) -> dict[str, int]:
    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2)))
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    modes = torch._C._len_torch_function_stack()

    def one() -> None:
        with model.trace(x):
            hidden = model.layer1.output
            model.layer2.output[:] = model.layer2.output * 2 + hidden.sum()
            model.layer2.output.save()

    start = time.perf_counter()
    for _ in range(20):
        one()
    per_trace = (time.perf_counter() - start) / 20
    signal.signal(signal.SIGALRM, _alarm)
    found = {
        "traces": count, "interrupted": 0, "hooks_left": 0, "traces_left_open": 0, "modes_left": 0,
        "interrupted_at_exit_entry": 0, "traces_left_open_at_exit_entry": 0, "modes_left_at_exit_entry": 0,
    }
    for _ in range(count):
        at_entry = False
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, per_trace * 1.3))
                one()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt as error:
            found["interrupted"] += 1
            frames = traceback.extract_tb(error.__traceback__)
            landed = frames[-2] if len(frames) > 1 else None
            at_entry = landed is not None and landed.name == "__exit__" and (landed.line or "").startswith("def ")
            found["interrupted_at_exit_entry"] += at_entry
        suffix = "_at_exit_entry" if at_entry else ""
        if _hooks(net):
            found["hooks_left"] += 1  # (no hook is on the model by then: never excused)
            for module in net.modules():
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
        if active.innermost() is not None:
            found["traces_left_open" + suffix] += 1
            for context in active.open_contexts()[:1]:
                active.remove(context)  # (and everything inside it)
        if torch._C._len_torch_function_stack() != modes:
            found["modes_left" + suffix] += 1
            while torch._C._len_torch_function_stack() > modes:
                torch._C._pop_torch_function_stack()
    return found


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)))
