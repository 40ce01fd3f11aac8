"""Run the benchmarks and write benchmarks/RESULTS.md: ``python -m benchmarks``.

Options: ``--quick`` (few rounds: a smoke run, numbers not to be trusted),
``--only NAME ...`` (groups: tiny tiny_loop chain gpt2 ops slope cache
generation invokes loop memory invokes_memory; the default is all),
``--out PATH`` (default benchmarks/RESULTS.md). One torch thread, as in
../shared/reference/perf_anchors.md. Every case's result is checked against
the hand-written hooks' before anything is timed. ``NNSIGHT_PURE_DEVICE``
(default cpu) says where models and inputs go (benchmarks/device.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

import torch

import nnsight_pure
from benchmarks import loop, memory
from benchmarks.device import describe
from benchmarks.generation import INVOKE_COUNTS, generation_groups, invokes_groups
from benchmarks.harness import Stats, measure, quartiles
from benchmarks.scenarios import (
    SLOPES,
    Group,
    cache_group,
    chain_group,
    gpt2_groups,
    nnsight_available,
    ops_groups,
    ops_slope_groups,
    tiny_group,
    tiny_loop_group,
)

GROUPS = ("tiny", "tiny_loop", "chain", "gpt2", "ops", "slope", "cache", "generation", "invokes", "loop", "memory",
          "invokes_memory")
# Issue 20's targets: (group, case) -> the most × hand-written hooks (median of paired ratios).
TARGETS = {
    ("tiny", "nnsight_pure trace"): 2.0,
    ("tiny", "nnsight_pure replay"): 1.3,
    ("chain", "nnsight_pure trace"): 1.5,
    ("chain", "nnsight_pure replay"): 1.2,
    ("gpt2_saves", "nnsight_pure trace"): 1.02,
    ("gpt2_saves", "nnsight_pure replay"): 1.02,
    ("gpt2_zero", "nnsight_pure trace"): 1.02,
    ("gpt2_zero", "nnsight_pure replay"): 1.02,
    ("generation_saves", "nnsight_pure trace"): 1.05,
    ("generation_steer", "nnsight_pure trace"): 1.05,
    ("cache", "nnsight_pure trace"): 1.10,
    ("cache", "nnsight_pure replay"): 1.10,
}
OP_TARGET_US = 1.0  # recording, per op, beyond the op's own compute
MEMORY_TARGET = 1.10  # extra peak memory, × the hooks'
FLAT_TOLERANCE = 0.02  # "flat": × hooks at 64 invokes at most this above × hooks at 8
THEIRS = "nnsight trace"


def _machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}",
                f"nnsight_pure {getattr(nnsight_pure, '__version__', '0.1.0')}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    if nnsight_available():
        import nnsight

        versions.append(f"nnsight {getattr(nnsight, '__version__', '?')}")
    return [
        f"* date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"* machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
        f"torch threads: {torch.get_num_threads()}, device: {describe()}",
        f"* versions: {', '.join(versions)}",
    ]


def _check(group: Group) -> None:
    with torch.no_grad():
        expected = group.cases[group.baseline]()
        for name, case in group.cases.items():
            if not group.check(case(), expected):
                raise AssertionError(f"{group.name}: {name} does not give the hand-written hooks' result")


def _table(group: Group, stats: dict[str, Stats], quick: bool) -> list[str]:
    unit = (" per invoke" if group.name.startswith("invokes") else " per trace") if group.per > 1 else ""
    fewer = f" ({group.rounds} rounds × {group.samples} samples)" if group.rounds and not quick else ""
    lines = [f"### {group.title}{fewer}", "",
             f"| case | median µs{unit} | IQR µs | × hooks (median of paired ratios) | ratio IQR "
             f"| Δ vs hooks µs{unit} | Δ per hook event µs ({group.events} events) |",
             "|---|---|---|---|---|---|---|"]
    for name, case in stats.items():
        per = group.per
        lines.append(
            f"| {name} | {case.median_us / per:,.1f} | {case.iqr_us / per:,.1f} | {case.ratio:.2f} | "
            f"{case.ratio_iqr:.2f} | {case.delta_us / per:,.1f} | {case.delta_us / per / group.events:,.2f} |"
        )
    return lines + [""]


def _groups(wanted: set[str]) -> list[Group]:
    makers = {
        "tiny": lambda: [tiny_group()],
        "tiny_loop": lambda: [tiny_loop_group()],
        "chain": lambda: [chain_group()],
        "gpt2": gpt2_groups,
        "ops": ops_groups,
        "slope": ops_slope_groups,
        "cache": lambda: [cache_group()],
        "generation": generation_groups,
        "invokes": invokes_groups,
    }
    return [group for name, make in makers.items() if name in wanted for group in make()]


def main(argv: list[str] | None = None) -> int:
    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("RESULTS.md")))
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds, samples = (4, 2) if options.quick else (30, 5)
    wanted = set(options.only) if options.only else set(GROUPS)
    unknown = wanted - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}; choose from {' '.join(GROUPS)}")

    started = time.perf_counter()
    groups = _groups(wanted)
    results: dict[str, dict[str, Stats]] = {}
    for group in groups:
        _check(group)
        print(f"timing {group.name} ...", file=sys.stderr, flush=True)
        group_rounds = rounds if options.quick or group.rounds is None else group.rounds
        group_samples = samples if options.quick or group.samples is None else group.samples
        at = time.perf_counter()
        with torch.no_grad():
            results[group.name] = measure(group.cases, group.baseline, rounds=group_rounds, samples=group_samples)
        for name, stats in results[group.name].items():
            print(f"  {name:28s} {stats.median_us / group.per:12.1f} us  x{stats.ratio:.2f}", file=sys.stderr)
        print(f"  ({time.perf_counter() - at:.1f} s)", file=sys.stderr)
    loop_result = None
    if "loop" in wanted:
        print("timing loop ...", file=sys.stderr, flush=True)
        loop_result = loop.measure()
    processes = 1 if options.quick else 3
    memory_result = memory.measure(processes) if "memory" in wanted else None
    invokes_memory = memory.measure(processes, memory.INVOKE_MODES) if "invokes_memory" in wanted else None

    lines = ["# Benchmarks", "",
             "Generated by `./scripts/bench.sh` (`python -m benchmarks`); see benchmarks/README.md for the method.",
             "Ratios are medians of per-round paired ratios against hand-written hooks measured in the same run.",
             ""]
    lines += _machine()
    caveat = " (--quick: not to be trusted)" if options.quick else ""
    lines += [f"* rounds: {rounds} × {samples} samples per case{caveat}; slow groups fewer (in their titles)",
              f"* wall time: {time.perf_counter() - started:.0f} s", ""]
    lines += _summary(results, memory_result, invokes_memory, loop_result)
    for group in groups:
        if group.name not in SLOPES:
            lines += _table(group, results[group.name], options.quick)
    lines += _ops_table(results)
    if loop_result is not None:
        lines += loop.table(loop_result)
    if memory_result is not None:
        lines += _memory_table(memory_result)
    if invokes_memory is not None:
        lines += _invokes_memory_table(invokes_memory)
    pathlib.Path(options.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {options.out}", file=sys.stderr)
    return 0


def _slope_rounds(group: dict[str, Stats], tool: str, counts: tuple[int, int]) -> list[float]:
    """Per round: (tool's time at the larger N - at the smaller) / ΔN, µs per op."""
    small, big = counts
    pairs = zip(group[f"{tool}, N={small}"].rounds_us, group[f"{tool}, N={big}"].rounds_us)
    return [(b - a) / (big - small) for a, b in pairs]


def _slopes(results: dict[str, dict[str, Stats]], name: str) -> dict[str, tuple[float, float, float, float]]:
    """Per tool of slope group ``name``: the median and IQR over rounds of its
    slope (µs per op), and of its slope minus the hooks' slope in the same
    round (the cost beyond the op's own compute)."""
    group = results.get(name)
    if group is None:
        return {}
    counts = SLOPES[name]
    floor = _slope_rounds(group, "hand-written hooks", counts)
    found: dict[str, tuple[float, float, float, float]] = {}
    for case in group:
        if not case.endswith(f", N={counts[0]}"):
            continue
        tool = case.removesuffix(f", N={counts[0]}")
        own = _slope_rounds(group, tool, counts)
        q1, median, q3 = quartiles(own)
        b1, beyond, b3 = quartiles([ours - base for ours, base in zip(own, floor)])
        found[tool] = (median, q3 - q1, beyond, b3 - b1)
    return found


def _ops_table(results: dict[str, dict[str, Stats]]) -> list[str]:
    lines: list[str] = []
    for name, (small, big) in SLOPES.items():
        slopes = _slopes(results, name)
        if not slopes:
            continue
        lines += [f"### 4b. cost per recorded op (N = {small} and {big} timed in the same rounds)", "",
                  "| case | µs per op: median of per-round slopes (IQR) "
                  "| beyond the op's own compute (minus the hooks' slope, per round) µs (IQR) |",
                  "|---|---|---|"]
        for tool, (slope, iqr, beyond, spread) in slopes.items():
            lines.append(f"| {tool} | {slope:.2f} ({iqr:.2f}) | {beyond:.2f} ({spread:.2f}) |")
        lines.append("")
    return lines


def _memory_table(result: dict[str, float]) -> list[str]:
    hooks = result["hand-written hooks"]
    lines = ["### 6. memory: peak over the warmed-up process, saving 12 block outputs at batch 8", "",
             "| mode | extra peak MiB (median of fresh processes) | × hand-written hooks |", "|---|---|---|"]
    for mode, extra in result.items():
        lines.append(f"| {mode} | {extra:.1f} | {extra / hooks:.2f} |")
    return lines + [""]


def _invokes_memory_table(result: dict[str, float]) -> list[str]:
    lines = ["### 11b. memory: n invokes saving block 5's output vs a hook on the batched forward", "",
             "| invokes | hooks extra peak MiB | nnsight_pure trace extra peak MiB | × hooks |", "|---|---|---|---|"]
    for count in memory.INVOKE_COUNTS:
        hooks, ours = result[f"hand-written hooks, {count} invokes"], result[f"nnsight_pure trace, {count} invokes"]
        lines.append(f"| {count} | {hooks:.1f} | {ours:.1f} | {ours / hooks:.2f} |")
    return lines + [""]


def _met(value: float, target: float) -> str:
    return "yes" if value <= target else "no"


def _theirs_ratio(results: dict[str, dict[str, Stats]], group: str, ours: str) -> str:
    """nnsight's trace beside our trace (nnsight has no replay: "—" beside ours)."""
    case = results[group].get(THEIRS)
    return f"{case.ratio:.2f}×" if case is not None and ours == "nnsight_pure trace" else "—"


def _per_invoke_overhead(results: dict[str, dict[str, Stats]], tool: str, count: int) -> float | None:
    case = results.get(f"invokes_{count}", {}).get(tool)
    return None if case is None else case.delta_us / count


def _invokes_rows(results: dict[str, dict[str, Stats]]) -> list[str]:
    """Flat cost per invoke: the ratio to the hooks (each invoke one row of the
    hooks' batch) at the most invokes is no higher than at 8 invokes, within
    ``FLAT_TOLERANCE`` (the per-invoke overheads, Δ vs hooks / n, are shown too:
    on a forward this size they are within the noise of zero)."""
    small, big = INVOKE_COUNTS[1], INVOKE_COUNTS[-1]
    found = {n: results.get(f"invokes_{n}", {}).get("nnsight_pure trace") for n in (small, big)}
    ours_small, ours_big = found[small], found[big]
    if ours_small is None or ours_big is None:
        return []
    theirs_cases = {n: results.get(f"invokes_{n}", {}).get(THEIRS) for n in (small, big)}
    theirs_small, theirs_big = theirs_cases[small], theirs_cases[big]
    theirs = (f"{theirs_big.ratio:.2f}× at {big} vs {theirs_small.ratio:.2f}× at {small}"
              if theirs_small is not None and theirs_big is not None else "—")
    return [f"| invokes: cost per invoke flat (× hooks at {big} ≤ × hooks at {small} + {FLAT_TOLERANCE:.2f}) | "
            f"{ours_big.ratio:.2f}× at {big} vs {ours_small.ratio:.2f}× at {small} (Δ per invoke "
            f"{ours_big.delta_us / big:,.1f} vs {ours_small.delta_us / small:,.1f} µs) | "
            f"{_met(ours_big.ratio, ours_small.ratio + FLAT_TOLERANCE)} | {theirs} |"]


def _summary(
    results: dict[str, dict[str, Stats]],
    memory_result: dict[str, float] | None,
    invokes_memory: dict[str, float] | None,
    loop_result: dict[str, loop.LoopResult] | None,
) -> list[str]:
    lines = ["## Targets (issue 20)", "", "| target | nnsight_pure | met | nnsight |", "|---|---|---|---|"]
    for (group, case), target in TARGETS.items():
        if group in results:
            ratio = results[group][case].ratio
            lines.append(f"| {group}: {case} ≤ {target:.2f}× hooks | {ratio:.2f}× | {_met(ratio, target)} | "
                         f"{_theirs_ratio(results, group, case)} |")
    for name, (small, big) in SLOPES.items():
        slopes = _slopes(results, name)
        if "nnsight_pure trace" in slopes:
            beyond = slopes["nnsight_pure trace"][2]
            theirs = f"{slopes[THEIRS][2]:.2f} µs" if THEIRS in slopes else "—"
            lines.append(f"| recording ≤ {OP_TARGET_US:.1f} µs per op beyond its compute (N {small}→{big}) | "
                         f"{beyond:.2f} µs | {_met(beyond, OP_TARGET_US)} | {theirs} |")
    lines += _invokes_rows(results)
    if memory_result is not None:
        hooks = memory_result["hand-written hooks"]
        for mode in ("nnsight_pure trace", "nnsight_pure replay"):
            ratio = memory_result[mode] / hooks
            lines.append(f"| memory ({mode}) ≤ {MEMORY_TARGET:.2f}× hooks' extra peak | {ratio:.2f}× "
                         f"({memory_result[mode]:.1f} vs {hooks:.1f} MiB) | {_met(ratio, MEMORY_TARGET)} | — |")
    if invokes_memory is not None:
        for count in memory.INVOKE_COUNTS:
            hooks = invokes_memory[f"hand-written hooks, {count} invokes"]
            ours = invokes_memory[f"nnsight_pure trace, {count} invokes"]
            lines.append(f"| memory, {count} invokes ≤ {MEMORY_TARGET:.2f}× hooks on the batch | {ours / hooks:.2f}× "
                         f"({ours:.1f} vs {hooks:.1f} MiB) | {_met(ours / hooks, MEMORY_TARGET)} | — |")
    if loop_result is not None:

        def slowdown(result: loop.LoopResult) -> tuple[float, str]:
            growth = result.per_second[0] / result.per_second[-1]  # > 1: the last chunk is slower
            return growth, f"{growth:.2f}×, RSS +{result.rss_growth_mib:.1f} MiB"

        ours, text = slowdown(loop_result["nnsight_pure trace"])
        theirs = slowdown(loop_result[THEIRS])[1] if THEIRS in loop_result else "—"
        lines.append(f"| loop of {loop.TRACES:,} traces: last chunk no slower than the first (≤ 1.10×) | {text} | "
                     f"{_met(ours, 1.10)} | {theirs} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
