"""The two exceptions that steer a run (never seen by the user)."""

from __future__ import annotations


class EarlyStop(BaseException):
    """Raised to end a loop, a model run or a session early; caught where it ends.

    A `BaseException`, so that model code catching ``Exception`` cannot
    swallow it.
    """


class CallsEnded(Exception):
    """The model stopped calling while a loop over calls waited for a call."""
