"""``Loader`` and the drop-in ``IterableDataset``: the public face of the data path.

Both take the same arguments and yield whole batches: ``{"__key__": [B keys], field: tensor or
list, ...}``. ``Loader`` runs its stages in background threads of the calling process and keeps
the resume cursor itself; ``IterableDataset`` runs inside ``torch.utils.data.DataLoader``
workers (``batch_size=None``), each worker producing every ``num_workers``-th batch of its rank.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
import torch.utils.data

from mmload.config import (
    AudioConfig,
    ErrorPolicy,
    FeatureJoin,
    ImageConfig,
    RemoteConfig,
    ShuffleConfig,
    TextConfig,
    VideoConfig,
)
from mmload.decode.dali import import_in_background
from mmload.device import parse_device
from mmload.distributed.integrations import refuse_resharding
from mmload.distributed.world import resolve_world
from mmload.errors import BadEntry, ConfigError
from mmload.pipeline import (
    LoaderOptions,
    Pipeline,
    default_partitions,
    default_threads,
    iter_epoch,
    validate_fields,
)
from mmload.plan import LoaderState, Schedule
from mmload.sources import Dataset
from mmload.stats import EpochStats, Stats
from mmload.workers import WorkerPool

__all__ = ["IterableDataset", "Loader"]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


class WorkerBackend(Protocol):
    """Where a Loader's CPU stages run when not in local processes (``workers=``): an object
    whose ``pool(pipe, threads=, ahead=)`` returns a pool with ``epoch(epoch, schedule, world,
    stats)`` (an upstream of batches in plan order) and ``close()``, as ``WorkerPool`` has
    (e.g. :class:`mmload.distributed.ray.RayWorkers`)."""

    def pool(self, pipe: Any, *, threads: int | None, ahead: bool) -> Any: ...


class _Base:
    """Construction and resume state shared by Loader and IterableDataset."""

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        shuffle: bool | ShuffleConfig = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        fields: Sequence[str] | None = None,
        image: ImageConfig | None = None,
        audio: AudioConfig | None = None,
        video: VideoConfig | None = None,
        text: TextConfig | None = None,
        features: FeatureJoin | None = None,
        image_fields: Sequence[str] | None = None,
        key_column: str | None = "__key__",
        on_error: str = "raise",
        max_bad_samples: int | float = 0,
        threads: int | None = None,
        prefetch: int = 3,
        cache_dir: str | os.PathLike[str] | None = None,
        index_cache: bool = True,
        allow_pipe: bool = False,
        epoch: int = 0,
        partitions: int | None = None,
        remote: RemoteConfig | None = None,
        ragged: str = "jagged",
    ) -> None:
        if isinstance(shuffle, bool):
            shuffle_cfg = ShuffleConfig() if shuffle else None
        elif isinstance(shuffle, ShuffleConfig):
            shuffle_cfg = shuffle
        else:
            raise ConfigError(f"shuffle={shuffle!r}: must be a bool or ShuffleConfig")
        policy = ErrorPolicy(on_error, max_bad_samples)  # type: ignore[arg-type]
        # Rank and world size: given, or detected again at each iter() (a loader is often built
        # before the process group exists: Lightning, Accelerate).
        self._world_given = rank is not None or world_size is not None
        self.world = resolve_world(rank, world_size)
        self._partitions_fixed = partitions is not None
        self.opts = LoaderOptions(
            batch_size=batch_size,
            device=parse_device(device),
            shuffle=shuffle_cfg,
            seed=seed,
            drop_last=bool(drop_last),
            fields=validate_fields(fields),
            image_fields=frozenset(image_fields) if image_fields is not None else None,
            image=image if image is not None else ImageConfig(),
            audio=audio,
            video=video,
            text=text,
            features=features,
            key_column=key_column,
            policy=policy,
            threads=threads if threads is not None else default_threads(),
            prefetch=prefetch,
            partitions=partitions,
            ragged=ragged,
        )
        self._threads_given = threads is not None
        # Decoded Parquet/Arrow chunks kept per process: a shuffle group's worth (and a margin).
        inter = shuffle_cfg.interleave if shuffle_cfg is not None else 4
        ds = Dataset.open(
            source,
            cache_chunks=max(8, 2 * inter) if inter else 64,
            key_column=key_column,
            skip_bad=policy.on_error == "skip",
            cache_dir=cache_dir,
            index_cache=index_cache,
            allow_pipe=allow_pipe,
            remote=remote,
        )
        self._pipe = Pipeline(ds, self.opts)
        if self.opts.image.backend != "pil" and "image" in self._pipe.fields.kinds.values():
            import_in_background()  # DALI takes ~0.5 s to import: only when images are read
        self._pipe.partitions = partitions or default_partitions(
            ds.num_shards, self.world.world_size
        )
        self._pipe.schedule(self.world.world_size, 0)  # world_size must divide partitions
        self._fresh = True  # no batch taken, no state loaded: partitions may follow the world
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch={epoch!r}: must be a non-negative int")
        self._epoch = epoch
        self._start = 0
        self._stats = Stats()
        if ds.bad:
            self._stats.add_listed(ds.bad)
        ignored = [(r.url, r.ignored) for r in ds.records if r.ignored]
        if ignored:
            log.info(
                "left out %d tar members that belong to no sample (README, .DS_Store, "
                "__meta__...) in %d shards, e.g. %s",
                sum(n for _, n in ignored),
                len(ignored),
                ignored[0][0],
            )

    # -- plan and state -----------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples in one epoch of the data set (all ranks)."""
        return self._pipe.ds.num_samples

    @property
    def epoch(self) -> int:
        return self._epoch

    def _refresh_world(self) -> None:
        """Detect rank and world size again (unless they were given): called at each
        ``iter()`` in the trainer's process, and when a DataLoader pickles the data set for its
        workers. Partitions left to their default follow the world until a batch is taken or
        a state loaded; after that the order's partitions stay (the world size must divide
        them, as on a resume)."""
        if self._world_given:
            return
        new = resolve_world(None, None)
        if new == self.world:
            return
        if self._fresh and not self._partitions_fixed:
            self._pipe.partitions = default_partitions(self._pipe.ds.num_shards, new.world_size)
        self._pipe.schedule(new.world_size, self._start)  # raises if it does not divide them
        if new != self.world:
            log.info("mmload: rank %d of %d (detected at iter())", new.rank, new.world_size)
        self.world = new

    def _schedule(self, start: int | None = None) -> Schedule:
        return self._pipe.schedule(self.world.world_size, self._start if start is None else start)

    def __len__(self) -> int:
        """Batches this rank gets in a whole epoch."""
        return self._schedule(0).num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the current epoch (e.g. after a resume) is kept."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch={epoch!r}: must be a non-negative int")
        if epoch != self._epoch:
            self._epoch = epoch
            self._start = 0

    def _state(self, consumed: int, epoch: int | None = None) -> dict[str, int]:
        epoch = self._epoch if epoch is None else epoch
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        return LoaderState(
            epoch=epoch,
            seed=self.opts.seed,
            samples_consumed=consumed,
            num_samples=self.num_samples,
            global_batch_size=self.opts.batch_size * self.world.world_size,
            shuffle=self._shuffle_id,
            partitions=self._pipe.partitions,
        ).to_dict()

    @property
    def _shuffle_id(self) -> int:
        return -1 if self.opts.shuffle is None else self.opts.shuffle.interleave

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly where ``state`` was taken; any world size works (same global order)."""
        st = LoaderState.from_dict(state)
        if st.seed != self.opts.seed:
            raise ConfigError(
                f"state_dict seed {st.seed} differs from this loader's seed {self.opts.seed}"
            )
        if st.num_samples != self.num_samples:
            raise ConfigError(
                f"state_dict was taken over {st.num_samples} samples, this data set has "
                f"{self.num_samples}: the shards changed, so the order cannot be resumed"
            )
        if st.shuffle != self._shuffle_id:
            raise ConfigError(
                f"state_dict was taken with shuffle={st.shuffle} (interleave; -1 = off), this "
                f"loader has {self._shuffle_id}: the order would differ"
            )
        if st.partitions != self._pipe.partitions and self.opts.partitions is not None:
            raise ConfigError(
                f"state_dict was taken over partitions={st.partitions}, this loader was "
                f"given partitions={self.opts.partitions}: the order would differ"
            )
        if not 0 <= st.samples_consumed <= st.num_samples:
            raise ConfigError(f"state_dict samples_consumed={st.samples_consumed} out of range")
        before = self._pipe.partitions
        self._pipe.partitions = st.partitions  # the saved order, on this world size
        try:  # this world size must divide it, and the cursor must be a multiple of it
            self._pipe.schedule(self.world.world_size, 0)
            self._pipe.schedule(self.world.world_size, st.samples_consumed)
        except ConfigError:
            self._pipe.partitions = before  # a rejected state leaves the loader as it was
            raise
        gbs = self.opts.batch_size * self.world.world_size
        if st.global_batch_size != gbs:
            log.warning(
                "resuming with global batch size %d (saved with %d): the remaining samples are "
                "exact, but batches are cut differently from the original run",
                gbs,
                st.global_batch_size,
            )
        self._epoch = st.epoch
        self._start = st.samples_consumed
        self._fresh = False

    def _stats_dict(self, stats: Stats) -> dict[str, Any]:
        sched = self._schedule()
        ds = self._pipe.ds
        return {
            **stats.snapshot(),
            "epoch": self._epoch,
            "samples_consumed": self._start,
            "num_samples": self.num_samples,
            "num_shards": ds.num_shards,
            "non_sample_members": sum(r.ignored for r in ds.records),
            "index_seconds": ds.index_seconds,
            "padded_per_epoch": self._schedule(0).padded,
            "dropped_per_epoch": self._schedule(0).dropped,
            "batches_per_epoch": self._schedule(0).num_batches,
            "remaining_batches": sched.num_batches,
            "rank": self.world.rank,
            "world_size": self.world.world_size,
            "partitions": self._pipe.partitions,
            **_cache_stats(ds.cache.stats.snapshot(), stats.counters),
        }

    def close(self) -> None:
        self._pipe.close()


class Loader(_Base):
    """Iterates batches of ``source`` on ``device``; resumable; a context manager.

    ``source``: tar/Parquet/Arrow shards as a path, brace pattern, glob, directory, fsspec URL or
    a list of these. Each batch is a dict: ``"__key__"`` (list of ``batch_size`` keys) and one
    entry per field: images ``[B, 3, H, W]`` (``image.dtype``, default float16, normalised),
    ``.cls`` ``int64 [B]``, numeric columns as tensors, variable-length lists of numbers (list
    columns, JSON-lines arrays) as one :class:`mmload.Jagged` ``(values, offsets)`` (or lists
    of arrays with ``ragged="list"``), text/json/bytes as lists.

    Iterating runs one epoch from the resume cursor; after a whole epoch the next iteration
    starts the next epoch (call ``set_epoch`` to choose). ``state_dict()`` after batch ``k``
    resumes at batch ``k + 1``, also on another world size.

    ``workers=N`` runs the CPU stages in N spawned processes (:mod:`mmload.workers`): reading
    and CPU decode with ``device="cpu"``, reading only with ``device="cuda"`` (decode, join and
    copy stay in this process, on the GPU). Batches, order, resume state, bad-sample accounting
    and statistics are those of ``workers=0``.
    """

    def __init__(self, source: Source, *, workers: int | WorkerBackend = 0, **kwargs: Any) -> None:
        if isinstance(workers, bool) or not (
            (isinstance(workers, int) and workers >= 0) or callable(getattr(workers, "pool", None))
        ):
            raise ConfigError(
                f"workers={workers!r}: must be an int >= 0 or a worker backend such as "
                "mmload.distributed.ray.RayWorkers(n)"
            )
        super().__init__(source, **kwargs)
        self._active: Iterator[Any] | None = None
        # The next epoch's chain, started ahead: (epoch, schedule, partitions, chain, its stats).
        self._ahead: tuple[int, Schedule, int, Any, EpochStats] | None = None
        self._ahead_lock = threading.Lock()
        self._workers = workers
        self._pool: Any = None  # a WorkerPool, or a backend's pool
        self._closed = False
        # Prepare the next epoch once this one is decoded (off for a StreamLoader's windows,
        # whose next epoch never comes).
        self._epochs_ahead = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise ConfigError("this Loader is closed")
        self._close_active()
        self._refresh_world()
        self._fresh = False
        gen = self._iterate()
        self._active = gen
        return gen

    def _iterate(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch
        sched = self._schedule()
        world = self.world
        run, stats = self._take_ahead(epoch, sched)
        if stats is None:
            stats = EpochStats(self._stats, self._pipe.process_budget(world))
        upstream = None
        if self._workers:
            if self._pool is None:  # started on first use, kept across epochs
                threads = self.opts.threads if self._threads_given else None
                # runs ahead as in process, below (never for a StreamLoader's window)
                local = self._epochs_ahead and not self._pipe.ds.remote.any()
                if isinstance(self._workers, int):
                    self._pool = WorkerPool(self._pipe, self._workers, threads=threads, ahead=local)
                else:  # a backend (RayWorkers): its own pool with the same interface
                    self._pool = self._workers.pool(self._pipe, threads=threads, ahead=local)
            upstream = self._pool.epoch(epoch, sched, world, stats)
        elif run is None:
            # The next epoch is prepared ahead only over local shards: over remote ones it
            # would fetch the next epoch's first shuffle group even when no next epoch comes
            # (a one-epoch reader would fetch up to twice its share).
            later = self._epochs_ahead and not self._pipe.ds.remote.any()
            ahead = _prepare_later(self, epoch + 1) if later else None
            run = self._pipe.run(epoch, sched, world, stats, on_decoded=ahead)
        if sched.num_batches == 0:
            self._epoch, self._start = epoch + 1, 0
            self._count_tail(sched)
        for k, batch in iter_epoch(self._pipe, epoch, sched, world, stats, upstream, run):
            if k + 1 >= sched.num_batches:
                # Taking the last batch completes the epoch, whether or not the generator is
                # ever exhausted (a loop of exactly len() steps, as Lightning runs, never is).
                self._epoch, self._start = epoch + 1, 0
                self._count_tail(sched)
            else:
                self._start = sched.consumed_after(k + 1)
            yield batch

    def _count_tail(self, sched: Schedule) -> None:
        """Padding and dropped samples, counted when the epoch's last batch (the padded one;
        the dropped tail follows it) is taken: a run stopped before it, and resumed, counts
        them once, in the run that gets there."""
        self._stats.add("samples_padded", sched.padded)
        self._stats.add("samples_dropped", sched.dropped)

    def _prepare(self, epoch: int) -> None:
        """Build and start ``epoch``'s stage chain from its start, ahead of time: called by the
        decode thread once the current epoch is decoded, so the next epoch's first batches are
        ready when the trainer gets there (no stall at the boundary). Used when the next
        iteration asks for exactly that epoch from its start; closed otherwise."""
        with self._ahead_lock:
            if self._closed or self._ahead is not None:
                return
            world = self.world
            sched = self._pipe.schedule(world.world_size, 0)
            stats = EpochStats(self._stats, self._pipe.process_budget(world), held=True)
            run = self._pipe.run(
                epoch, sched, world, stats, on_decoded=_prepare_later(self, epoch + 1)
            )
            run.start()
            self._ahead = (epoch, sched, self._pipe.partitions, run, stats)

    def _take_ahead(self, epoch: int, sched: Schedule) -> tuple[Any, EpochStats | None]:
        """The chain prepared ahead for (``epoch``, ``sched``), else (None, None) (a chain
        prepared for anything else is closed)."""
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None, None
        if ahead[:3] == (epoch, sched, self._pipe.partitions):
            ahead[4].adopt()
            return ahead[3], ahead[4]
        ahead[3].close()
        return None, None

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None

    def state_dict(self) -> dict[str, int]:
        """The resume cursor after the batches yielded so far: a few ints (JSON-safe)."""
        return self._state(self._start)

    def stats(self) -> dict[str, Any]:
        """Counters, timings, padded/dropped samples and the bad samples (key, shard, reason)."""
        return self._stats_dict(self._stats)

    def close(self) -> None:
        if self._closed:
            return
        with self._ahead_lock:
            self._closed = True
            ahead, self._ahead = self._ahead, None
        self._close_active()
        if ahead is not None:
            ahead[3].close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        super().close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        try:
            self.close()
        except Exception:
            # At interpreter exit the modules close() uses may already be torn down (``os``
            # is None); the processes and segments have exit handlers of their own then.
            if not sys.is_finalizing():
                raise


class IterableDataset(_Base, torch.utils.data.IterableDataset):
    """Drop-in ``torch.utils.data.IterableDataset`` yielding whole batches.

    Use ``DataLoader(ds, batch_size=None, num_workers=N)``: worker ``w`` produces the rank's
    batches ``w, w + N, ...``, which DataLoader returns in round-robin order, so the batch
    sequence is the same for any ``N`` and no sample is duplicated or missing. Checkpoint with
    ``state_dict(batches_consumed)`` (counted from where the current iteration began).
    ``stats()`` merges the statistics that workers spool to disk. ``device="cuda"`` works with
    ``num_workers=0`` only (CUDA cannot be used in forked workers).

    Epochs: each ``iter()`` runs epoch ``epoch`` from the resume cursor. With ``num_workers=0``
    the data set advances itself as ``Loader`` does: taking an epoch's last batch completes it
    (the next ``iter()`` is the next epoch), and a new ``iter()`` in the middle of an epoch
    resumes after the last batch taken. DataLoader worker processes run on copies that cannot
    report back: call ``set_epoch(e)`` before each epoch (Lightning does), or every epoch
    repeats the first one's order (a worker warns when it starts an epoch it already ran).
    ``set_epoch`` and ``load_state_dict`` also reach persistent workers
    (``persistent_workers=True``): they take the choice at their next iteration.
    """

    def __init__(self, source: Source, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self._spool = tempfile.mkdtemp(prefix="mmload-stats-")
        # Removed when this object is collected, by the process that made it (never by a forked
        # DataLoader worker that inherited a copy).
        self._finalizer = weakref.finalize(self, _remove_spool, self._spool, os.getpid())
        # The in-process iteration (num_workers=0), and where the current iteration began
        # (epoch, cursor): what state_dict(batches_consumed) counts from.
        self._active: Iterator[dict[str, Any]] | None = None
        self._began = (self._epoch, self._start)
        # Bumped by set_epoch/load_state_dict: a worker that starts an (epoch, generation) it
        # already started knows the trainer iterated again without choosing the epoch.
        self._generation = 0
        # Bumped only by this process's set_epoch/load_state_dict, which also write the choice
        # to the spool (choice.json): persistent DataLoader workers, whose copies were made
        # before, adopt a newer choice when they start an iteration.
        self._choice_seq = 0
        # In a DataLoader worker (the Stateful protocol): where this worker's iteration began
        # (epoch, cursor) and how many of its batches it has produced since; a loaded worker
        # state continues them at the next iteration.
        self._wbegan: tuple[int, int] | None = None
        self._wdone = 0
        self._wresume = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._chose_epoch()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state``: a plain cursor (``state_dict(...)`` in this process, a
        Loader's) or, inside a DataLoader worker, that worker's own state (what
        ``torchdata``'s ``StatefulDataLoader`` saves per worker and gives back). Call it before
        ``iter()``."""
        if _WORKER_KEYS & set(state):
            self._load_worker_state(state)
            return
        super().load_state_dict(state)
        self._chose_epoch()

    def _load_worker_state(self, state: Mapping[str, Any]) -> None:
        info = torch.utils.data.get_worker_info()
        n, w = int(state.get("num_workers", -1)), int(state.get("worker", -1))
        if info is None or (n, w) != (info.num_workers, info.id):
            raise ConfigError(
                f"a DataLoader worker's state (worker {w} of {n}) can only be loaded by that "
                "worker: resume through the same StatefulDataLoader(num_workers=...), or turn "
                "the saved workers' states into one cursor with IterableDataset.cursor()"
            )
        plain = {k: v for k, v in state.items() if k not in _WORKER_KEYS}
        super().load_state_dict(plain)
        began, done = (self._epoch, self._start), int(state["worker_batches"])
        # This worker's next batch is its share's ``done``-th: the iteration that began at
        # ``began`` with ``done * n`` global batches behind it (a multiple of n: the shares
        # stay the same).
        sched = self._schedule(self._start)
        if done * n >= sched.num_batches:  # the epoch was taken whole: the next one begins
            self._epoch, self._start = self._epoch + 1, 0
            self._wbegan, self._wdone, self._wresume = None, 0, False
        else:
            self._start = sched.consumed_after(done * n)
            self._wbegan, self._wdone, self._wresume = began, done, True
        self._chose_epoch()

    def cursor(self, worker_states: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """One plain cursor from every worker's state of one snapshot (as ``StatefulDataLoader``
        holds them: ``state["_snapshot"]["_worker_snapshots"]["worker_<i>"]["dataset_state"]``):
        the batches the workers produced and the trainer took form a prefix of the plan, so
        their sum says where the whole iteration stands. Loads into any ``num_workers``, a
        ``Loader``, or an ``IterableDataset`` in the main process."""
        if not worker_states:
            raise ConfigError("cursor(): no worker states")
        firsts = {
            tuple((k, v) for k, v in sorted(s.items()) if k not in _WORKER_KEYS)
            for s in worker_states
        }
        if len(firsts) != 1:
            raise ConfigError("cursor(): the workers' states belong to different iterations")
        n = {int(s["num_workers"]) for s in worker_states}
        if n != {len(worker_states)}:
            raise ConfigError(f"cursor(): {len(worker_states)} states for num_workers={n}")
        base = LoaderState.from_dict(dict(next(iter(firsts))))
        total = sum(int(s["worker_batches"]) for s in worker_states)
        sched = self._schedule(base.samples_consumed)
        if total > sched.num_batches:
            raise ConfigError(f"cursor(): {total} batches taken of {sched.num_batches}")
        return self._state(sched.consumed_after(total), base.epoch)

    def _chose_epoch(self) -> None:
        self._began = (self._epoch, self._start)
        self._generation += 1
        if torch.utils.data.get_worker_info() is None and os.path.isdir(self._spool):
            self._choice_seq += 1
            choice = {
                "seq": self._choice_seq,
                "epoch": self._epoch,
                "start": self._start,
                "generation": self._generation,
            }
            path = os.path.join(self._spool, "choice.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(choice, f)
            os.replace(path + ".tmp", path)

    def _adopt_choice(self) -> None:
        """In a DataLoader worker: take the epoch and cursor the trainer chose (set_epoch,
        load_state_dict) after this worker's copy was made (a persistent worker)."""
        try:
            with open(os.path.join(self._spool, "choice.json"), encoding="utf-8") as f:
                choice = json.load(f)
        except FileNotFoundError:
            return
        if int(choice["seq"]) > self._choice_seq:
            self._choice_seq = int(choice["seq"])
            self._epoch, self._start = int(choice["epoch"]), int(choice["start"])
            self._generation = int(choice["generation"])
            self._wbegan, self._wdone, self._wresume = None, 0, False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        refuse_resharding("mmload.IterableDataset")
        if torch.utils.data.get_worker_info() is None:
            self._refresh_world()
            self._fresh = False
            if self._active is not None:  # a new iteration replaces an unfinished one
                self._active.close()  # type: ignore[attr-defined]
            self._began = (self._epoch, self._start)
            self._active = self._iterate()
            return self._active
        return self._iterate()

    def _iterate(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        world = self.world if info is None else self.world.with_worker(info.id, info.num_workers)
        if info is not None and self.opts.features is not None:
            raise ConfigError(
                "IterableDataset(features=...) in DataLoader worker processes would join against "
                "a frozen copy of the FeatureTable, not the live one: use mmload.Loader, or "
                "num_workers=0"
            )
        if info is not None and self.opts.device.type == "cuda":
            raise ConfigError(
                "IterableDataset(device='cuda') cannot run in DataLoader worker processes; use "
                "num_workers=0, or mmload.Loader, or device='cpu' with pin_memory=True"
            )
        if info is not None and not self._threads_given:
            self._pipe.opts = replace(self.opts, threads=default_threads(info.num_workers))
        if info is not None:
            self._adopt_choice()
        stats = self._stats if info is None else self._worker_stats()
        stats.start_epoch(self._pipe.process_budget(world))
        epoch = self._epoch
        sched = self._schedule()
        if info is not None:
            self._note_start(info.id)
            if not self._wresume:  # a fresh iteration of this worker's share
                self._wbegan, self._wdone = (epoch, self._start), 0
            self._wresume = False
        elif sched.num_batches == 0:
            self._epoch, self._start = epoch + 1, 0
        spooled_bad = -1
        try:
            for i, (k, batch) in enumerate(iter_epoch(self._pipe, epoch, sched, world, stats)):
                bad = stats.counters["bad_samples"]
                if info is not None and (i % 50 == 0 or bad != spooled_bad):
                    self._spool_write(stats, info.id)
                    spooled_bad = bad
                if info is None:  # the cursor moves with the batches taken (as in Loader)
                    if k + 1 >= sched.num_batches:
                        self._epoch, self._start = epoch + 1, 0
                    else:
                        self._start = sched.consumed_after(k + 1)
                else:
                    self._wdone += 1  # counted before the fetcher snapshots the state
                yield batch
        finally:
            if info is not None:
                self._spool_write(stats, info.id)

    def _worker_stats(self) -> Stats:
        # One Stats per worker process, kept across epochs when workers are persistent.
        mine = getattr(self, "_wstats", None)
        if mine is None or mine[0] != os.getpid():
            mine = (os.getpid(), Stats())
            self._wstats = mine
        return mine[1]

    def _spool_write(self, stats: Stats, worker: int) -> None:
        path = os.path.join(self._spool, f"worker-{worker}-{os.getpid()}.json")
        snap = stats.snapshot()
        counters = {k: snap[k] for k in stats.counters}
        counters.update(self._pipe.ds.cache.stats.snapshot())  # this worker's fetches
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"counters": counters, "bad": snap["bad"]}, f)
        os.replace(tmp, path)

    def _note_start(self, worker: int) -> None:
        """In a DataLoader worker: record that this worker starts (epoch, cursor, generation);
        warn if it did before (the trainer iterates again without set_epoch/load_state_dict,
        so the same batches come again)."""
        mark = os.path.join(
            self._spool, f"started-{self._epoch}-{self._start}-{self._generation}-w{worker}"
        )
        if os.path.exists(mark):
            log.warning(
                "mmload.IterableDataset: epoch %d is iterated again from the same point, in "
                "DataLoader worker %d: worker processes cannot advance the epoch, so call "
                "set_epoch(epoch) before each epoch (or load_state_dict to resume)",
                self._epoch,
                worker,
            )
        else:
            with open(mark, "w", encoding="utf-8"):
                pass

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, int]:
        """The resume cursor (ints only: safe under ``torch.load(weights_only=True)``).

        Without an argument (the Stateful protocol, as ``StatefulDataLoader``, Lightning and
        Accelerate call it): in this process, the cursor after the batches taken so far; inside
        a DataLoader worker, that worker's own state (where its iteration began, and how many
        of its batches it produced), which the same worker's ``load_state_dict`` resumes.
        ``batches_consumed``: the cursor after that many batches of the current iteration
        (counted from where it began), for trainers that count batches themselves."""
        if batches_consumed is None:
            info = torch.utils.data.get_worker_info()
            if info is None:
                return self._state(self._start)
            epoch, start = self._wbegan if self._wbegan is not None else (self._epoch, self._start)
            return {
                **self._state(start, epoch),
                "worker": info.id,
                "num_workers": info.num_workers,
                "worker_batches": self._wdone,
            }
        epoch, start = self._began
        sched = self._schedule(start)
        if not 0 <= batches_consumed <= sched.num_batches:
            raise ConfigError(
                f"batches_consumed={batches_consumed}: "
                f"this iteration has {sched.num_batches} batches"
            )
        return self._state(sched.consumed_after(batches_consumed), epoch)

    def stats(self) -> dict[str, Any]:
        """In-process statistics merged with what every worker process spooled."""
        merged = Stats()
        merged.counters.update(self._stats.counters)
        merged.bad.extend(self._stats.bad)
        for name in sorted(os.listdir(self._spool)) if os.path.isdir(self._spool) else []:
            if not name.endswith(".json"):
                continue
            with open(os.path.join(self._spool, name), encoding="utf-8") as f:
                d = json.load(f)
            for k, v in d["counters"].items():
                if k == "cache_peak_bytes":  # the node's cache: the largest any worker saw
                    merged.counters[k] = max(merged.counters.get(k, 0), v)
                else:
                    merged.counters[k] = merged.counters.get(k, 0) + v
            merged.bad.extend(BadEntry(**b) for b in d["bad"])
        return self._stats_dict(merged)

    def close(self) -> None:
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None
        super().close()
        self._finalizer()

    def __getstate__(self) -> dict[str, Any]:
        if torch.utils.data.get_worker_info() is None:
            # A DataLoader pickles the data set for its workers when iteration starts: the
            # process group may exist by now even if it did not at construction.
            self._refresh_world()
        state = self.__dict__.copy()
        state.pop("_finalizer", None)  # a worker's copy must not remove the spool
        state["_active"] = None  # the parent's own iteration stays with the parent
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._finalizer = weakref.finalize(self, _remove_spool, self._spool, -1)


_WORKER_KEYS = frozenset({"worker", "num_workers", "worker_batches"})


def _prepare_later(loader: Loader, epoch: int) -> Any:
    """The decode thread's callback that prepares ``epoch`` ahead, holding the loader weakly:
    a running thread must not keep a dropped Loader alive (nor its threads running)."""
    ref = weakref.ref(loader)

    def prepare() -> None:
        ld = ref()
        if ld is not None:
            ld._prepare(epoch)

    return prepare


def _cache_stats(own: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
    """This process's cache counters plus those DataLoader workers spooled."""
    out = dict(own)
    for k, v in merged.items():
        if k in out:
            out[k] = max(out[k], v) if k == "cache_peak_bytes" else out[k] + v
    return out


def _remove_spool(path: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid or not os.path.isdir(path):
        return
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
