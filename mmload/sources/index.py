"""Shard indexes: built once (header scan / footer read), cached on disk, validated by stat.

A cached index lives in ``<cache_dir>/index/<hash>.json`` and is reused while the shard's size
and mtime are unchanged. A DALI ``.idx`` file next to a tar (``train-000.idx`` or
``train-000.tar.idx``) is used instead of scanning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from mmload.errors import ShardError
from mmload.sources.arrow import TableIndex, index_table
from mmload.sources.tar import TarIndex, read_dali_idx, scan_tar

__all__ = ["ShardIndex", "load_index"]

log = logging.getLogger(__name__)
_VERSION = 2

ShardIndex = TarIndex | TableIndex


def _dali_idx_for(path: str) -> str | None:
    name_start = path.rfind("/") + 1
    dot = path.find(".", name_start + 1)
    candidates = [path + ".idx"] + ([path[:dot] + ".idx"] if dot > 0 else [])
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def _cache_file(cache_dir: Path, path: str, kind: str, key_column: str | None, skip: bool) -> Path:
    ident = f"{os.path.abspath(path)}\0{kind}\0{key_column}\0{skip}"
    return cache_dir / "index" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"


def _stat_id(path: str, shard: str) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError("shard file not found", shard=shard) from None
    return [st.st_size, st.st_mtime_ns]


def load_index(
    path: str,
    kind: str,
    *,
    shard: str,
    key_column: str | None,
    skip: bool,
    cache_dir: Path | None,
) -> ShardIndex:
    """The index of the local shard file ``path`` (``shard`` is its name in errors)."""
    stat = _stat_id(path, shard)
    cfile = _cache_file(cache_dir, path, kind, key_column, skip) if cache_dir else None
    if cfile is not None and cfile.exists():
        try:
            with open(cfile, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("version") == _VERSION and d.get("stat") == stat:
                body = d["index"]
                return TarIndex.from_json(body) if kind == "tar" else TableIndex.from_json(body)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable index cache %s: %s", cfile, e)
    index: ShardIndex
    if kind == "tar":
        idx = _dali_idx_for(path)
        if idx is not None:
            index = read_dali_idx(idx, path, shard=shard)
        else:
            index = scan_tar(path, shard=shard, skip=skip)
    else:
        index = index_table(path, kind, shard=shard, key_column=key_column)
    if cfile is not None:
        _write_cache(cfile, {"version": _VERSION, "stat": stat, "index": index.to_json()})
    return index


def _write_cache(cfile: Path, payload: dict[str, object]) -> None:
    try:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cfile.parent, prefix=".idx-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, cfile)
    except OSError as e:
        log.warning("cannot write index cache %s (%s); indexes will be rebuilt next run", cfile, e)
