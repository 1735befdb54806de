"""Shard indexes: built once (header scan / footer read), cached per shard, loaded on demand.

A shard's member table (:class:`TarIndex`: keys and member offsets; :class:`TableIndex`: rows
per chunk, columns and types) is built from its local file: a local shard in place, a remote
one from its copy in the shard cache. Each is cached in its own file,
``<cache_dir>/index/<hash>.json``, valid while the shard's version (local: size and mtime;
remote: size and ETag) is unchanged, and loaded only when the shard is read; a process keeps
at most ``max_loaded`` of them in memory. A DALI ``.idx`` file next to a tar
(``train-000.idx`` or ``train-000.tar.idx``: the name with its last extension or with
``.idx`` added) is used instead of scanning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from mmload.errors import ShardError
from mmload.sources.arrow import TableIndex, index_table
from mmload.sources.tar import TarIndex, read_dali_idx, scan_tar

__all__ = [
    "IndexStore",
    "ShardIndex",
    "build_index",
    "fields_of",
    "index_digest",
    "local_version",
]

log = logging.getLogger(__name__)
_VERSION = 6  # 5: one file per shard; 6: non-sample tar members are ignored, not errors

ShardIndex = TarIndex | TableIndex


def _dali_idx_for(path: str) -> str | None:
    # ``train.000.tar`` -> ``train.000.tar.idx`` or ``train.000.idx``: only the last extension
    # goes (a dot that starts the file name is part of it, not an extension).
    name_start = path.rfind("/") + 1
    dot = path.rfind(".", name_start + 1)
    candidates = [path + ".idx"] + ([path[:dot] + ".idx"] if dot > name_start else [])
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def local_version(path: str, shard: str) -> tuple[int, str]:
    """(size, version) of a local shard file: the version changes with its size or mtime. It
    starts with ``mtime:``: a copy of the file served elsewhere is checked by size only."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError("shard file not found", shard=shard) from None
    return st.st_size, f"mtime:{st.st_size}:{st.st_mtime_ns}"


def build_index(
    path: str, kind: str, *, shard: str, key_column: str | None, skip: bool
) -> ShardIndex:
    """Index the local shard file ``path`` (``shard`` is its name in errors); no cache."""
    if kind == "tar":
        idx = _dali_idx_for(path)
        if idx is not None:
            return read_dali_idx(idx, path, shard=shard)
        return scan_tar(path, shard=shard, skip=skip)
    return index_table(path, kind, shard=shard, key_column=key_column)


def fields_of(index: ShardIndex) -> dict[str, Any]:
    """A shard's fields for the manifest: tar {member field: samples}, table {column: type}."""
    if isinstance(index, TarIndex):
        return dict(Counter(index.fields))
    return dict(zip(index.columns, index.types, strict=True))


def index_digest(index: ShardIndex) -> str:
    """A short hash of a member table (keys, member offsets and sizes; or rows per chunk and
    column types): two files with the same table hold the same samples at the same places."""
    h = hashlib.sha256()
    if isinstance(index, TarIndex):
        h.update("\0".join(index.keys).encode("utf-8", "surrogateescape"))
        h.update("\0".join(index.fields).encode("utf-8", "surrogateescape"))
        for a in (index.starts, index.offsets, index.sizes):
            h.update(a.astype("<i8").tobytes())
    else:
        h.update(index.chunk_rows.astype("<i8").tobytes())
        h.update(json.dumps([index.columns, index.types]).encode())
    return h.hexdigest()[:24]


class IndexStore:
    """Per-shard index files under ``<cache_dir>/index`` (None: memory only) and a bounded LRU
    of loaded indexes, shared by the threads of a process."""

    def __init__(
        self,
        cache_dir: Path | None,
        *,
        key_column: str | None,
        skip: bool,
        max_loaded: int = 512,
    ) -> None:
        self.dir = cache_dir / "index" if cache_dir is not None else None
        self.key_column = key_column
        self.skip = skip
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple[str | None, ShardIndex]] = OrderedDict()
        self._lock = threading.Lock()

    def _file(self, url: str) -> Path | None:
        if self.dir is None:
            return None
        ident = json.dumps([url, self.key_column, self.skip])
        return self.dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"

    def cached(self, url: str, version: str | None) -> ShardIndex | None:
        """The index of ``url`` at ``version`` if it is in memory or on disk."""
        with self._lock:
            hit = self._loaded.get(url)
            if hit is not None and hit[0] == version:
                self._loaded.move_to_end(url)
                return hit[1]
        f = self._file(url)
        if f is None or version is None or not f.exists():
            return None
        try:
            with open(f, encoding="utf-8") as fh:
                d = json.load(fh)
            if d.get("v") != _VERSION or d.get("version") != version:
                return None
            body = d["index"]
            index = TarIndex.from_json(body) if d["kind"] == "tar" else TableIndex.from_json(body)
        except (OSError, KeyError, TypeError, ValueError) as e:
            log.warning("ignoring an unreadable index file %s: %s", f, e)
            return None
        self._keep(url, version, index)
        return index

    def build(self, path: str, kind: str, *, url: str, version: str | None) -> ShardIndex:
        """Index the local file ``path`` holding shard ``url`` at ``version`` and cache it."""
        index = build_index(path, kind, shard=url, key_column=self.key_column, skip=self.skip)
        self._keep(url, version, index)
        f = self._file(url)
        if f is not None and version is not None:
            payload = {"v": _VERSION, "version": version, "kind": kind, "index": index.to_json()}
            try:
                f.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".idx-")
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(payload, fh, separators=(",", ":"))
                os.replace(tmp, f)
            except OSError as e:
                log.warning("cannot write index file %s (%s); it is rebuilt next time", f, e)
        return index

    def forget(self, url: str) -> None:
        """Drop ``url``'s table from memory and disk (it did not match its manifest)."""
        with self._lock:
            self._loaded.pop(url, None)
        f = self._file(url)
        if f is not None:
            f.unlink(missing_ok=True)

    def _keep(self, url: str, version: str | None, index: ShardIndex) -> None:
        with self._lock:
            self._loaded[url] = (version, index)
            self._loaded.move_to_end(url)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_loaded"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def loaded(self) -> int:
        return len(self._loaded)
