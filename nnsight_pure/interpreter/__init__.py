"""Running graphs: a trace over one model run (hook-driven), or a session.

A graph runs as a fold over its plan's steps in a *frame*: an environment
for one execution of one graph. Condition and loop bodies run in frames of
their own, folded inline (``yield from``), so a body inside a trace can wait
for module calls like any other node.

In a trace, each invoke is its own *program*: its nodes run in the order
they were written. A program is a generator that suspends whenever a node
needs a module value the model has not produced yet, and is resumed by the
hooks when it has. At every hook event the programs resume in the order
they began in the code (invoke 0, invoke 1, ...), so an invoke can use a
value another invoke computed at the same module call (activation patching).

A session has no hooks of its own: its graph is folded directly, and each
trace node in it runs a whole trace through the model wrapper's callback.

Semantics (docs/interpreter.md explains them with examples):

* A module access waits for its call; everything written after it in the
  same invoke waits too.
* Reading a call that already happened still gives its value (the run keeps
  it because the plan says a later node reads it).
* Writing to a call the model has moved past raises `OutOfOrderError`.
* A value from another invoke that is not computed yet is waited for, and
  accesses of one module call from different invokes keep their text order.
* Every value dies after its last use unless it is saved (or a later node
  outside its body reads it).
* A stop ends the innermost loop; outside loops it ends the trace's model
  run, or the session.
* Hooks exist only on the modules the plan needs, only during the run, and
  are removed whatever happens.

The package, by job: ``fold`` (the step semantics) and ``loops`` (the loop
steps), ``scheduler`` (programs and their waits), ``world`` (the hook-event
state: the event register, kept values, call counts, row swaps, gradient
hooks), ``frame`` (one execution's environment), ``messages`` (errors and
warnings), ``run`` (`run_trace`, `run_session`, `Interleaver`).
"""

from .fold import Fold, TraceRunner
from .run import Interleave, Interleaver, Run, run_session, run_trace
from .signals import EarlyStop

__all__ = ["EarlyStop", "Fold", "Interleave", "Interleaver", "Run", "TraceRunner", "run_session", "run_trace"]
