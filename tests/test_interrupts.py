"""Ctrl-C at any moment of a trace leaves no hook on the model and no trace open.

A subprocess (the alarm must not reach the test runner) runs a few hundred
small traces, each with a ``KeyboardInterrupt`` (SIGALRM) at a random moment
of it, and counts what was left behind after each: hooks on the model,
contexts still open on the thread's stack, torch function modes still
pushed. All must be zero, but for one moment no library code can act on:
an interrupt that Python raises on entering ``Tracer.__exit__``, before its
first line (``with`` then never calls ``__exit__``); those are counted
apart (about 1 in 1000 interrupts). ``python -m tests.interrupt_probe 2500``
runs more.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs SIGALRM")
def test_random_interrupts_leave_nothing_behind() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.interrupt_probe", "300", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["interrupted"] >= 50, found  # the alarms did land inside traces
    assert (found["hooks_left"], found["traces_left_open"], found["modes_left"]) == (0, 0, 0), found
    assert found["traces_left_open_at_exit_entry"] <= found["interrupted_at_exit_entry"], found
