"""mmload's CPU stages on Ray actors: ``Loader(..., workers=RayWorkers(n))``.

The only module that imports ``ray`` (``pip install "mmload[ray]"``). Each trainer process (a
torchrun rank, a Ray Train worker) keeps its own ``Loader``; ``RayWorkers(n)`` runs that rank's
read stage, and CPU decode when wanted, on ``n`` Ray actors placed anywhere in the cluster, as
``workers=n`` does on local processes: actor ``w`` produces the rank's batches ``w, w + n, ...``
of the plan, the trainer takes batch ``k`` from actor ``k mod n``, so the batch sequence,
``state_dict()``, padding and the bad-sample accounting are those of ``workers=0``.

**Why actors, not Ray Data.** Ray Data's streaming executor schedules blocks for throughput and
hands them out in whatever order they finish; its iterators have no resume cursor. mmload's
order is a pure function of the plan and its resume is exact, so the plan must decide what each
actor reads, which actors running mmload's own stages do. See ``docs/architecture.md``.

**Bytes, not pixels.** By default the actors only read (``decode=False``): encoded samples
travel to the trainer, which decodes them (on its GPU when it has one). ``decode=True`` decodes
on the actors (for CPU-bound trainers), shipping decoded tensors.

**An actor that dies** is restarted by Ray (``max_restarts``); the pool then restarts the
epoch's remaining batches on every actor from the first batch the trainer has not taken (the
plan says what it holds), so no sample is lost or repeated. Past ``max_restarts``, or if Ray
cannot restart it, the loader raises ``WorkerError``.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ray
import ray.exceptions

from mmload.errors import ConfigError, WorkerError
from mmload.pipeline import Pipeline
from mmload.plan import Schedule, World
from mmload.stats import Stats
from mmload.workers import _Failed, _Recorder, _worker_copy, replay

__all__ = ["RayWorkers", "dataset_shard", "train_world"]

log = logging.getLogger(__name__)


def train_world() -> tuple[int, int]:
    """(rank, world size) of this Ray Train worker (pass them to the Loader)."""
    from ray import train

    ctx = train.get_context()
    return int(ctx.get_world_rank()), int(ctx.get_world_size())


def dataset_shard(source: Any, **loader_kwargs: Any) -> Any:
    """This Ray Train worker's ``mmload.Loader`` over ``source``: its shard of the plan (the
    rank and world size from Ray Train's context), where Ray Data users call
    ``ray.train.get_dataset_shard``. Pass ``workers=RayWorkers(n)`` to read on Ray actors."""
    from mmload.loader import Loader

    rank, world = train_world()
    return Loader(source, rank=rank, world_size=world, **loader_kwargs)


class RayWorkers:
    """A Loader's CPU stages on ``num_workers`` Ray actors (see the module docstring).

    ``decode``: decode on the actors and ship tensors (default False: ship the encoded bytes
    and decode on the trainer, on its GPU when it has one; see ``docs/scaling.md``).
    ``num_cpus``: CPUs Ray reserves per actor. ``prefetch``: batches in flight per actor.
    ``max_restarts``: restarts of a dead actor before the loader gives up;
    ``restart_timeout_s``: how long to wait for a restarted actor (a new process that imports
    torch: over a minute on a loaded 2-core host). ``init``: keyword
    arguments for ``ray.init`` when Ray is not initialised yet; without an ``address`` (and
    without ``RAY_ADDRESS`` in the environment) a local Ray instance is started."""

    def __init__(
        self,
        num_workers: int,
        *,
        decode: bool = False,
        num_cpus: float = 1.0,
        prefetch: int = 2,
        max_restarts: int = 3,
        restart_timeout_s: float = 300.0,
        init: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"RayWorkers(num_workers={num_workers!r}): must be an int >= 1")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigError(f"RayWorkers(prefetch={prefetch!r}): must be an int >= 1")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigError(f"RayWorkers(max_restarts={max_restarts!r}): must be an int >= 0")
        self.num_workers = num_workers
        self.decode = decode
        self.num_cpus = float(num_cpus)
        self.prefetch = prefetch
        if (
            isinstance(restart_timeout_s, bool)
            or not isinstance(restart_timeout_s, (int, float))
            or not restart_timeout_s > 0
        ):
            raise ConfigError(
                f"RayWorkers(restart_timeout_s={restart_timeout_s!r}): must be a number > 0"
            )
        self.max_restarts = max_restarts
        self.restart_timeout_s = float(restart_timeout_s)
        self.init = dict(init or {})

    def __bool__(self) -> bool:
        return True

    def pool(self, pipe: Pipeline, *, threads: int | None, ahead: bool) -> RayPool:
        """The pool a Loader uses (called on its first iteration)."""
        del ahead  # the next epoch starts when asked: actors hold no queue to run ahead into
        if not ray.is_initialized():
            if "address" in self.init or os.environ.get("RAY_ADDRESS"):
                ray.init(**self.init)  # connect to the running cluster
            else:  # start a local one
                ray.init(**{"include_dashboard": False, "log_to_driver": False, **self.init})
        return RayPool(pipe, self, threads=threads)


@ray.remote
class _Actor:
    """One actor: runs its share of an epoch, a batch per ``next`` call."""

    def __init__(self, payload: bytes, worker: int, num_workers: int, decoded: bool) -> None:
        import torch

        torch.set_num_threads(1)
        self.pipe: Pipeline = pickle.loads(payload)
        self.worker, self.num_workers, self.decoded = worker, num_workers, decoded
        self.gen = -1
        self._stream: Any = None
        self._it: Iterator[tuple[int, Any]] | None = None
        self._stats = _Recorder()
        self._decoder: Any = None
        self._epoch = 0

    def pid(self) -> int:
        import os

        return os.getpid()

    def start(
        self, gen: int, epoch: int, schedule: Schedule, world: World, partitions: int
    ) -> None:
        self._close()
        self.gen, self._epoch = gen, epoch
        self.pipe.partitions = partitions
        mine = world.with_worker(self.worker, self.num_workers)
        self._stats = _Recorder()
        self._decoder = self.pipe.batch_decoder(epoch, mine, self._stats) if self.decoded else None
        self._stream = self.pipe.reads(epoch, schedule, mine, self._stats)
        self._it = iter(self._stream)

    def next(self, gen: int) -> tuple[int, int | None, Any, list[tuple[Any, ...]]]:
        """``(gen, k, batch, recorded events)``; ``k`` None at the end of the share."""
        if gen != self.gen or self._it is None:
            return gen, -2, None, []  # restarted (state lost) or superseded: the pool knows
        try:
            k, raw = next(self._it)
            if self._decoder is not None:
                out = self._decoder.finish(self._decoder.prepare(raw, self._epoch, submit=False))
            else:  # the reader's views of its batch buffer, as bytes for the network
                out = [
                    {n: bytes(v) if isinstance(v, memoryview) else v for n, v in s.items()}
                    if isinstance(s, dict)
                    else s
                    for s in raw
                ]
            return gen, k, out, self._stats.drain()
        except StopIteration:
            self._close()
            return gen, None, None, self._stats.drain()
        except BaseException as e:  # noqa: BLE001 - shipped to the trainer, raised there
            self._close()
            return gen, -1, _Failed(e, self.worker), self._stats.drain()

    def _close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._stream = self._it = None


class RayPool:
    """The actors of one Loader; ``epoch()`` streams one epoch's batches in plan order."""

    def __init__(self, pipe: Pipeline, cfg: RayWorkers, *, threads: int | None) -> None:
        self.cfg = cfg
        self.num_workers = cfg.num_workers
        self.decoded = bool(cfg.decode)
        self._pipe = pipe
        payload = pickle.dumps(_worker_copy(pipe, threads or 1))
        self._actors = [
            _Actor.options(  # type: ignore[attr-defined]
                num_cpus=cfg.num_cpus, max_restarts=cfg.max_restarts, max_task_retries=0
            ).remote(payload, w, cfg.num_workers, self.decoded)
            for w in range(cfg.num_workers)
        ]
        self._gen = 0
        self.restarts = 0
        self._closed = False

    def epoch(self, epoch: int, schedule: Schedule, world: World, stats: Stats) -> _RayStream:
        if self._closed:
            raise WorkerError("the Ray worker pool is closed")
        return _RayStream(self, epoch, schedule, world, stats)

    def _start(self, epoch: int, schedule: Schedule, world: World) -> int:
        self._gen += 1
        parts = int(self._pipe.partitions)
        ray.get([a.start.remote(self._gen, epoch, schedule, world, parts) for a in self._actors])
        return self._gen

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []


class _RayStream:
    """One epoch run on the actors: an ``Upstream`` of ``Pipeline.run``."""

    def __init__(
        self, pool: RayPool, epoch: int, schedule: Schedule, world: World, stats: Stats
    ) -> None:
        self.pool, self.epoch, self.schedule, self.world, self.stats = (
            pool,
            epoch,
            schedule,
            world,
            stats,
        )
        self.decoded = pool.decoded
        self._closed = False

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        pool, n = self.pool, self.pool.num_workers
        total = self.schedule.num_batches
        base = 0  # batch index of the current run's first batch in this epoch's schedule
        sched = self.schedule
        gen = pool._start(self.epoch, sched, self.world)
        inflight: list[deque[Any]] = [deque() for _ in range(n)]
        k = 0
        while k < total:
            if self._closed:
                return
            j = k - base  # index in the current run
            w = j % n
            try:
                self._fill(inflight, gen, w, sched.num_batches, j)
                t0 = time.perf_counter()
                g, got, item, events = ray.get(inflight[w].popleft())
                self.stats.wait_on("workers", time.perf_counter() - t0)
                if got == -2:
                    if self._closed or pool._gen != gen:
                        return  # abandoned, or superseded by a newer run: stop quietly
                    # Ray restarted the actor between two calls: it lost its run.
                    raise ray.exceptions.RayActorError()
            except ray.exceptions.RayActorError as e:
                # An actor died: restart the rest of the epoch, from batch k, on all actors.
                pool.restarts += 1
                if pool.restarts > pool.cfg.max_restarts:
                    raise WorkerError(
                        f"Ray actor {w} died while batch {k} was due, and the pool has used its "
                        f"{pool.cfg.max_restarts} restarts: {e}"
                    ) from None
                inflight = [deque() for _ in range(n)]
                sched = replace(self.schedule, start=self.schedule.consumed_after(k))
                base = k
                gen = self._restart(sched)
                continue
            if g != gen:
                continue  # a superseded run's result
            replay(self.stats, events)
            if isinstance(item, _Failed):
                raise item.rebuild()
            if got != j:
                raise WorkerError(f"Ray actor {w} sent batch {got} where batch {j} was due")
            yield k, item
            k += 1
        for w in range(n):  # each actor's end: what it counted after its last batch
            try:
                self._fill(inflight, gen, w, sched.num_batches, sched.num_batches)
                while inflight[w]:
                    g, got, item, events = ray.get(inflight[w].popleft())
                    if g == gen and got is None:
                        replay(self.stats, events)
            except ray.exceptions.RayActorError:
                # Every batch was delivered; only this actor's closing counts are lost.
                log.warning("Ray actor %d died after its last batch; its end counts are lost", w)

    def close(self) -> None:
        """The run is abandoned: a reader still in it stops at its next batch (each actor's
        stream is replaced by the next ``start``; results in flight are dropped)."""
        self._closed = True

    def _restart(self, sched: Schedule) -> int:
        wait = self.pool.cfg.restart_timeout_s
        deadline = time.monotonic() + wait
        while True:
            try:
                return self.pool._start(self.epoch, sched, self.world)
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"Ray actors did not come back within {wait:g} s "
                        "(RayWorkers(restart_timeout_s=...))"
                    ) from None
                time.sleep(0.2)

    def _fill(self, inflight: list[deque[Any]], gen: int, w: int, count: int, j: int) -> None:
        """Keep ``prefetch`` calls in flight on actor ``w``, never past its share's end (its
        batches ``w, w + n, ...`` below ``count``, then one call for its end marker)."""
        n = self.pool.num_workers
        actor = self.pool._actors[w]
        mine = len(range(w, count, n)) + 1  # its batches, and the end marker
        done = len(range(w, min(j, count), n))  # taken already
        while len(inflight[w]) < self.pool.cfg.prefetch and done + len(inflight[w]) < mine:
            inflight[w].append(actor.next.remote(gen))
