"""The data path of one process, assembled in one readable function.

``Pipeline`` holds what lives across epochs (the indexed data set, the field plan, the image
decoder); ``Pipeline.run`` builds the stage chain of one epoch for one rank/worker:

    batch numbers -> [read thread: plan -> ids -> Dataset.read] -> [decode thread: BatchDecoder,
                  feature join] -> [copy thread: host->device, when device is cuda] -> consumer

With worker processes (``mmload.workers``) the read thread is replaced by the workers' batches:
read only (``device="cuda"``: decode stays in this process, next to the GPU) or read and
decoded (CPU decode; this process then only joins and copies).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from mmload.decode import BatchDecoder, FieldDecoder, ImageField, make_image_decoder
from mmload.decode.batch import Pending
from mmload.device import DeviceCopier
from mmload.errors import ConfigError, ShardError
from mmload.options import (
    FEATURE_KEY,
    FEATURE_TS,
    LoaderOptions,
    default_partitions,
    default_threads,
    divisors,
    field_plan,
    validate_fields,
)
from mmload.plan import EpochOrder, Schedule, World
from mmload.sources import Dataset
from mmload.stages import Stage, stop_all_at_exit
from mmload.stats import Stats

# LoaderOptions and the helpers of mmload.options are re-exported: the loader, the workers and
# the benchmarks import them from here, the data path's one entry point.
__all__ = [
    "LoaderOptions",
    "Pipeline",
    "Upstream",
    "default_partitions",
    "default_threads",
    "iter_epoch",
    "remote_needs",
    "validate_fields",
]

log = logging.getLogger(__name__)


class Upstream(Protocol):
    """Batches produced outside this process's stage chain (``mmload.workers``), in order."""

    decoded: bool

    def __iter__(self) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


_LIVE: weakref.WeakSet[Pipeline] = weakref.WeakSet()  # with media decoders built
_EXIT_LOCK = threading.Lock()
_EXIT_REGISTERED = False


def _close_at_exit() -> None:
    """Before the runtime tears down: stop every stage thread, then close the media decoders
    (DALI pipelines, thread pools) of every pipeline this process built. Registered when the
    first decoders are built, so it runs before DALI's own exit hook (hooks run last-in first-
    out), which asserts that no pipeline is alive."""
    stop_all_at_exit()
    for pipe in list(_LIVE):
        if pipe._media is not None and pipe._media_pid == os.getpid():
            for dec in pipe._media.values():
                dec.close()
            pipe._media = None


def _register_exit_hook() -> None:
    global _EXIT_REGISTERED
    with _EXIT_LOCK:
        if not _EXIT_REGISTERED:
            atexit.register(_close_at_exit)
            _EXIT_REGISTERED = True


_SPARE_BATCHES = 64  # how far an all-bad first batch looks for a good sample to repeat
_FORK_LEFTOVERS: list[Any] = []  # decoders inherited by forked processes, deliberately kept


class Pipeline:
    """Per-process state shared by every epoch of a Loader or IterableDataset."""

    def __init__(self, ds: Dataset, opts: LoaderOptions) -> None:
        self.ds = ds
        self.opts = opts
        self.fields, self._extract = field_plan(ds, opts)
        self._read_fields = set(self.fields.names)
        # Handed to the user as bytes: read into bytes of their own, not into the batch buffer.
        self._bytes_fields = frozenset(
            n for n in self.fields.names if self.fields.kinds[n] == "bytes"
        )
        self._media: dict[str, FieldDecoder] | None = None
        self._media_pid = os.getpid()
        self._order: EpochOrder | None = None
        self.partitions = opts.partitions or 1  # the loader sets the default for its world
        global_budget = opts.policy.budget(ds.num_samples)
        if len(ds.bad) > global_budget:
            b = ds.bad[-1]
            raise ShardError(
                f"{len(ds.bad)} bad shards/samples found while indexing exceed "
                f"max_bad_samples={opts.policy.max_bad_samples}; last: {b.reason}",
                shard=b.shard,
                key=b.key,
            )
        self.global_budget = global_budget

    # -- plan ---------------------------------------------------------------------------------

    def order(self, epoch: int) -> EpochOrder:
        o = self._order
        if o is None or o.epoch != epoch or o.partitions != self.partitions:
            self._order = EpochOrder(
                self.ds.chunk_counts,
                seed=self.opts.seed,
                epoch=epoch,
                shuffle=self.opts.shuffle,
                partitions=self.partitions,
                # one chunk per shard (tar): the chunk permutation is the shard permutation
                chunk_shard=None
                if len(self.ds.chunk_counts) == self.ds.num_shards
                else self.ds.chunk_shard,
            )
            o = self._order
        return o

    def schedule(self, world_size: int, start: int) -> Schedule:
        if self.partitions % world_size:
            raise ConfigError(
                f"world_size={world_size} does not divide partitions={self.partitions}: a rank "
                "must own whole partitions. World sizes this order allows: "
                f"{divisors(self.partitions)}; pass partitions=P (a multiple of every world "
                "size you will resume on) when you start the run"
            )
        return Schedule(
            num_samples=self.ds.num_samples,
            batch_size=self.opts.batch_size,
            world_size=world_size,
            start=start,
            drop_last=self.opts.drop_last,
        )

    def process_budget(self, world: World) -> int:
        """This rank/worker's share of the epoch's bad-sample budget (rounded up)."""
        left = max(self.global_budget - len(self.ds.bad), 0)
        return math.ceil(left / (world.world_size * world.num_workers)) if left else 0

    # -- one epoch ----------------------------------------------------------------------------

    def _media_decoders(self) -> dict[str, FieldDecoder]:
        """One decoder per media field, built on first use, once per process: a DataLoader
        worker forked after the parent iterated must not reuse the parent's DALI pipelines."""
        if self._media is not None and self._media_pid == os.getpid():
            return self._media
        if self._media is not None:
            # Inherited through fork: a DALI pipeline's destructor waits for its worker threads,
            # which do not exist in this process. Keep the objects alive instead (never freed).
            _FORK_LEFTOVERS.append(self._media)
        self._media_pid = os.getpid()
        opts, dev = self.opts, self.opts.device
        media: dict[str, FieldDecoder] = {}
        image_backend = None
        for name in self.fields.media_fields:
            kind = self.fields.kinds[name]
            if kind == "image":
                if image_backend is None:
                    image_backend = make_image_decoder(
                        opts.image,
                        opts.batch_size,
                        device="cuda" if dev.type == "cuda" else "cpu",
                        device_id=dev.index,
                        threads=opts.threads,
                        depth=opts.prefetch,
                    )
                media[name] = ImageField(image_backend, opts.image, opts.seed)
            elif kind == "audio":
                from mmload.decode.audio import AudioDecoder

                assert opts.audio is not None
                media[name] = AudioDecoder(opts.audio, seed=opts.seed, device=dev)
            else:
                from mmload.decode.video import VideoDecoder

                assert opts.video is not None
                media[name] = VideoDecoder(
                    opts.video, opts.batch_size, seed=opts.seed, device=dev, threads=opts.threads
                )
        self._media = media
        _LIVE.add(self)
        _register_exit_hook()
        return media

    def read_batch(
        self, order: EpochOrder, schedule: Schedule, world: World, k: int, stats: Stats
    ) -> list[Any]:
        """Rank ``world.rank``'s batch ``k`` as read: a dict of bytes per sample, or its
        ``ShardError``."""
        t0 = time.perf_counter()
        self.ds.advance(k)
        raw = self.ds.read(
            order[schedule.positions(world.rank, k)], self._read_fields, self._bytes_fields
        )
        stats.time("read", time.perf_counter() - t0)
        return raw

    def reads(
        self, epoch: int, schedule: Schedule, world: World, stats: Stats
    ) -> Iterator[tuple[int, list[Any]]]:
        """``(k, raw)`` for ``world``'s batches of one epoch, read in this thread."""
        order = self.order(epoch)
        self._expect(order, schedule, world)
        for k in schedule.worker_batches(world):
            yield k, self.read_batch(order, schedule, world, k, stats)

    def _expect(self, order: EpochOrder, schedule: Schedule, world: World) -> None:
        if self.ds.remote.any():
            # DataLoader keeps its workers within prefetch_factor (2) rounds of each other.
            skew = 2 * world.num_workers * (world.num_workers > 1)
            self.ds.expect(remote_needs(self.ds, order, schedule, world), skew=skew)

    def join(self, batch: dict[str, Any], stats: Stats) -> dict[str, Any]:
        """The feature join of a decoded batch (its key and timestamp columns replaced by the
        joined feature columns); the batch unchanged without one."""
        features = self.opts.features
        if features is None:
            return batch
        t0 = time.perf_counter()
        keys = batch.pop(FEATURE_KEY)
        ts = np.asarray(batch.pop(FEATURE_TS), dtype=np.int64)
        if features.late is None:
            joined = features.table.join(keys, ts)
        else:
            from mmload.features.watermark import join_with_watermark

            joined, early, waited = join_with_watermark(
                features.table, keys, ts, features.late, features.max_wait_s
            )
            stats.add("joins_before_watermark", early)
            stats.per_batch("joins_before_watermark", early)
            if waited:
                stats.time("join_wait", waited)
        for name, t in joined.items():
            on_cpu = self.opts.device.type != "cuda" and t.device.type != "cpu"
            batch[name] = t.cpu() if on_cpu else t
        stats.time("join", time.perf_counter() - t0)
        return batch

    def batch_decoder(self, epoch: int, world: World, stats: Stats) -> BatchDecoder:
        """A fresh batch decoder for ``world``'s epoch (its media decoders reset), counting into
        ``stats``, with the plan's spare source for all-bad batches."""
        order = self.order(epoch)
        for dec in self._media_decoders().values():  # an abandoned epoch may leave work in flight
            reset = getattr(dec, "reset", None)
            if reset is not None:
                reset()
        decoder = BatchDecoder(
            self.fields,
            self._media_decoders(),
            self.opts.image,
            self.opts.policy,
            stats,
            self.opts.text,
            self._extract,
        )
        read_fields, bytes_fields = self._read_fields, self._bytes_fields

        def spare_reads() -> Iterator[list[Any]]:
            # The rank's batches from the start of the epoch (not from a resume point, the same
            # for every worker): the spare is a function of the plan. Read through private file
            # handles, since this runs on the decode thread while the read thread reads.
            whole = self.schedule(world.world_size, 0)
            ds = self.ds.private_copy()
            try:
                for k in range(min(whole.num_batches, _SPARE_BATCHES)):
                    yield ds.read(order[whole.positions(world.rank, k)], read_fields, bytes_fields)
            finally:
                ds.close()

        decoder.spare_source = spare_reads
        return decoder

    def run(
        self,
        epoch: int,
        schedule: Schedule,
        world: World,
        stats: Stats,
        *,
        upstream: Upstream | None = None,
        on_decoded: Callable[[], None] | None = None,
    ) -> Stage[Any, tuple[int, dict[str, Any]]]:
        """The stage chain yielding ``(k, batch)`` for ``world``'s batches of one epoch.

        ``upstream``: the batches come from elsewhere (worker processes), in order, either as
        read (``upstream.decoded`` False: this process decodes them) or decoded (this process
        only joins and copies them). ``on_decoded``: called (in the decode thread) once every
        batch of the epoch is decoded, while the last ones still wait in the queues.
        """
        if upstream is not None and upstream.decoded:
            joined: Stage[Any, tuple[int, dict[str, Any]]] = Stage(
                upstream,
                lambda item: (item[0], self.join(item[1], stats)),
                depth=self.opts.prefetch,
                name="join",
                on_wait=stats.wait_on,
            )
            return self._copy_stage(joined, stats)
        order = self.order(epoch)
        decoder = self.batch_decoder(epoch, world, stats)

        def finish(pending: Pending) -> dict[str, Any]:
            batch = decoder.finish(pending)
            return self.join(batch, stats)

        depth = self.opts.prefetch
        reader: Stage[Any, tuple[int, list[Any]]] | Upstream
        if upstream is None:
            self._expect(order, schedule, world)
            reader = Stage(
                schedule.worker_batches(world),
                lambda k: (k, self.read_batch(order, schedule, world, k, stats)),
                depth=depth,
                name="read",
                on_wait=stats.wait_on,
            )
        else:
            reader = upstream

        def decode_ahead() -> Iterator[tuple[int, dict[str, Any]]]:
            # Keep `depth` batches submitted to the media decoders (DALI decodes batch N+1 while
            # batch N is assembled); finish them in order.
            pending: deque[tuple[int, Pending]] = deque()
            for k, raw in reader:
                pending.append((k, decoder.prepare(raw, epoch)))
                if len(pending) >= depth:
                    k0, p = pending.popleft()
                    yield k0, finish(p)
            while pending:
                k0, p = pending.popleft()
                yield k0, finish(p)
            if on_decoded is not None:
                on_decoded()

        decoded: Stage[Any, tuple[int, dict[str, Any]]] = Stage(
            decode_ahead(),
            _identity,
            depth=depth,
            name="decode",
            closes=(reader,),
            on_wait=stats.wait_on,
        )
        return self._copy_stage(decoded, stats)

    def _copy_stage(
        self, upstream: Stage[Any, tuple[int, dict[str, Any]]], stats: Stats
    ) -> Stage[Any, tuple[int, dict[str, Any]]]:
        if self.opts.device.type != "cuda":
            return upstream
        copier = DeviceCopier(self.opts.device)

        def copy(item: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
            k, batch = item
            moved, event = copier(batch)
            return k, {"__event__": (copier, event), **moved}

        return Stage(upstream, copy, depth=self.opts.prefetch, name="copy", on_wait=stats.wait_on)

    def close(self) -> None:
        if self._media_pid == os.getpid():
            for dec in (self._media or {}).values():
                dec.close()
        elif self._media is not None:
            _FORK_LEFTOVERS.append(self._media)
        self._media = None
        self.ds.close_cache()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_media"] = None  # decoders (DALI pipelines, thread pools) are per process
        state["_order"] = None
        return state


def _identity(item: Any) -> Any:
    return item


def remote_needs(
    ds: Dataset, order: EpochOrder, schedule: Schedule, world: World
) -> list[tuple[int, int, int]]:
    """The cached (remote) shards ``world``'s batches read, as (shard, first batch, last batch)
    sorted by first batch: from the plan alone, O(this rank's pieces), no sample id listed.

    A piece (a slice of a chunk) of partition ``p`` is read between the partition-local
    indexes ``[lo, hi]`` of its group, i.e. at positions ``j * P + p``; the rank batch of a
    position ``t`` is ``(t - start) // G``. Worker ``w`` of ``W`` reads the batches ``k = w
    (mod W)`` in that span. Padding repeats the rank's first positions in its last batch.
    """
    nb = schedule.num_batches
    if nb == 0:
        return []
    P, G, start = order.partitions, schedule.global_batch, schedule.start
    nw, w = world.num_workers, world.worker
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for p in range(world.rank, P, schedule.world_size):
        first_id, _lens, lo, hi = order.pieces(p)
        k_lo = np.maximum((lo * P + p - start) // G, 0)
        k_hi = np.minimum((hi * P + p - start) // G, nb - 1)
        f = k_lo + (w - k_lo) % nw
        last = k_hi - (k_hi - w) % nw
        keep = (f <= last) & (hi * P + p >= start)
        parts.append((ds.locate(first_id[keep])[1], f[keep], last[keep]))
    if schedule.padding_in(world.rank, nb - 1) and (nb - 1) % nw == w:
        ids = order[schedule.positions(world.rank, nb - 1)]
        s = np.unique(ds.locate(ids)[1])
        parts.append((s, np.full(len(s), nb - 1), np.full(len(s), nb - 1)))
    if not parts:
        return []
    shard = np.concatenate([x[0] for x in parts])
    first = np.concatenate([x[1] for x in parts])
    last = np.concatenate([x[2] for x in parts])
    remote = ds.remote[shard]
    shard, first, last = shard[remote], first[remote], last[remote]
    o = np.lexsort((shard, first))
    return list(zip(shard[o].tolist(), first[o].tolist(), last[o].tolist(), strict=True))


def iter_epoch(
    pipe: Pipeline,
    epoch: int,
    schedule: Schedule,
    world: World,
    stats: Stats,
    upstream: Upstream | None = None,
    run: Stage[Any, tuple[int, dict[str, Any]]] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(k, batch)`` pairs, ready for the consumer (device copies synchronised);
    ``upstream``: batches from worker processes (see :meth:`Pipeline.run`); ``run``: the
    epoch's stage chain, already built (and perhaps running ahead)."""
    if schedule.padded and world.worker == 0:
        log.info(
            "epoch %d: the last global batch is padded with %d repeated samples so that all %d "
            "ranks take %d batches (drop_last=True drops the tail instead)",
            epoch,
            schedule.padded,
            world.world_size,
            schedule.num_batches,
        )
    if run is None:
        run = pipe.run(epoch, schedule, world, stats, upstream=upstream)
    it = iter(run)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                k, batch = next(it)
            except StopIteration:
                return
            # The trainer's wait for data: attributed to stages through their own waits.
            stats.time("wait", time.perf_counter() - t0)
            marker = batch.pop("__event__", None)
            if marker is not None:
                copier, event = marker
                batch = copier.ready(batch, event)
            stats.add("batches")
            # Throughput counts unique samples: the padding repeats are counted apart.
            stats.add("samples", len(batch["__key__"]) - schedule.padding_in(world.rank, k))
            yield k, batch
    finally:
        run.close()
