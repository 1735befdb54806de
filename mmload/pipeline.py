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

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mmload.config import (
    AudioConfig,
    ErrorPolicy,
    FeatureJoin,
    ImageConfig,
    ShuffleConfig,
    TextConfig,
    VideoConfig,
)
from mmload.decode import BatchDecoder, FieldDecoder, FieldPlan, ImageField, make_image_decoder
from mmload.decode.batch import MEDIA, Pending
from mmload.decode.fields import FieldKind, field_kind, fixed_shape, kind_class
from mmload.device import DeviceCopier
from mmload.errors import ConfigError, ShardError
from mmload.plan import EpochOrder, Schedule, World
from mmload.sources import Dataset
from mmload.sources.dataset import FieldInfo
from mmload.stages import Stage
from mmload.stats import Stats

__all__ = ["LoaderOptions", "Pipeline"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderOptions:
    """Everything ``Loader``/``IterableDataset`` take besides the source, validated."""

    batch_size: int
    device: torch.device
    shuffle: ShuffleConfig | None
    seed: int
    drop_last: bool
    fields: tuple[str, ...] | None
    image_fields: frozenset[str] | None
    image: ImageConfig
    features: FeatureJoin | None
    audio: AudioConfig | None
    video: VideoConfig | None
    text: TextConfig | None
    key_column: str | None
    policy: ErrorPolicy
    threads: int
    prefetch: int
    partitions: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(f"batch_size={self.batch_size!r}: must be a positive int")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: must be a non-negative int")
        if self.threads < 1:
            raise ConfigError(f"threads={self.threads!r}: must be >= 1")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch={self.prefetch!r}: must be >= 1")
        p = self.partitions
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"partitions={p!r}: must be a positive int or None")


def default_partitions(num_shards: int, world_size: int) -> int:
    """``2 * world_size`` when that leaves every partition >= 8 shards, else ``world_size``.

    A rank reads ``P / world_size`` partitions at once, each through a group of ``interleave``
    chunks, so its working set (and the shards fetched before its first batch) grows with
    ``P / world_size``: the default keeps it at one or two groups, and elastic resume works on
    any divisor of ``P`` (half the ranks, or twice as many with ``2 * world_size``). Pass
    ``partitions=`` for more world sizes."""
    return 2 * world_size if 2 * world_size * 8 <= num_shards else world_size


def _split_path(spec: str, available: set[str], what: str) -> tuple[str, tuple[str, ...]]:
    """``"json.user_id"`` -> (``"json"``, ``("user_id",)``): the longest dotted prefix that is a
    field; the rest is a path into its (JSON) value."""
    parts = spec.split(".")
    for cut in range(len(parts), 0, -1):
        field = ".".join(parts[:cut])
        if field in available:
            return field, tuple(parts[cut:])
    raise ConfigError(
        f"FeatureJoin.{what}={spec!r}: no field of the data set matches "
        f"(fields: {sorted(available)})"
    )


def _field_plan(ds: Dataset, opts: LoaderOptions) -> tuple[FieldPlan, dict[str, Any]]:
    """Fields of every batch (``opts.fields``, else every field of the data set's schema: the
    union over all shards, read from the indexes) and what the feature join extracts."""
    schema = ds.field_schema()
    names = opts.fields
    if names is None:
        names = tuple(sorted(k for k in schema if not k.startswith("__")))
        log.info("batch fields (every field of the data set): %s", ", ".join(names))
    else:
        unknown = [f for f in names if f not in schema]
        if unknown:
            raise ConfigError(
                f"fields={list(names)}: {unknown} are in no shard of the data set "
                f"(fields: {sorted(schema)})"
            )
    for n in names:
        fi = schema[n]
        if fi.samples < ds.num_samples:
            log.warning(
                "field %r is missing from %d of %d samples (first shard with it: %s); samples "
                "without it are bad samples. Pass fields=[...] to choose the batch fields",
                n,
                ds.num_samples - fi.samples,
                ds.num_samples,
                fi.first_shard,
            )
    hidden: set[str] = set()
    extract: dict[str, Any] = {}
    if opts.features is not None:
        available = {k for k in schema if not k.startswith("__")} | set(names)
        for name, spec, types in (
            (FEATURE_KEY, opts.features.key, (int, str)),
            (FEATURE_TS, opts.features.timestamp, int),
        ):
            field, path = _split_path(
                spec, available, "key" if name == FEATURE_KEY else "timestamp"
            )
            if field not in names:
                names = (*names, field)
                hidden.add(field)
            extract[name] = (field, path, types)
    kinds = {n: _kind(n, schema[n], opts.image_fields) for n in names}
    for n, k in kinds.items():  # audio/video are decoded when configured, else passed as bytes
        if (k == "audio" and opts.audio is None) or (k == "video" and opts.video is None):
            kinds[n] = "bytes"
    if opts.text is not None:
        absent = [f for f in opts.text.fields if f not in names]
        if absent:
            raise ConfigError(
                f"TextConfig.fields {absent} are not fields of this data set {list(names)}"
            )
        for f in opts.text.fields:
            if kinds[f] in ("bytes", "text"):
                kinds[f] = "text"  # UTF-8 text whatever the extension (a bad byte: a bad sample)
            elif kinds[f] != "value":
                raise ConfigError(f"TextConfig field {f!r} is a {kinds[f]} field, not text")
    for name, (field, _, _) in extract.items():
        if kinds[field] in ("image", "audio", "video", "bytes"):
            raise ConfigError(
                f"the feature join reads {name} from field {field!r}, a {kinds[field]} field"
            )
    if opts.features is not None:
        clash = set(opts.features.table.column_names) & (set(names) - hidden)
        if clash:
            raise ConfigError(
                f"feature columns {sorted(clash)} clash with batch fields of the same name"
            )
    classes = {n: kind_class(k, schema[n].arrow_type) for n, k in kinds.items() if k not in MEDIA}
    for n, cls in classes.items():
        for shard, t in schema[n].other_types:
            other = kind_class("value", t)
            if other != cls and not (cls == "float" and other == "int"):
                log.warning(
                    "column %r is %s in shard %s but %s (%s) in %s: its values there are bad "
                    "samples",
                    n,
                    t,
                    shard,
                    schema[n].arrow_type,
                    cls,
                    schema[n].first_shard,
                )
    shapes: dict[str, tuple[int, ...]] = {}
    for n, cls in classes.items():
        if cls == "array":  # a fixed-size list: its (nested) row shape is in its Arrow type
            shape = fixed_shape(schema[n].arrow_type or "")
            if shape is None:
                classes[n] = "ragged"  # fixed-size lists of something that is not a number
            else:
                shapes[n] = shape
    return FieldPlan(tuple(names), kinds, frozenset(hidden), classes, shapes), extract


def _kind(name: str, fi: FieldInfo, image_fields: frozenset[str] | None) -> FieldKind:
    """A tar member or a binary column is decoded by its name; a typed column is a value."""
    t = fi.arrow_type
    binary = t is None or kind_class("value", t) == "bytes"
    return field_kind(name, b"" if binary else None, image_fields)


class Upstream(Protocol):
    """Batches produced outside this process's stage chain (``mmload.workers``), in order."""

    decoded: bool

    def __iter__(self) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


_SPARE_BATCHES = 64  # how far an all-bad first batch looks for a good sample to repeat
_FORK_LEFTOVERS: list[Any] = []  # decoders inherited by forked processes, deliberately kept

FEATURE_KEY = "__feature_key__"
FEATURE_TS = "__feature_ts__"


class Pipeline:
    """Per-process state shared by every epoch of a Loader or IterableDataset."""

    def __init__(self, ds: Dataset, opts: LoaderOptions) -> None:
        self.ds = ds
        self.opts = opts
        self.fields, self._extract = _field_plan(ds, opts)
        self._read_fields = set(self.fields.names)
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
        return media

    def read_batch(
        self, order: EpochOrder, schedule: Schedule, world: World, k: int, stats: Stats
    ) -> list[Any]:
        """Rank ``world.rank``'s batch ``k`` as read: a dict of bytes per sample, or its
        ``ShardError``."""
        t0 = time.perf_counter()
        self.ds.advance(k)
        raw = self.ds.read(order[schedule.positions(world.rank, k)], self._read_fields)
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
        for name, t in features.table.join(keys, ts).items():
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
        read_fields = self._read_fields

        def spare_reads() -> Iterator[list[Any]]:
            # The rank's batches from the start of the epoch (not from a resume point, the same
            # for every worker): the spare is a function of the plan. Read through private file
            # handles, since this runs on the decode thread while the read thread reads.
            whole = self.schedule(world.world_size, 0)
            ds = self.ds.private_copy()
            try:
                for k in range(min(whole.num_batches, _SPARE_BATCHES)):
                    yield ds.read(order[whole.positions(world.rank, k)], read_fields)
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
    ) -> Stage[Any, tuple[int, dict[str, Any]]]:
        """The stage chain yielding ``(k, batch)`` for ``world``'s batches of one epoch.

        ``upstream``: the batches come from elsewhere (worker processes), in order, either as
        read (``upstream.decoded`` False: this process decodes them) or decoded (this process
        only joins and copies them).
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


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def default_threads(num_workers: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def iter_epoch(
    pipe: Pipeline,
    epoch: int,
    schedule: Schedule,
    world: World,
    stats: Stats,
    upstream: Upstream | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(k, batch)`` pairs, ready for the consumer (device copies synchronised);
    ``upstream``: batches from worker processes (see :meth:`Pipeline.run`)."""
    if schedule.padded and world.worker == 0:
        log.info(
            "epoch %d: the last global batch is padded with %d repeated samples so that all %d "
            "ranks take %d batches (drop_last=True drops the tail instead)",
            epoch,
            schedule.padded,
            world.world_size,
            schedule.num_batches,
        )
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


def validate_fields(fields: Sequence[str] | None) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        return (fields,)
    out = tuple(fields)
    if not out or not all(isinstance(f, str) and f for f in out):
        raise ConfigError(f"fields={fields!r}: must be a non-empty sequence of field names")
    return out
