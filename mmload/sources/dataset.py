"""A data set: its shards, their indexes, the chunk table the plan needs, and sample reads."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmload.errors import BadEntry, ShardError
from mmload.sources.arrow import ChunkCache, TableIndex, TableReader
from mmload.sources.fetch import default_cache_dir, localize
from mmload.sources.index import IndexCache, ShardIndex
from mmload.sources.spec import ShardSpec, expand, is_local
from mmload.sources.tar import TarIndex

__all__ = ["Dataset", "FieldInfo", "RawSample", "ShardInfo"]

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
"""One sample as read: ``__key__``, ``__shard__``, ``__id__`` and one entry per field."""

_MAX_OPEN_FILES = 256


@dataclass
class ShardInfo:
    spec: ShardSpec
    path: str
    index: ShardIndex

    @property
    def num_samples(self) -> int:
        return self.index.num_samples


def _shard_entry(url: str, e: ShardError) -> BadEntry:
    """A shard left out whole is listed for the shard (key None): every sample of it is lost,
    not only the one the error names."""
    where = f" (at key {e.key!r})" if e.key is not None else ""
    return BadEntry(url, None, f"shard left out: {e.reason}{where}")


@dataclass
class FieldInfo:
    """One field of the data set, from the indexes (no sample is read).

    ``arrow_type``: the column's Arrow type in the first table shard that has it (None for tar
    members, which are bytes); ``samples``: how many samples have the field; ``other_types``:
    ``(shard, type)`` of table shards whose column type differs from ``arrow_type``.
    """

    name: str
    arrow_type: str | None
    samples: int
    first_shard: str
    other_types: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dataset:
    """Shards with their indexes, and the chunk table over which the plan runs.

    ``chunk_counts[c]`` samples belong to chunk ``c``; global sample ids are numbered chunk
    after chunk. ``bad`` lists what indexing found bad (with ``on_error="skip"``).
    """

    shards: list[ShardInfo]
    key_column: str | None
    cache_chunks: int
    bad: list[BadEntry] = field(default_factory=list)
    index_seconds: float = 0.0

    def __post_init__(self) -> None:
        counts: list[np.ndarray] = []
        shard_of: list[np.ndarray] = []
        first_row: list[np.ndarray] = []
        for s, info in enumerate(self.shards):
            idx = info.index
            rows = idx.chunk_rows if isinstance(idx, TableIndex) else np.array([idx.num_samples])
            counts.append(rows.astype(np.int64))
            shard_of.append(np.full(len(rows), s, np.int64))
            first_row.append(np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64))
        self.chunk_counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self.chunk_shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int64)
        self.chunk_first_row = np.concatenate(first_row) if first_row else np.zeros(0, np.int64)
        self.chunk_start = np.concatenate([[0], np.cumsum(self.chunk_counts)]).astype(np.int64)
        self._reset_handles()

    def _reset_handles(self) -> None:
        # Descriptors, readers and the lock belong to one process: a forked DataLoader worker
        # must not inherit a lock another thread held at fork time.
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._tables: OrderedDict[int, TableReader] = OrderedDict()
        self._chunk_cache: ChunkCache = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_samples(self) -> int:
        return int(self.chunk_start[-1])

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
        threads: int = 16,
    ) -> Dataset:
        """Expand ``spec``, fetch remote shards to ``cache_dir`` and index every shard.

        With ``skip_bad`` a shard that cannot be opened is left out and listed in ``bad``;
        otherwise its :class:`ShardError` is raised.
        """
        t0 = time.perf_counter()
        specs = expand(spec, allow_pipe=allow_pipe)
        cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

        # Remote shards are fetched in parallel (network-bound); local ones are used in place.
        def fetch(sp: ShardSpec) -> str | BadEntry:
            try:
                return localize(sp, cdir)
            except ShardError as e:
                if not skip_bad:
                    raise
                return _shard_entry(sp.url, e)

        remote = [sp for sp in specs if not is_local(sp.url) or sp.compressed]
        if remote:
            with ThreadPoolExecutor(max(1, min(threads, len(remote)))) as pool:
                fetched = dict(zip([sp.url for sp in remote], pool.map(fetch, remote), strict=True))
        else:
            fetched = {}
        located = [fetched.get(sp.url) or fetch(sp) for sp in specs]
        paths = [p for p in located if isinstance(p, str)]
        # Indexing local files is GIL-bound Python work on small reads: one thread is fastest.
        cache = IndexCache(
            cdir if index_cache else None, paths, key_column=key_column, skip=skip_bad
        )
        results: list[ShardInfo | BadEntry] = []
        for sp, path in zip(specs, located, strict=True):
            if isinstance(path, BadEntry):
                results.append(path)
                continue
            try:
                index = cache.load(
                    path, sp.kind, shard=sp.url, key_column=key_column, skip=skip_bad
                )
            except ShardError as e:
                if not skip_bad:
                    raise
                results.append(_shard_entry(sp.url, e))
                continue
            results.append(ShardInfo(sp, path, index))
        cache.save()
        shards = [r for r in results if isinstance(r, ShardInfo)]
        bad = [r for r in results if isinstance(r, BadEntry)]
        for info in shards:
            if isinstance(info.index, TarIndex):
                bad += info.index.bad
        if not shards:
            raise ShardError("no readable shard in the spec", shard=str(spec))
        ds = cls(shards, key_column, cache_chunks, bad, time.perf_counter() - t0)
        if ds.num_samples == 0:
            raise ShardError(
                f"the data set has no samples: all {len(shards)} readable shards are empty "
                "(the first is named here)",
                shard=shards[0].spec.url,
            )
        log.info(
            "indexed %d shards, %d samples in %.3fs", len(shards), ds.num_samples, ds.index_seconds
        )
        return ds

    def field_schema(self) -> dict[str, FieldInfo]:
        """Every field of the data set (the key column excluded), in order of first appearance:
        the union over all shards, so a field absent from the first sample is still found."""
        out: dict[str, FieldInfo] = {}
        for info in self.shards:
            idx = info.index
            url = info.spec.url
            if isinstance(idx, TarIndex):
                counts: dict[str, int] = Counter(idx.fields)
                types: dict[str, str | None] = dict.fromkeys(counts)
            else:
                n = idx.num_samples
                counts = {c: n for c in idx.columns if c != self.key_column}
                types = dict(zip(idx.columns, idx.types, strict=True))
            for name, count in counts.items():
                fi = out.get(name)
                if fi is None:
                    out[name] = FieldInfo(name, types[name], count, url)
                    continue
                fi.samples += count
                if fi.arrow_type is None:
                    fi.arrow_type = types[name]
                elif types[name] is not None and types[name] != fi.arrow_type:
                    fi.other_types.append((url, str(types[name])))
        return out

    # -- reading ------------------------------------------------------------------------------

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk, shard, row within shard) of each global sample id."""
        chunk = np.searchsorted(self.chunk_start, ids, side="right") - 1
        row = ids - self.chunk_start[chunk] + self.chunk_first_row[chunk]
        return chunk, self.chunk_shard[chunk], row

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():
            self._reset_handles()
        with self._lock:
            fd = self._fds.get(s)
            if fd is not None:
                self._fds.move_to_end(s)
                return fd
            try:
                fd = os.open(self.shards[s].path, os.O_RDONLY)
            except OSError as e:
                raise ShardError(
                    f"cannot open shard: {e.strerror}", shard=self.shards[s].spec.url
                ) from None
            self._fds[s] = fd
            if len(self._fds) > _MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def _table(self, s: int) -> TableReader:
        if self._pid != os.getpid():
            self._reset_handles()
        with self._lock:
            r = self._tables.get(s)
            if r is not None:
                self._tables.move_to_end(s)
                return r
            info = self.shards[s]
            assert isinstance(info.index, TableIndex)
            r = TableReader(
                info.path,
                info.index,
                shard=info.spec.url,
                key_column=self.key_column,
                cache=self._chunk_cache,
                cache_chunks=self.cache_chunks,
                lock=self._lock,
            )
            self._tables[s] = r
            if len(self._tables) > _MAX_OPEN_FILES:  # open Parquet/Arrow files, like tar fds
                self._tables.popitem(last=False)[1].close()
            return r

    def _read_tar(self, s: int, row: int, fields: set[str] | None) -> RawSample:
        info = self.shards[s]
        idx = info.index
        assert isinstance(idx, TarIndex)
        key = idx.keys[row]
        sample: RawSample = {"__key__": key}
        fd = self._fd(s)
        for m in idx.members(row):
            fld = idx.fields[m]
            if fields is not None and fld not in fields:
                continue
            size = int(idx.sizes[m])
            data = os.pread(fd, size, int(idx.offsets[m]))
            if len(data) != size:
                raise ShardError(
                    f"short read of field {fld!r}: {len(data)} of {size} bytes "
                    "(shard truncated after indexing?)",
                    shard=info.spec.url,
                    key=key,
                )
            sample[fld] = data
        return sample

    def read(self, ids: np.ndarray, fields: set[str] | None = None) -> list[RawSample | ShardError]:
        """Read samples by global id, in order; a sample that cannot be read is its ShardError.

        ``fields`` limits which members/columns are read (None: all).
        """
        chunk, shard, row = self.locate(np.asarray(ids, dtype=np.int64))
        out: list[RawSample | ShardError] = [ShardError("unread", shard="")] * len(ids)
        table_rows: dict[tuple[int, int], list[int]] = {}
        for j in range(len(ids)):
            s = int(shard[j])
            if isinstance(self.shards[s].index, TarIndex):
                try:
                    sample = self._read_tar(s, int(row[j]), fields)
                except ShardError as e:
                    out[j] = e
                    continue
                sample["__shard__"] = self.shards[s].spec.url
                sample["__id__"] = int(ids[j])
                out[j] = sample
            else:
                table_rows.setdefault((s, int(chunk[j])), []).append(j)
        for (s, c), js in table_rows.items():
            reader = self._table(s)
            local = row[js] - self.chunk_first_row[c]
            try:
                samples = reader.read(int(c - np.searchsorted(self.chunk_shard, s)), local, fields)
            except ShardError as e:
                for j in js:
                    out[j] = e
                continue
            for j, smp in zip(js, samples, strict=True):
                if isinstance(smp, dict):
                    smp["__shard__"] = self.shards[s].spec.url
                    smp["__id__"] = int(ids[j])
                out[j] = smp
        return out

    def private_copy(self) -> Dataset:
        """The same data set with its own file descriptors, readers and chunk cache, for a
        second thread (descriptors are recycled by the LRU: one thread may close what another
        is about to ``pread``). ``close()`` it after use."""
        other = copy.copy(self)
        other._reset_handles()
        return other

    def close(self) -> None:
        if self._pid != os.getpid():
            self._reset_handles()
            return
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for r in self._tables.values():
                r.close()
            self._tables.clear()
            self._chunk_cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_pid", "_fds", "_tables", "_chunk_cache", "_lock"):
            del state[k]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()
