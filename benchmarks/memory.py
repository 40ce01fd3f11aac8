"""Peak memory of saving the 12 GPT-2 block outputs at batch 8, against plain hooks;
and of 8 and 64 invokes saving block 5's output, against a hook on the batched forward.

Each mode runs in a fresh process (``python -m benchmarks.memory MODE``):
one plain forward warms up, the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), then the mode runs 10 times, keeping only the
last result. The process prints ``peak - before`` in MiB. glibc is told to
return freed memory (``MALLOC_*`` variables), so that reuse patterns do not
move the peak by megabytes from run to run. On CUDA (``NNSIGHT_PURE_DEVICE``)
the figure is the device's peak allocated memory instead.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

MODES = ("plain forward", "hand-written hooks", "nnsight_pure trace", "nnsight_pure replay")
INVOKE_COUNTS = (8, 64)
INVOKE_TOOLS = ("hand-written hooks", "nnsight_pure trace")
INVOKE_MODES = tuple(f"{tool}, {count} invokes" for count in INVOKE_COUNTS for tool in INVOKE_TOOLS)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _invokes_run(mode: str) -> tuple[Any, Any, int]:
    """(warm-up, run, repetitions) of an invokes mode: ``"TOOL, N invokes"``."""
    import nnsight_pure
    from benchmarks.generation import _rows, invoke_cases
    from benchmarks.scenarios import gpt2

    tool, count = mode.split(", ")
    net = gpt2()
    rows = _rows(int(count.split()[0]))
    case = invoke_cases(net, nnsight_pure.NNsight(net), None, rows)[tool]
    return lambda: net(rows), case, 3


def _peak(before: int) -> tuple[float, float]:
    """(before, peak) in MiB: RSS, or the CUDA device's allocated memory."""
    import torch

    from benchmarks.device import DEVICE

    if DEVICE.type == "cuda":
        return before / 2**20, torch.cuda.max_memory_allocated(DEVICE) / 2**20
    return before / 1024, _status_kib("VmHWM") / 1024


def _start() -> int:
    import torch

    from benchmarks.device import DEVICE

    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        return int(torch.cuda.memory_allocated(DEVICE))
    before = _status_kib("VmRSS")
    _reset_peak()
    return before


def measure_in_this_process(mode: str) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(1)
    if mode in INVOKE_MODES:
        warm, run, repetitions = _invokes_run(mode)
    else:
        warm, run = _saves_run(mode)
        repetitions = 10
    with torch.no_grad():
        warm()  # the same warm-up for every mode
        gc.collect()
        before = _start()
        kept = None
        for _ in range(repetitions):
            kept = None
            kept = run()
        start_mib, peak_mib = _peak(before)
    del kept
    return {"mode": mode, "before_mib": start_mib, "peak_mib": peak_mib, "extra_mib": peak_mib - start_mib}


def _saves_run(mode: str) -> tuple[Any, Any]:
    """(warm-up, run) of a mode saving the 12 block outputs at batch 8."""
    import torch

    import nnsight_pure
    from benchmarks.device import on
    from benchmarks.scenarios import HookDict, gpt2

    net = gpt2()
    model = nnsight_pure.NNsight(net)
    ids = on(torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1)))
    graph = nnsight_pure.trace(model, lambda m: [m.transformer.h[i].output for i in range(12)])
    blocks: dict[str, torch.nn.Module] = {str(i): block for i, block in enumerate(net.transformer.h)}

    def run() -> Any:
        if mode == "plain forward":
            return net(ids).logits
        if mode == "hand-written hooks":
            with HookDict(blocks) as seen:
                net(ids)
            return dict(seen)
        if mode == "nnsight_pure trace":
            with model.trace(ids):
                saved = [model.transformer.h[i].output.save() for i in range(12)]
            return [proxy.value for proxy in saved]
        return nnsight_pure.run(model, graph, ids).outputs

    return lambda: net(ids), run


def measure(processes: int = 3, modes: tuple[str, ...] = MODES) -> dict[str, float]:
    """Median extra peak RSS (MiB) per mode, each mode in ``processes`` fresh processes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    found: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(processes):
        for mode in modes:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", mode],
                capture_output=True, text=True, check=True, env=env,
            )
            found[mode].append(json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"])
    return {mode: statistics.median(values) for mode, values in found.items()}


if __name__ == "__main__":
    print(json.dumps(measure_in_this_process(sys.argv[1])))
