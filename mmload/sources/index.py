"""Shard indexes: built once (header scan / footer read), cached on disk, validated by stat.

The cache is one JSON file per data set (``<cache_dir>/index/<hash of the shard list>.json``):
one file to read, however many shards, which is what makes a cached start fast. Each shard's
entry is reused while the shard's size and mtime are unchanged; changed shards are re-indexed
and the file rewritten. A DALI ``.idx`` file next to a tar (``train-000.idx`` or
``train-000.tar.idx``) is used instead of scanning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from mmload.errors import ShardError
from mmload.sources.arrow import TableIndex, index_table
from mmload.sources.tar import TarIndex, read_dali_idx, scan_tar

__all__ = ["IndexCache", "ShardIndex", "build_index"]

log = logging.getLogger(__name__)
_VERSION = 4  # 4: Arrow column types in TableIndex

ShardIndex = TarIndex | TableIndex


def _dali_idx_for(path: str) -> str | None:
    name_start = path.rfind("/") + 1
    dot = path.find(".", name_start + 1)
    candidates = [path + ".idx"] + ([path[:dot] + ".idx"] if dot > 0 else [])
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def stat_id(path: str, shard: str) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError("shard file not found", shard=shard) from None
    return [st.st_size, st.st_mtime_ns]


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


class IndexCache:
    """The on-disk index cache of one data set (a list of local shard files)."""

    def __init__(
        self, cache_dir: Path | None, paths: list[str], *, key_column: str | None, skip: bool
    ) -> None:
        self.file: Path | None = None
        self._entries: dict[str, Any] = {}
        self._dirty = False
        if cache_dir is None:
            return
        cwd = os.getcwd()  # once: getcwd is a syscall, and this runs for every shard
        ident = json.dumps([[os.path.join(cwd, p) for p in paths], key_column, skip])
        self.file = cache_dir / "index" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"
        if self.file.exists():
            try:
                with open(self.file, encoding="utf-8") as f:
                    d = json.load(f)
                if d.get("version") == _VERSION:
                    self._entries = d["shards"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable index cache %s: %s", self.file, e)

    def load(
        self, path: str, kind: str, *, shard: str, key_column: str | None, skip: bool
    ) -> ShardIndex:
        """The cached index of ``path`` if its stat matches, else a freshly built one."""
        stat = stat_id(path, shard)
        hit = self._entries.get(path)
        if hit is not None and hit.get("stat") == stat and hit.get("kind") == kind:
            try:
                body = hit["index"]
                return TarIndex.from_json(body) if kind == "tar" else TableIndex.from_json(body)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignoring a bad index cache entry for %s: %s", path, e)
        index = build_index(path, kind, shard=shard, key_column=key_column, skip=skip)
        self._entries[path] = {"stat": stat, "kind": kind, "index": index.to_json()}
        self._dirty = True
        return index

    def save(self) -> None:
        if self.file is None or not self._dirty:
            return
        payload = json.dumps({"version": _VERSION, "shards": self._entries}, separators=(",", ":"))
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".idx-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
            os.replace(tmp, self.file)
            self._dirty = False
        except OSError as e:
            log.warning(
                "cannot write index cache %s (%s); indexes are rebuilt next run", self.file, e
            )
