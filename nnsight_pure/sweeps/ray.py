"""The Ray engine of `nnsight_pure.sweeps.sweep`: batches on a pool of Ray actors.

Each actor is a `BatchRunner`: it builds its model once with the user's
``model_factory`` and gets the graph from the object store once (the graph
is ``ray.put`` a single time and shared by every actor). The driver hands
each idle actor the next batch (at most two in flight per actor, so data
transfer overlaps compute) and merges the partial results in batch order.

Ray does the distribution: scheduling actors onto the cluster's resources,
moving batches and results, and restarting a dead actor (``max_restarts``).
This module only decides what a failure means. A batch whose actor died is
put back in the queue and runs again on the next free actor: graphs are
pure, so running a batch twice is safe and gives the same partial. A batch
sent while Ray was still restarting its actor (``ActorUnavailableError``) is
put back too, without counting a death or an attempt (on a busy machine a
restart takes long enough for that to happen, and it used to end the sweep
as "died 4 times"); the actor gets batches again once it answers. An
exception raised by the user's model or graph on a batch ends the sweep at
once (every actor is killed, nothing waits) with that exception, noting the
batch. Only this module imports Ray, and only when a sweep asks for it.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterator

import torch

from ..errors import SweepError
from ..source import SourceLoc
from ..trees import map_leaves
from .fold import OrderedFold, Spec
from .work import Batch, BatchRunner, note_batch

IN_FLIGHT_PER_ACTOR = 2
RESTART_POLL_S = 0.05  # how often to ask an actor that Ray is restarting whether it is back


class _Worker(BatchRunner):
    """A `BatchRunner` that fetches the graph from the object store once.

    The graph's reference comes boxed in a list with each batch (a few bytes;
    Ray does not resolve a boxed reference), and is fetched the first time:
    a restarted actor fetches it again. It is not a constructor argument
    because Ray cannot promise those to an actor that restarts.
    """

    def __init__(self, model_factory: Any, *rest: Any) -> None:
        super().__init__(model_factory, None, *rest)  # the graph comes with the first batch

    def ready(self) -> bool:
        """Answers once the actor has started (its model is built)."""
        return True

    def run_graph_batch(self, graph_box: list[Any], start: int, data: Any) -> Any:
        if self._graph is None:
            self._graph = _ray().get(graph_box[0])
        # Partials travel to the driver, which may have no GPU: send them from the CPU.
        return map_leaves(_on_cpu, self.run_batch(start, data))


def _on_cpu(leaf: Any) -> Any:
    return leaf.cpu() if isinstance(leaf, torch.Tensor) else leaf


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(
            "engine='ray' needs Ray: pip install 'nnsight_pure[ray]' (or use engine='local')"
        ) from None
    return ray


def run_on_ray(
    runner_args: tuple[Any, ...],
    work: Iterator[Batch],
    spec: Spec,
    bar: Any,
    *,
    workers: int | None,
    retries: int,
    options: dict[str, Any],
    where: SourceLoc | None = None,
) -> tuple[OrderedFold, list[int]]:
    """Run every batch of ``work`` on Ray actors; the fold of their partials
    and the indexes of the batches that ran again after a worker died."""
    ray = _ray()
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    if not ray.is_initialized():
        ray.init()
    count = workers if workers is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))
    if count < 1:
        raise ValueError(f"workers must be at least 1, got {count}")
    factory, graph, *rest = runner_args
    graph_box = [ray.put(graph)]  # once, for every actor
    actor_class = ray.remote(_Worker).options(
        max_restarts=retries, max_task_retries=0, **({"num_cpus": 1} | options)
    )
    pool = [actor_class.remote(factory, *rest) for _ in range(count)]
    # Batches go only to actors that have started: asking for more actors than
    # the cluster has room for leaves the others waiting, not the sweep.
    starting: dict[Any, Any] = {actor.ready.remote(): actor for actor in pool}  # ready ref -> actor
    ready: list[Any] = []
    fold = OrderedFold(spec)
    retried: list[int] = []
    attempts: collections.Counter[int] = collections.Counter()
    queue: collections.deque[Batch] = collections.deque()  # batches to run again
    busy: collections.Counter[int] = collections.Counter()  # tasks in flight per actor
    # Deaths per actor. A task remembers the count when it was sent: the other
    # tasks in flight on an actor that died fail with it, and count no more.
    deaths: collections.Counter[int] = collections.Counter()
    running: dict[Any, tuple[Any, Batch, int]] = {}  # result ref -> (actor, batch, deaths when sent)
    exhausted = False

    def died(actor: Any, deaths_when_sent: int) -> bool:
        """Count a death of ``actor`` (once); False once Ray stops restarting it."""
        if deaths_when_sent == deaths[id(actor)]:
            deaths[id(actor)] += 1
        alive = deaths[id(actor)] <= retries
        if not alive and actor in ready:
            ready.remove(actor)
        return alive

    try:
        while True:
            for actor in ready:
                while busy[id(actor)] < IN_FLIGHT_PER_ACTOR:
                    batch = queue.popleft() if queue else None
                    if batch is None and not exhausted:
                        batch = next(work, None)
                        exhausted = batch is None
                    if batch is None:
                        break
                    ref = actor.run_graph_batch.remote(graph_box, batch.start, batch.data)
                    running[ref] = (actor, batch, deaths[id(actor)])
                    busy[id(actor)] += 1
            if not running and exhausted and not queue:
                return fold, retried
            if not running and not starting:
                raise SweepError(f"no worker is left to run the sweep (each died more than retries={retries} times)")
            done, _ = ray.wait(list(running) + list(starting), num_returns=1)
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ActorUnavailableError:
                        # Ray is still restarting it (a death already counted): ask again.
                        time.sleep(RESTART_POLL_S)
                        starting[actor.ready.remote()] = actor
                        continue
                    except RayActorError:
                        if died(actor, deaths[id(actor)]):
                            starting[actor.ready.remote()] = actor  # Ray restarts it
                        continue
                    ready.append(actor)
                    continue
                actor, batch, deaths_when_sent = running.pop(ref)
                busy[id(actor)] -= 1
                try:
                    part = ray.get(ref)
                except RayTaskError as error:
                    # The user's own exception (its type and notes kept), chained to
                    # Ray's, whose text holds the worker's traceback.
                    cause = error.cause if isinstance(error.cause, BaseException) else error
                    raise note_batch(cause, batch, where) from error
                except ActorUnavailableError:
                    # Sent while Ray was restarting that actor: not the batch's doing,
                    # and no new death. Run it again; use the actor once it answers.
                    retried.append(batch.index)
                    queue.append(batch)
                    if actor in ready:
                        ready.remove(actor)
                        starting[actor.ready.remote()] = actor
                    continue
                except RayActorError as error:
                    died(actor, deaths_when_sent)
                    attempts[batch.index] += 1
                    if attempts[batch.index] > retries:
                        raise SweepError(
                            f"batch {batch.index} (examples {batch.start} to {batch.start + batch.size - 1}): "
                            f"its worker died {attempts[batch.index]} times; last: {error}",
                            batch.index,
                        ) from error
                    retried.append(batch.index)
                    queue.append(batch)
                    continue
                fold.add(batch.index, part, batch.size)
                bar.update(1)
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
