"""A data set: its shards' manifest, the chunk table the plan needs, and sample reads.

Only the manifest is loaded at start-up (O(shards)); a shard's member table is loaded when the
shard is first read (:class:`~mmload.sources.index.IndexStore`, bounded), and a remote shard's
bytes come from the node's shard cache (:class:`~mmload.sources.cache.ShardCache`), fetched in
plan order ahead of the reads. Tar members are copied from the shard's read-only mapping into
one buffer per batch (:mod:`mmload.sources.gather`); Parquet/Arrow rows come from pyarrow.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmload.config import RemoteConfig
from mmload.errors import BadEntry, ShardError
from mmload.sources.arrow import ChunkCache, TableIndex, TableReader
from mmload.sources.cache import Need, ShardCache
from mmload.sources.catalog import in_cache, resolve
from mmload.sources.fetch import default_cache_dir
from mmload.sources.gather import BatchBuffers, Copier, OpenShard, TarPart, gather_tar
from mmload.sources.index import IndexStore, ShardIndex, index_digest
from mmload.sources.manifest import FieldInfo, Manifest, ShardRecord
from mmload.sources.spec import ShardSpec, local_path
from mmload.sources.tar import TarIndex

__all__ = ["Dataset", "FieldInfo", "RawSample"]

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
"""One sample as read: ``__key__``, ``__shard__``, ``__id__`` and one entry per field."""

_MAX_OPEN_FILES = 256


class Dataset:
    """Shards with their manifest, and the chunk table over which the plan runs.

    ``chunk_counts[c]`` samples belong to chunk ``c`` (a tar shard, a row group, a record
    batch) of shard ``chunk_shard[c]``; global sample ids are numbered chunk after chunk.
    ``bad`` lists what indexing found bad (with ``on_error="skip"``).
    """

    def __init__(
        self,
        specs: list[ShardSpec],
        manifest: Manifest,
        *,
        store: IndexStore,
        cache: ShardCache,
        cache_chunks: int = 64,
        index_seconds: float = 0.0,
    ) -> None:
        self.specs = specs
        self.manifest = manifest
        self.records: list[ShardRecord] = manifest.records
        self.key_column = manifest.key_column
        self.bad: list[BadEntry] = list(manifest.bad)
        self.store = store
        self.cache = cache
        self.cache_chunks = cache_chunks
        self.index_seconds = index_seconds
        self.manifest_cache_file: Path | None = None
        self.remote = np.array([in_cache(sp) for sp in specs], dtype=bool)
        counts = manifest.counts()
        if all(r.chunk_rows is None for r in self.records):  # tar only: a chunk per shard
            self.chunk_counts = counts
            self.chunk_shard = np.arange(len(counts), dtype=np.int64)
            self.chunk_first_row = np.zeros(len(counts), dtype=np.int64)
        else:
            rows = [
                np.asarray(r.chunk_rows if r.chunk_rows is not None else [r.num_samples])
                for r in self.records
            ]
            self.chunk_counts = np.concatenate(rows).astype(np.int64)
            self.chunk_shard = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
            self.chunk_first_row = np.concatenate(
                [np.concatenate([[0], np.cumsum(x)[:-1]]) for x in rows]
            ).astype(np.int64)
        self.chunk_start = np.concatenate([[0], np.cumsum(self.chunk_counts)]).astype(np.int64)
        self._shard_first_chunk = np.searchsorted(self.chunk_shard, np.arange(len(specs)))
        self._is_tar = np.array([r.kind == "tar" for r in self.records], dtype=bool)
        self._last_need: dict[int, int] = {}  # this process's plan: shard -> last batch
        self._reset_handles()

    def _reset_handles(self) -> None:
        # Descriptors, readers, pins and the lock belong to one process: a forked DataLoader
        # worker must not inherit a lock another thread held at fork time.
        self._pid = os.getpid()
        self._fds: OrderedDict[int, OpenShard] = OrderedDict()
        self._tables: OrderedDict[int, TableReader] = OrderedDict()
        self._chunk_cache: ChunkCache = OrderedDict()
        self._buffers = BatchBuffers()  # one buffer per batch, reused when no view is left
        self._copier = Copier()
        self._pinned: dict[int, str] = {}
        self._lock = threading.Lock()

    def _own(self) -> None:
        """Start this process's handles afresh after a fork (the plan state is kept)."""
        if self._pid != os.getpid():
            self._reset_handles()

    @property
    def num_samples(self) -> int:
        return int(self.chunk_start[-1])

    @property
    def num_shards(self) -> int:
        return len(self.specs)

    def shard_url(self, s: int) -> str:
        return self.specs[s].url

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        key_column: str | None = "__key__",
        skip_bad: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        index_cache: bool = True,
        allow_pipe: bool = False,
        cache_chunks: int = 64,
        remote: RemoteConfig | None = None,
    ) -> Dataset:
        """Expand ``spec`` (shards, or a ``mmload.index.json`` manifest), find or complete its
        manifest (:mod:`mmload.sources.catalog`); nothing else is read.

        With ``skip_bad`` a shard that cannot be opened is left out and listed in ``bad``;
        otherwise its :class:`ShardError` is raised.
        """
        t0 = time.perf_counter()
        cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        store = IndexStore(cdir if index_cache else None, key_column=key_column, skip=skip_bad)
        cache = ShardCache(cdir / "shards", remote or RemoteConfig())
        cat = resolve(
            spec,
            key_column=key_column,
            skip_bad=skip_bad,
            cache_dir=cdir,
            use_cache=index_cache,
            allow_pipe=allow_pipe,
            store=store,
            cache=cache,
        )
        if not cat.specs:
            raise ShardError("no readable shard in the spec", shard=str(spec))
        ds = cls(
            cat.specs,
            cat.manifest,
            store=store,
            cache=cache,
            cache_chunks=cache_chunks,
            index_seconds=time.perf_counter() - t0,
        )
        ds.manifest_cache_file = cat.cache_file
        if ds.num_samples == 0:
            raise ShardError(
                f"the data set has no samples: all {ds.num_shards} readable shards are empty "
                "(the first is named here)",
                shard=ds.shard_url(0),
            )
        log.info(
            "opened %d shards, %d samples in %.3fs (%d indexed now, the rest from a manifest)",
            ds.num_shards,
            ds.num_samples,
            ds.index_seconds,
            cat.built,
        )
        return ds

    def field_schema(self) -> dict[str, FieldInfo]:
        """Every field of the data set (the key column excluded), in order of first appearance:
        the union over all shards, from the manifest."""
        return self.manifest.fields

    # -- shards on disk -----------------------------------------------------------------------

    def need(self, s: int, first: int, last: int) -> Need:
        r, sp = self.records[s], self.specs[s]
        # A record made from a local file (`mmload index` before the upload) has its mtime, not
        # the store's ETag: the served copy is checked by size.
        version = None if r.version is None or r.version.startswith("mtime:") else r.version
        return Need(sp.url, r.size, version, sp.compressed, first, last)

    def expect(self, needs: Sequence[tuple[int, int, int]], *, skew: int = 0) -> None:
        """This process's remote shards for the rest of the epoch: (shard, first batch, last
        batch), in plan order. The cache starts fetching them, ``lookahead`` ahead."""
        self._own()
        self._last_need = {}
        for s, _first, last in needs:
            self._last_need[s] = max(last, self._last_need.get(s, -1))
        self.cache.follow([self.need(s, f, la) for s, f, la in needs], skew=skew)

    def advance(self, batch: int) -> None:
        """The reader is at ``batch``: unpin shards it no longer needs, move the look-ahead."""
        self._own()
        done = [s for s in self._pinned if self._last_need.get(s, -1) < batch]
        for s in done:
            self._unpin(s)
        self.cache.advance(batch)

    def _path(self, s: int) -> str:
        self._own()
        if not self.remote[s]:
            return local_path(self.specs[s].url)
        with self._lock:
            path = self._pinned.get(s)
        if path is not None:
            return path
        path = self.cache.acquire(self.need(s, 0, self._last_need.get(s, 0)))
        with self._lock:
            if s in self._pinned:
                self.cache.release(self.specs[s].url)  # pinned twice by two threads
            else:
                self._pinned[s] = path
        return path

    def _unpin(self, s: int) -> None:
        with self._lock:
            f = self._fds.pop(s, None)
            if f is not None:
                f.close()
            r = self._tables.pop(s, None)
            if r is not None:
                r.close()
            if self._pinned.pop(s, None) is not None:
                self.cache.release(self.specs[s].url)

    def index(self, s: int) -> ShardIndex:
        """Shard ``s``'s member table, loaded (or built from its local file) on first use."""
        self._own()
        rec = self.records[s]
        url = self.specs[s].url
        key = rec.index_version
        if self.remote[s]:
            # The table belongs to the copy being read: keyed by what the server reported for
            # it, so a copy that changed (same size, new ETag) is indexed and checked again.
            self._path(s)  # fetched (and pinned) first
            got = self.cache.remote_object(url)
            if got is not None:
                key = f"{key}|{got.size}|{got.version}"
        idx = self.store.cached(url, key)
        if idx is None:
            idx = self.store.build(self._path(s), rec.kind, url=url, version=key)
            if rec.digest is not None and index_digest(idx) != rec.digest:
                self.store.forget(url)
                raise ShardError(
                    "the shard changed since it was indexed: its member table (keys, offsets) "
                    "differs from the manifest's; run `mmload index` again",
                    shard=url,
                )
        if idx.num_samples != rec.num_samples:
            raise ShardError(
                f"the shard changed since it was indexed: the manifest says {rec.num_samples} "
                f"samples, the shard has {idx.num_samples}; run `mmload index` again",
                shard=url,
            )
        return idx

    # -- reading ------------------------------------------------------------------------------

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk, shard, row within shard) of each global sample id."""
        chunk = np.searchsorted(self.chunk_start, ids, side="right") - 1
        row = ids - self.chunk_start[chunk] + self.chunk_first_row[chunk]
        return chunk, self.chunk_shard[chunk], row

    def _open_tar(self, s: int) -> OpenShard:
        path = self._path(s)
        with self._lock:
            f = self._fds.get(s)
            if f is not None:
                self._fds.move_to_end(s)
                return f
            try:
                f = OpenShard(os.open(path, os.O_RDONLY))
            except OSError as e:
                raise ShardError(
                    f"cannot open shard: {e.strerror}", shard=self.specs[s].url
                ) from None
            self._fds[s] = f
            if len(self._fds) > _MAX_OPEN_FILES:
                self._fds.popitem(last=False)[1].close()
            return f

    def _table(self, s: int) -> TableReader:
        self._own()
        index = self.index(s)
        path = self._path(s)
        with self._lock:
            r = self._tables.get(s)
            if r is not None:
                self._tables.move_to_end(s)
                return r
            assert isinstance(index, TableIndex)
            r = TableReader(
                path,
                index,
                shard=self.specs[s].url,
                key_column=self.key_column,
                cache=self._chunk_cache,
                cache_chunks=self.cache_chunks,
                lock=self._lock,
            )
            self._tables[s] = r
            if len(self._tables) > _MAX_OPEN_FILES:  # open Parquet/Arrow files, like tar fds
                self._tables.popitem(last=False)[1].close()
            return r

    def _tar_part(self, s: int, js: list[int], ids: list[int], rows: list[int]) -> TarPart:
        url = self.specs[s].url
        r, i = [rows[j] for j in js], [ids[j] for j in js]
        try:
            idx = self.index(s)
            f: OpenShard | ShardError = self._open_tar(s)
        except ShardError as e:
            return TarPart(e, None, url, js, r, i)
        assert isinstance(idx, TarIndex)
        return TarPart(f, idx, url, js, r, i)

    def read(
        self,
        ids: np.ndarray,
        fields: set[str] | None = None,
        as_bytes: frozenset[str] = frozenset(),
    ) -> list[RawSample | ShardError]:
        """Read samples by global id, in order; a sample that cannot be read is its ShardError.

        ``fields`` limits which members/columns are read (None: all). A tar member's value is a
        read-only ``memoryview`` of the batch's buffer, or ``bytes`` for a field in
        ``as_bytes`` (one the caller hands on as ``bytes``: read into its own, not copied twice).
        """
        ids = np.asarray(ids, dtype=np.int64)
        chunk, shard, row = self.locate(ids)
        out: list[RawSample | ShardError] = [ShardError("unread", shard="")] * len(ids)
        tar = self._is_tar[shard]
        table_rows: dict[tuple[int, int], list[int]] = {}
        if tar.all():
            by_shard: dict[int, list[int]] = {}
            for j, s in enumerate(shard.tolist()):
                by_shard.setdefault(s, []).append(j)
        else:
            by_shard = {}
            for j, s, c, t in zip(
                range(len(ids)), shard.tolist(), chunk.tolist(), tar.tolist(), strict=True
            ):
                if t:
                    by_shard.setdefault(s, []).append(j)
                else:
                    table_rows.setdefault((s, c), []).append(j)
        if by_shard:
            # Tar samples by shard, in batch order within one: an index and descriptor lookup
            # per shard per batch, not per sample; the members gathered into one buffer.
            # A batch may touch more tar shards than the descriptor LRU keeps open (a whole-
            # data-set shuffle over small shards): it is gathered in groups the LRU holds whole.
            # Opening a group's shards evicts only shards outside the group, so no descriptor is
            # closed, and its number reused by the next open, before its group is copied.
            id_l, row_l = ids.tolist(), row.tolist()
            items = list(by_shard.items())
            for g in range(0, len(items), _MAX_OPEN_FILES):
                gather_tar(
                    [
                        self._tar_part(s, js, id_l, row_l)
                        for s, js in items[g : g + _MAX_OPEN_FILES]
                    ],
                    fields,
                    out,
                    self._buffers,
                    self._copier,
                    as_bytes,
                )
        for (s, c), js in table_rows.items():
            local = row[js] - self.chunk_first_row[c]
            try:
                reader = self._table(s)
                samples = reader.read(int(c - self._shard_first_chunk[s]), local, fields)
            except ShardError as e:
                for j in js:
                    out[j] = e
                continue
            for j, smp in zip(js, samples, strict=True):
                if isinstance(smp, dict):
                    smp["__shard__"] = self.specs[s].url
                    smp["__id__"] = int(ids[j])
                    if self.key_column is None:  # the row's number in the whole data set
                        smp["__key__"] = str(int(ids[j]))
                out[j] = smp
        return out

    def private_copy(self) -> Dataset:
        """The same data set with its own file descriptors, readers, pins and chunk cache, for a
        second thread (descriptors are recycled by the LRU: one thread may close what another
        is about to read). ``close()`` it after use."""
        other = copy.copy(self)
        other._reset_handles()
        return other

    def close(self) -> None:
        if self._pid != os.getpid():
            self._reset_handles()
            return
        for s in list(self._pinned):
            self._unpin(s)
        with self._lock:
            for f in self._fds.values():
                f.close()
            self._fds.clear()
            for r in self._tables.values():
                r.close()
            self._tables.clear()
            self._chunk_cache.clear()
        self._copier.close()

    def close_cache(self) -> None:
        """Stop the fetchers (the owner of the data set calls this once, at the end)."""
        self.close()
        self.cache.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in (
            "_pid",
            "_fds",
            "_tables",
            "_chunk_cache",
            "_buffers",
            "_copier",
            "_lock",
            "_pinned",
        ):
            del state[k]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()
