"""Peak memory of saving the 12 GPT-2 block outputs at batch 8, against plain hooks.

Each mode runs in a fresh process (``python -m benchmarks.memory MODE``):
one plain forward warms up, the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), then the mode runs 10 times, keeping only the
last result. The process prints ``peak - before`` in MiB. glibc is told to
return freed memory (``MALLOC_*`` variables), so that reuse patterns do not
move the peak by megabytes from run to run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

MODES = ("plain forward", "hand-written hooks", "nnsight_pure trace", "nnsight_pure replay")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def measure_in_this_process(mode: str) -> dict[str, Any]:
    import gc

    import torch

    import nnsight_pure
    from benchmarks.scenarios import HookDict, gpt2

    torch.set_num_threads(1)
    net = gpt2()
    model = nnsight_pure.NNsight(net)
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
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

    with torch.no_grad():
        net(ids)  # the same warm-up for every mode
        gc.collect()
        before = _status_kib("VmRSS")
        _reset_peak()
        kept = None
        for _ in range(10):
            kept = None
            kept = run()
        peak = _status_kib("VmHWM")
    del kept
    return {"mode": mode, "before_mib": before / 1024, "peak_mib": peak / 1024, "extra_mib": (peak - before) / 1024}


def measure(processes: int = 3) -> dict[str, float]:
    """Median extra peak RSS (MiB) per mode, each mode in ``processes`` fresh processes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    found: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(processes):
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", mode],
                capture_output=True, text=True, check=True, env=env,
            )
            found[mode].append(json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"])
    return {mode: statistics.median(values) for mode, values in found.items()}


if __name__ == "__main__":
    print(json.dumps(measure_in_this_process(sys.argv[1])))
