"""The manifest: what the plan needs about every shard, in one small file, O(shards).

``mmload.index.json`` (written by ``mmload index``, next to the shards or wherever
``--output`` says; a copy is kept in ``<cache_dir>/manifests/``) holds, per shard: its URL
(relative to the manifest when it sits next to the shards), format, size, version (ETag or
mtime), sample count and, for Parquet/Arrow, the rows of each row group / record batch; and,
for the data set: the fields (the union over shards, with Arrow types and sample counts) and
the bad samples indexing found. A remote data set with a manifest starts after reading it
alone. Member tables (tar member offsets) are not in it: they are built per shard from the
local copy when the shard is first read, and cached per shard (:mod:`mmload.sources.index`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmload.errors import BadEntry, ShardError

__all__ = ["MANIFEST_NAME", "FieldInfo", "Manifest", "ShardRecord", "field_summary"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "mmload.index.json"
_FORMAT = "mmload.manifest"
_VERSION = 1


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
class ShardRecord:
    """One shard as the manifest knows it."""

    url: str
    kind: str
    size: int
    version: str | None
    num_samples: int
    chunk_rows: list[int] | None  # Parquet/Arrow: rows per chunk; tar: None (one chunk)
    fields: dict[str, Any]  # tar: {member field: samples with it}; table: {column: arrow type}
    digest: str | None = None  # of the member table: tells a changed copy by its content
    ignored: int = 0  # tar members that belong to no sample (README, .DS_Store): left out
    bad: list[BadEntry] = field(default_factory=list, repr=False)  # found indexing (not saved)

    @property
    def index_version(self) -> str:
        """The key of its cached member table: the version, else the size."""
        return self.version if self.version is not None else f"size:{self.size}"


def field_summary(records: Sequence[ShardRecord], key_column: str | None) -> dict[str, FieldInfo]:
    """The fields of the data set: the union over all shards, in order of first appearance, so a
    field absent from the first sample is still found (the key column excluded)."""
    out: dict[str, FieldInfo] = {}
    for r in records:
        table = r.kind != "tar"
        for name, v in r.fields.items():
            if table and name == key_column:
                continue
            count = r.num_samples if table else int(v)
            typ = str(v) if table else None
            fi = out.get(name)
            if fi is None:
                out[name] = FieldInfo(name, typ, count, r.url)
                continue
            fi.samples += count
            if fi.arrow_type is None:
                fi.arrow_type = typ
            elif typ is not None and typ != fi.arrow_type:
                fi.other_types.append((r.url, typ))
    return out


def _is_relative(url: str) -> bool:
    return "://" not in url and not url.startswith(("/", "pipe:"))


def join(base: str, name: str) -> str:
    """``name`` resolved against the directory (or URL prefix) ``base``."""
    if not _is_relative(name):
        return name
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def common_base(urls: Sequence[str]) -> str | None:
    """The directory (URL prefix) that holds every shard, if they share one."""
    parents = {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}
    if len(parents) != 1:
        return None
    return parents.pop()


@dataclass
class Manifest:
    """Every shard's record plus the data set's fields and bad samples."""

    records: list[ShardRecord]
    key_column: str | None
    skip: bool
    bad: list[BadEntry] = field(default_factory=list)
    fields: dict[str, FieldInfo] = field(default_factory=dict)

    def to_json(self, base: str | None = None) -> dict[str, Any]:
        """Columnar JSON; shard URLs under ``base`` are written relative to it."""

        def rel(u: str) -> str:
            if base is None:
                return u
            prefix = base.rstrip("/") + "/"
            return u[len(prefix) :] if u.startswith(prefix) else u

        rs = self.records
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "key_column": self.key_column,
            "skip_bad": self.skip,
            "num_shards": len(rs),
            "num_samples": int(sum(r.num_samples for r in rs)),
            "shards": {
                "url": [rel(r.url) for r in rs],
                "kind": [r.kind for r in rs],
                "size": [r.size for r in rs],
                "version": [r.version for r in rs],
                "samples": [r.num_samples for r in rs],
                "chunk_rows": [r.chunk_rows for r in rs],
                "fields": [r.fields for r in rs],
                "digest": [r.digest for r in rs],
                "ignored": [r.ignored for r in rs],
            },
            "fields": [
                {
                    "name": f.name,
                    "arrow_type": f.arrow_type,
                    "samples": f.samples,
                    "first_shard": rel(f.first_shard),
                    "other_types": [[rel(s), t] for s, t in f.other_types],
                }
                for f in self.fields.values()
            ],
            "bad": [{**b.as_dict(), "shard": rel(b.shard)} for b in self.bad],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], base: str | None, where: str) -> Manifest:
        try:
            if d.get("format") != _FORMAT or d.get("version") != _VERSION:
                raise ValueError(
                    f"not an mmload manifest of version {_VERSION} "
                    f"(format={d.get('format')!r}, version={d.get('version')!r})"
                )
            s = d["shards"]
            n = len(s["url"])
            cols = ("kind", "size", "version", "samples", "chunk_rows", "fields")
            if any(len(s[c]) != n for c in cols):
                raise ValueError("shard columns of different lengths")

            def full(u: str) -> str:
                return join(base, u) if base is not None else u

            records = []
            for i in range(n):
                rows = s["chunk_rows"][i]
                rec = ShardRecord(
                    url=full(str(s["url"][i])),
                    kind=str(s["kind"][i]),
                    size=int(s["size"][i]),
                    version=None if s["version"][i] is None else str(s["version"][i]),
                    num_samples=int(s["samples"][i]),
                    chunk_rows=None if rows is None else [int(x) for x in rows],
                    fields=dict(s["fields"][i]),
                    digest=s["digest"][i] if "digest" in s else None,
                    ignored=int(s["ignored"][i]) if "ignored" in s else 0,
                )
                if rec.kind not in ("tar", "parquet", "arrow", "json") or rec.num_samples < 0:
                    raise ValueError(f"shard {i}: bad kind or sample count")
                if rec.chunk_rows is not None and sum(rec.chunk_rows) != rec.num_samples:
                    raise ValueError(f"shard {i}: chunk rows do not add up to its samples")
                records.append(rec)
            fields = {
                f["name"]: FieldInfo(
                    f["name"],
                    f["arrow_type"],
                    int(f["samples"]),
                    full(f["first_shard"]),
                    [(full(a), b) for a, b in f["other_types"]],
                )
                for f in d["fields"]
            }
            bad = [BadEntry(**{**b, "shard": full(b["shard"])}) for b in d["bad"]]
            return cls(records, d["key_column"], bool(d["skip_bad"]), bad, fields)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ShardError(f"unreadable manifest: {type(e).__name__}: {e}", shard=where) from None

    # -- files --------------------------------------------------------------------------------

    def write(self, target: str, *, relative_to: str | None = None) -> None:
        """Write to a local path or any fsspec URL (atomically for local paths)."""
        text = json.dumps(self.to_json(relative_to), separators=(",", ":"))
        if "://" in target and not target.startswith("file://"):
            import fsspec

            with fsspec.open(target, "w", encoding="utf-8") as f:
                f.write(text)
            return
        path = Path(target[len("file://") :] if target.startswith("file://") else target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str, *, base: str | None, where: str) -> Manifest:
        """Read a local manifest file (``where``: its name in errors)."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ShardError(f"unreadable manifest: {e}", shard=where) from None
        return cls.from_json(d, base, where)

    def counts(self) -> np.ndarray:
        return np.fromiter((r.num_samples for r in self.records), np.int64, len(self.records))


def manifest_base(url: str) -> str:
    """The directory or URL prefix a manifest at ``url`` sits in."""
    if "://" in url:
        return url.rsplit("/", 1)[0]
    return posixpath.dirname(os.path.abspath(url))
