"""From a shard spec to a manifest: find one, check it, index only what it lacks.

Where a manifest is looked for, in order:

1. the spec itself, when it names a manifest (``.../mmload.index.json``, local or remote);
2. ``mmload.index.json`` in the directory (URL prefix) that holds all the shards;
3. this data set's copy in ``<cache_dir>/manifests/`` from an earlier run.

A local shard's record is used while its size and mtime are unchanged (one ``stat`` each); a
remote shard's record is trusted at start-up and its size and ETag are checked against the
server when it is fetched. Shards without a usable record are indexed: local ones in place,
remote ones by fetching them whole, once, into the shard cache (sequential reads, no Range
needed), and the completed manifest is saved to the cache for the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmload.errors import BadEntry, ConfigError, ShardError
from mmload.sources.cache import Need, ShardCache
from mmload.sources.fetch import download, stat_remote
from mmload.sources.index import IndexStore, ShardIndex, fields_of, index_digest, local_version
from mmload.sources.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardRecord,
    common_base,
    field_summary,
    join,
    manifest_base,
)
from mmload.sources.spec import ShardSpec, expand, is_local, kind_of, local_path
from mmload.sources.tar import TarIndex

__all__ = ["Catalog", "in_cache", "resolve"]

log = logging.getLogger(__name__)


def in_cache(spec: ShardSpec) -> bool:
    """Whether the shard is read from the shard cache (remote, piped or compressed)."""
    return not is_local(spec.url) or spec.compressed


def _norm(url: str) -> str:
    return os.path.normpath(local_path(url)) if is_local(url) else url


def _shard_entry(url: str, e: ShardError) -> BadEntry:
    """A shard left out whole is listed for the shard (key None): every sample of it is lost,
    not only the one the error names."""
    where = f" (at key {e.key!r})" if e.key is not None else ""
    return BadEntry(url, None, f"shard left out: {e.reason}{where}")


def _read_manifest(url: str, cache: ShardCache, *, required: bool) -> Manifest | None:
    """The manifest at ``url`` (local or remote), or None when it does not exist and is not
    ``required``."""
    base = manifest_base(url)
    if is_local(url):
        path = local_path(url)
        if not os.path.isfile(path):
            if required:
                raise ShardError("manifest not found", shard=url)
            return None
        return Manifest.read(path, base=os.path.dirname(path) or ".", where=url)
    name = "remote-" + hashlib.sha256(url.encode()).hexdigest()[:24] + ".json"
    target = cache.root.parent / "manifests" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(url, target, cache.cfg)
    except ShardError as e:
        if not required and "not found" in e.reason:
            return None
        raise
    return Manifest.read(str(target), base=base, where=url)


class Catalog:
    """The resolved data set: shard specs in spec order and the manifest covering them."""

    def __init__(
        self, specs: list[ShardSpec], manifest: Manifest, built: int, cache_file: Path
    ) -> None:
        self.specs = specs
        self.manifest = manifest
        self.built = built  # shards indexed in this call (0: everything came from a manifest)
        self.cache_file = cache_file  # where this data set's manifest is cached


def resolve(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    key_column: str | None,
    skip_bad: bool,
    cache_dir: Path,
    use_cache: bool,
    allow_pipe: bool,
    store: IndexStore,
    cache: ShardCache,
) -> Catalog:
    """Expand ``spec``, find its manifest, index what it lacks (see the module docstring)."""
    found: dict[str, ShardRecord] = {}
    found_bad: list[BadEntry] = []
    explicit = None
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(MANIFEST_NAME):
        explicit = os.fspath(spec)
        man = _read_manifest(explicit, cache, required=True)
        assert man is not None
        if man.key_column != key_column:
            raise ConfigError(
                f"manifest {explicit} was written with key_column={man.key_column!r}, this "
                f"loader has key_column={key_column!r}: run `mmload index` with it"
            )
        urls = [r.url for r in man.records]
        specs = [ShardSpec(r.url, r.kind) for r in man.records]  # type: ignore[arg-type]
        manifests = [man]
    else:
        specs = expand(spec, allow_pipe=allow_pipe)
        urls = [sp.url for sp in specs]
        manifests = []
        base = common_base(urls)
        if base is not None and not urls[0].startswith("pipe:"):
            try:
                man = _read_manifest(join(base, MANIFEST_NAME), cache, required=False)
            except ShardError as e:
                log.warning("ignoring the manifest next to the shards: %s", e)
                man = None
            if man is not None:
                manifests.append(man)
    ident = json.dumps([[_norm(u) for u in urls], key_column, skip_bad])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
    cached_file = cache_dir / "manifests" / f"{digest}.json"
    if use_cache and explicit is None and cached_file.exists():
        try:
            manifests.append(Manifest.read(str(cached_file), base=None, where=str(cached_file)))
        except ShardError as e:
            log.warning("ignoring the cached manifest: %s", e)
    for man in manifests:
        if man.key_column != key_column:
            continue
        for r in man.records:
            found.setdefault(_norm(r.url), r)
        found_bad += man.bad
        if man.skip and not skip_bad and man.bad:
            b = man.bad[0]
            raise ShardError(
                f"the manifest lists {len(man.bad)} bad shards/samples (indexed with "
                f"on_error='skip'); first: {b.reason}",
                shard=b.shard,
                key=b.key,
            )

    records: list[ShardRecord | BadEntry | None] = []
    todo: list[int] = []
    for i, sp in enumerate(specs):
        rec = found.get(_norm(sp.url))
        if rec is not None and is_local(sp.url):  # a stat tells whether it changed
            try:
                if sp.compressed:  # the record holds what download saw: the .gz file's version
                    version = stat_remote(sp.url, cache.cfg).version
                else:
                    version = local_version(local_path(sp.url), sp.url)[1]
            except ShardError as e:
                if not skip_bad:
                    raise
                records.append(_shard_entry(sp.url, e))
                continue
            if version != rec.version:
                log.info("shard %s changed since it was indexed: indexing it again", sp.url)
                rec = None
        if rec is not None:
            rec.url = sp.url
        records.append(rec)
        if rec is None:
            todo.append(i)

    def index_one(i: int) -> ShardRecord | BadEntry:
        sp = specs[i]
        try:
            return _index_shard(sp, store, cache)
        except ShardError as e:
            if not skip_bad:
                raise
            return _shard_entry(sp.url, e)

    remote = [i for i in todo if in_cache(specs[i])]
    local = [i for i in todo if not in_cache(specs[i])]
    if remote:
        if explicit is None and not found:
            log.info(
                "no manifest for %d remote shards: indexing them by fetching each whole, once "
                "(`mmload index` writes a manifest so that the next start reads only it)",
                len(remote),
            )
        with ThreadPoolExecutor(max(1, min(cache.cfg.fetchers, len(remote)))) as pool:
            for i, got in zip(remote, pool.map(index_one, remote), strict=True):
                records[i] = got
    for i in local:  # GIL-bound Python work on small reads: one thread is fastest
        records[i] = index_one(i)

    good = [r for r in records if isinstance(r, ShardRecord)]
    left_out = [r for r in records if isinstance(r, BadEntry)]
    # A manifest's bad entries stand for the shards whose records were reused; a shard indexed
    # again brings its own (r.bad). Two manifests may list the same entry: once.
    reused = {_norm(specs[i].url) for i, r in enumerate(records) if isinstance(r, ShardRecord)}
    reused -= {_norm(specs[i].url) for i in todo}
    bad = list(dict.fromkeys(b for b in found_bad if _norm(b.shard) in reused)) + left_out
    for r in good:
        bad += r.bad
    man = Manifest(good, key_column, skip_bad, bad, field_summary(good, key_column))
    if todo and use_cache:
        try:
            man.write(str(cached_file))
        except OSError as e:
            log.warning("cannot write the manifest cache %s: %s", cached_file, e)
    keep = [sp for sp, r in zip(specs, records, strict=True) if isinstance(r, ShardRecord)]
    return Catalog(keep, man, len(todo), cached_file)


def _index_shard(sp: ShardSpec, store: IndexStore, cache: ShardCache) -> ShardRecord:
    if in_cache(sp):
        # The object's current size and version (one HEAD): a stale cached copy is not reused.
        now = stat_remote(sp.url, cache.cfg) if not sp.url.startswith("pipe:") else None
        # Pinned while it is indexed: a concurrent fetch under cache_limit cannot evict it.
        need = Need(
            sp.url,
            now.size if now is not None else None,
            now.version if now is not None else None,
            sp.compressed,
            0,
            0,
        )
        path = cache.acquire(need)
        try:
            return _record(sp, path, store, cache)
        finally:
            cache.release(sp.url)
    path = local_path(sp.url)
    size, version = local_version(path, sp.url)
    return _record(sp, path, store, None, size=size, version=version)


def _record(
    sp: ShardSpec,
    path: str,
    store: IndexStore,
    cache: ShardCache | None,
    *,
    size: int | None = None,
    version: str | None = None,
) -> ShardRecord:
    if cache is not None:
        obj = cache.remote_object(sp.url)
        size = obj.size if obj is not None and obj.size is not None else os.path.getsize(path)
        version = obj.version if obj is not None else None
    assert size is not None
    kind = sp.kind if sp.kind else kind_of(sp.url)
    index: ShardIndex = store.build(path, kind, url=sp.url, version=version or f"size:{size}")
    return ShardRecord(
        url=sp.url,
        kind=kind,
        size=size,
        version=version,
        num_samples=index.num_samples,
        chunk_rows=None if isinstance(index, TarIndex) else [int(x) for x in index.chunk_rows],
        fields=fields_of(index),
        digest=index_digest(index),
        bad=list(index.bad) if isinstance(index, TarIndex) else [],
        ignored=len(index.ignored) if isinstance(index, TarIndex) else 0,
    )
