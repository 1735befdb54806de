"""CPU stages in worker processes, GPU stages in the main process.

``Loader(..., workers=N)`` starts N processes (``spawn``: never a fork of a process that may hold
DALI or CUDA state), each a copy of the loader's :class:`~mmload.pipeline.Pipeline` on the CPU.
Worker ``w`` produces the rank's batches ``w, w + N, ...`` of the epoch it is told to run, in
order, and the main process takes batch ``k`` from worker ``k mod N``: the batch sequence is
the plan's, for any N. What a worker does depends on the device:

* ``device="cpu"``: read and decode (images, audio, video, text, values): whole batches;
  the main process only joins features.
* ``device="cuda"``: read only; the main process decodes (DALI ``mixed``, NVDEC, the Numba
  kernels), joins on the device and copies, as with ``workers=0``.

Tensors travel through shared memory (``torch.multiprocessing``: the worker's tensor storage
moves to a shared segment and only its handle is pickled); so do a read batch's media (gathered
into one segment per batch), and the rest (lists, strings) is pickled. Each
worker has a bounded result queue (``prefetch`` batches), so memory stays bounded.

Accounting is the main process's: a worker records what it counts (timings, replaced
samples, bad samples) with each batch, and the main process replays it when it takes that
batch, so the bad-sample budget is checked against the same running total, at the same batch,
as with ``workers=0``; a worker's error is raised when its batch is due.

Shutdown: ``close()`` asks the workers to stop, waits briefly, then terminates them; an
abandoned epoch is cancelled (a worker checks for it between batches and while its queue is
full). A worker that dies (killed, out of memory) is noticed within a poll interval and raised as
a ``WorkerError`` naming it, its exit code and the batch that was due, never a hang. A worker
whose parent died exits on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.multiprocessing as tmp

from mmload.errors import BadEntry, DecodeError, MmloadError, WorkerError
from mmload.jagged import Jagged
from mmload.pipeline import Pipeline, default_threads
from mmload.plan import Schedule, World
from mmload.stats import Stats

__all__ = ["WorkerError", "WorkerPool"]

log = logging.getLogger(__name__)

_POLL = 0.2  # seconds between liveness checks while waiting on a queue


class _Recorder(Stats):
    """What a worker's stages count, recorded (not summed) so the main process can replay it
    with the batch it belongs to; never raises for the budget (the main process does)."""

    def __init__(self) -> None:
        super().__init__(budget=0)
        self.events: list[tuple[Any, ...]] = []

    def add(self, name: str, value: int = 1) -> None:
        self.events.append(("add", name, value))

    def time(self, name: str, seconds: float) -> None:
        self.events.append(("time", name, seconds))

    def add_bad(self, entries: Any, errors: Any = ()) -> None:
        entries = list(entries)
        if entries:
            decode = any(isinstance(e, DecodeError) for e in errors)
            self.events.append(("bad", entries, decode))

    def cache(self, now: dict[str, int | float], before: dict[str, int | float]) -> None:
        """The worker's remote-cache counters since ``before`` (its peak as a peak)."""
        for name, value in now.items():
            if name == "cache_peak_bytes":
                if value > before.get(name, 0):
                    self.events.append(("peak", name, value))
            elif value != before.get(name, 0):
                self.events.append(("add", name, value - before.get(name, 0)))

    def drain(self) -> list[tuple[Any, ...]]:
        out, self.events = self.events, []
        return out


def replay(stats: Stats, events: list[tuple[Any, ...]]) -> None:
    """Apply a worker's recorded events to the main process's ``stats`` (may raise for the
    bad-sample budget, exactly where ``workers=0`` would)."""
    for ev in events:
        if ev[0] == "add":
            stats.add(ev[1], ev[2])
        elif ev[0] == "peak":
            stats.peak(ev[1], ev[2])
        elif ev[0] == "time":
            stats.time(ev[1], ev[2])
        else:
            entries: list[BadEntry] = ev[1]
            marker = [DecodeError("", shard="")] if ev[2] else []
            stats.add_bad(entries, marker)


class _Cancelled(Exception):
    """The epoch run being read was cancelled (abandoned, or superseded by a newer run)."""


class _Failed:
    """A worker's exception, picklable: the exception itself when it pickles, else its text."""

    def __init__(self, exc: BaseException, worker: int) -> None:
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.worker = worker
        try:
            pickle.dumps(exc)
            self.exc: BaseException | None = exc
        except Exception:  # noqa: BLE001 - any pickling failure: keep the text
            self.exc = None
        self.text = f"{type(exc).__name__}: {exc}"

    def rebuild(self) -> BaseException:
        if isinstance(self.exc, MmloadError):
            return self.exc
        return WorkerError(
            f"worker {self.worker} failed: {self.text}\n--- worker traceback ---\n{self.tb}"
        )


def _worker_main(
    payload: bytes,
    worker: int,
    num_workers: int,
    decoded: bool,
    commands: Any,
    results: Any,
    cancelled: Any,
    parent: int,
) -> None:
    """A worker process: runs the epochs it is told to, until told to stop or orphaned."""
    torch.set_num_threads(1)
    pipe: Pipeline = pickle.loads(payload)
    try:
        while True:
            try:
                cmd = commands.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the parent died without stopping us
                continue
            if cmd[0] == "stop":
                return
            _, gen, epoch, schedule, world, partitions = cmd
            if cancelled.value >= gen:
                continue  # abandoned before it started
            pipe.partitions = partitions
            job = _Job(gen, worker, results, cancelled, parent)
            job.run(pipe, epoch, schedule, world.with_worker(worker, num_workers), decoded)
    finally:
        pipe.close()


class _Job:
    """One epoch run inside a worker."""

    def __init__(self, gen: int, worker: int, results: Any, cancelled: Any, parent: int) -> None:
        self.gen = gen
        self.worker = worker
        self.results = results
        self.cancelled = cancelled
        self.parent = parent

    def run(
        self, pipe: Pipeline, epoch: int, schedule: Schedule, world: World, decoded: bool
    ) -> None:
        stats = _Recorder()
        stream: Any = None
        try:
            # One thread, batch after batch: what is recorded between two puts belongs to the
            # batch put (the main process replays it with that batch). N workers overlap.
            decoder = pipe.batch_decoder(epoch, world, stats) if decoded else None
            stream = pipe.reads(epoch, schedule, world, stats)
            cache = pipe.ds.cache.stats
            before = cache.snapshot()
            for k, raw in stream:
                out: Any
                if decoder is not None:
                    out = _shared(decoder.finish(decoder.prepare(raw, epoch, submit=False)))
                else:
                    out = _pack_raw(raw)
                now = cache.snapshot()
                stats.cache(now, before)
                before = now
                if not self.put((self.gen, k, out, stats.drain())):
                    return
            self.put((self.gen, None, None, stats.drain()))
        except BaseException as e:  # noqa: BLE001 - shipped to the main process, raised there
            self.put((self.gen, -1, _Failed(e, self.worker), stats.drain()))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def put(self, item: Any) -> bool:
        """Put ``item`` unless this run was cancelled or the parent is gone."""
        while self.cancelled.value < self.gen:
            try:
                self.results.put(item, timeout=_POLL)
                return True
            except queue.Full:
                if os.getppid() != self.parent:
                    return False
        return False


def _shared(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with every CPU tensor in shared memory (one copy, made here, so the queue
    sends only a handle; as DataLoader's collate does)."""
    return {
        name: v.map(_shared_tensor) if isinstance(v, Jagged) else _shared_tensor(v)
        for name, v in batch.items()
    }


def _shared_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.is_shared():
        storage = torch.UntypedStorage._new_shared(max(v.numel() * v.element_size(), 1))
        shared = torch.empty(0, dtype=v.dtype).set_(storage, 0, v.shape, _strides(v.shape))
        shared.copy_(v)
        return shared
    return v


def _pack_raw(raw: list[Any]) -> tuple[torch.Tensor, list[Any], list[tuple[int, str, int, int]]]:
    """A batch as read, for the queue: every bytes-like member (the reader's views of its batch
    buffer, Parquet's ``bytes``) copied into one shared-memory segment, so only its handle and
    ``(sample, field, start, stop)`` spans are pickled, not the media."""
    spans: list[tuple[int, str, int, int]] = []
    total = 0
    for j, smp in enumerate(raw):
        if isinstance(smp, dict):
            for name, v in smp.items():
                if isinstance(v, (memoryview, bytes)):
                    spans.append((j, name, total, total + len(v)))
                    total += len(v)
    storage = torch.UntypedStorage._new_shared(max(total, 1))
    buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (total,), (1,))
    dst = buf.numpy().data
    samples = [dict(s) if isinstance(s, dict) else s for s in raw]
    for j, name, a, b in spans:
        dst[a:b] = samples[j][name]
        samples[j][name] = None
    dst.release()
    return buf, samples, spans


def _unpack_raw(
    packed: tuple[torch.Tensor, list[Any], list[tuple[int, str, int, int]]],
) -> list[Any]:
    """The batch as read, its members read-only views of the shared segment (which lives as
    long as they do)."""
    buf, samples, spans = packed
    view = buf.numpy().data.toreadonly()
    for j, name, a, b in spans:
        samples[j][name] = view[a:b]
    return samples


def _strides(shape: torch.Size) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


class WorkerPool:
    """N persistent worker processes of one loader; ``epoch()`` streams one epoch's batches."""

    def __init__(
        self,
        pipe: Pipeline,
        num_workers: int,
        *,
        threads: int | None = None,
        decode: bool | None = None,
        ahead: bool = True,
    ) -> None:
        """``decode``: whether workers decode (default: unless the device is CUDA); ``ahead``:
        whether each epoch also sends the next one ahead."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r}: must be an int >= 1")
        self.num_workers = num_workers
        self.decoded = pipe.opts.device.type != "cuda" if decode is None else decode
        self.ahead = ahead
        self._pipe = pipe  # the loader's own: its partitions may change on a resume
        threads = threads if threads is not None else default_threads(num_workers)
        payload = pickle.dumps(_worker_copy(pipe, threads))
        ctx = tmp.get_context("spawn")
        # Epoch runs up to this generation are abandoned.
        # No process-shared lock: a worker stopped or killed while holding it would block the
        # parent's cancel forever. One writer (this process, under a thread lock); workers
        # only compare it, and an aligned 64-bit store is atomic.
        self._cancelled: Any = ctx.Value("q", 0, lock=False)
        self._cancel_lock = threading.Lock()
        self._commands = [ctx.Queue() for _ in range(num_workers)]
        self._results = [ctx.Queue(maxsize=max(1, pipe.opts.prefetch)) for _ in range(num_workers)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    payload,
                    w,
                    num_workers,
                    self.decoded,
                    self._commands[w],
                    self._results[w],
                    self._cancelled,
                    os.getpid(),
                ),
                name=f"mmload-worker-{w}",
                daemon=True,
            )
            for w in range(num_workers)
        ]
        for p in self._procs:
            p.start()
        # Only workers write results. Without the parent's copy of each writer, a worker killed
        # half-way through a message leaves the reader at EOF (an error) instead of blocked on
        # the rest of the message forever.
        for q in self._results:
            q._writer.close()  # type: ignore[attr-defined]  # multiprocessing's own pipe end
        self._locks = [threading.Lock() for _ in range(num_workers)]
        self._stash: list[tuple[Any, ...] | None] = [None] * num_workers
        self._gen = 0
        # The epoch run sent ahead: (generation, epoch, schedule, world).
        self._next: tuple[int, int, Schedule, World, int] | None = None
        self._closed = False

    def epoch(self, epoch: int, schedule: Schedule, world: World, stats: Stats) -> _Stream:
        """The batches ``(k, batch or raw)`` of ``world``'s epoch, in plan order.

        The workers are also told to go on with the next epoch from its start as soon as they
        finish this one (a worker runs its commands in order), so the first batches of the
        next epoch are ready when it begins: no stall at the epoch boundary. When the next
        request is not that epoch (a resume, ``set_epoch``), the speculative run is cancelled.
        """
        if self._closed:
            raise WorkerError("the worker pool is closed")
        want = (epoch, schedule, world, self.partitions())
        if self._next is not None and self._next[1:] == want:
            gen = self._next[0]  # already running ahead
        else:
            if self._next is not None:
                self._cancel(self._next[0])
            gen = self._send(epoch, schedule, world)
        if self.ahead:
            following = replace(schedule, start=0)
            gen_next = self._send(epoch + 1, following, world)
            self._next = (gen_next, epoch + 1, following, world, self.partitions())
        else:
            self._next = None
        return _Stream(self, gen, schedule, stats)

    def _send(self, epoch: int, schedule: Schedule, world: World) -> int:
        # The order's partitions travel with each command: a resume may change them after the
        # workers were started with a copy of the pipeline.
        self._gen += 1
        for q in self._commands:
            q.put(("epoch", self._gen, epoch, schedule, world, self.partitions()))
        return self._gen

    def partitions(self) -> int:
        return int(self._pipe.partitions)

    def _cancel(self, gen: int) -> None:
        if self._cancelled is None:
            return
        with self._cancel_lock:
            self._cancelled.value = max(self._cancelled.value, gen)

    def _get(self, w: int, gen: int, due: int | None) -> tuple[Any, ...]:
        """The next result of worker ``w`` for epoch run ``gen``. Older runs' results are
        dropped; a newer run's result is kept for it (a worker runs its epochs in order, so
        ``gen`` has nothing more to come) and ``_Cancelled`` raised, as when ``gen`` was
        cancelled: a reader left behind by an abandoned run must end, not eat the next run's
        batches. Safe from several threads (one lock per worker)."""
        proc = self._procs[w]
        while True:
            with self._locks[w]:
                item = self._stash[w]
                if item is not None:
                    if item[0] == gen:
                        self._stash[w] = None
                        return item
                    if item[0] > gen:
                        raise _Cancelled
                    self._stash[w] = None  # an older run's: nobody reads it any more
                    continue
                if self._cancelled is None or self._cancelled.value >= gen:
                    raise _Cancelled
                broken = False
                try:
                    got = self._results[w].get(timeout=_POLL)
                except queue.Empty:
                    pass
                except (EOFError, OSError):
                    # The worker died mid-message: with no other writer left (the parent
                    # closed its copy), the pipe reports EOF; its exit code follows.
                    broken = True
                    proc.join(timeout=2.0)
                else:
                    self._stash[w] = tuple(got)
                    continue
            # Raised outside the except clause: the pipe's exception (and, through its frames,
            # the queue) is not kept alive as this error's context.
            if proc.exitcode is not None or broken:
                what = f"batch {due}" if due is not None else "the end of its epoch"
                raise WorkerError(
                    f"mmload worker {w} (pid {proc.pid}) exited with code {proc.exitcode} "
                    f"while {what} was due (killed, or out of memory?); the loader cannot go "
                    "on: restart from the last state_dict()"
                )

    def close(self) -> None:
        """Stop every worker (terminate those that do not stop within a few seconds)."""
        if self._closed:
            return
        self._closed = True
        self._cancel(self._gen)
        for q in self._commands:
            with contextlib.suppress(OSError, ValueError):  # a queue broken by a dead worker
                q.put(("stop",))
        deadline = time.perf_counter() + 5.0
        for p in self._procs:
            # Drain results meanwhile: a worker blocked on a full queue cannot stop.
            while p.is_alive() and time.perf_counter() < deadline:
                p.join(timeout=_POLL)
                for q in self._results:
                    _drain(q)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in (*self._commands, *self._results):
            _drain(q)
            q.close()
            q.cancel_join_thread()
        # The queues' and the flag's named semaphores are unlinked when their objects are
        # collected (spawn keeps the names until then): drop them now, not at some later GC.
        self._commands, self._results = [], []
        self._cancelled = None

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]


def _drain(q: Any) -> None:
    try:
        while True:
            q.get_nowait()
    except Exception:  # noqa: BLE001 - empty, broken by a dead worker, or interpreter shutdown
        pass


def _worker_copy(pipe: Pipeline, threads: int) -> Pipeline:
    """The pipeline a worker runs: on the CPU, without the feature table (the join stays in
    the main process, with the live table), with its share of the decode threads."""
    copy = Pipeline.__new__(Pipeline)
    copy.__dict__.update(pipe.__getstate__())
    copy.opts = replace(pipe.opts, device=torch.device("cpu"), features=None, threads=threads)
    return copy


class _Stream:
    """One epoch run of the pool, in plan order: an ``Upstream`` of ``Pipeline.run``."""

    def __init__(self, pool: WorkerPool, gen: int, schedule: Schedule, stats: Stats) -> None:
        self.pool = pool
        self.gen = gen
        self.schedule = schedule
        self.stats = stats
        self.decoded = pool.decoded
        self._done = False

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        try:
            yield from self._batches()
        except _Cancelled:
            return  # closed: whoever still reads (a stage thread left behind) just stops

    def _batches(self) -> Iterator[tuple[int, Any]]:
        pool, n = self.pool, self.pool.num_workers
        try:
            for k in range(self.schedule.num_batches):
                w = k % n
                t0 = time.perf_counter()
                _, got, item, events = pool._get(w, self.gen, k)
                self.stats.wait_on("workers", time.perf_counter() - t0)
                replay(self.stats, events)
                if isinstance(item, _Failed):
                    raise item.rebuild()
                if got != k:
                    raise WorkerError(f"worker {w} sent batch {got} where batch {k} was due")
                yield k, (item if self.decoded else _unpack_raw(item))
            for w in range(n):  # each worker's end: what it counted after its last batch
                _, _, item, events = pool._get(w, self.gen, None)
                replay(self.stats, events)
                if isinstance(item, _Failed):
                    raise item.rebuild()
            self._done = True
        finally:
            if not self._done:
                self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.pool._cancel(self.gen)
