"""``mmload.sources.Dataset`` on its own: the chunk table against a brute-force expansion, id
lookup, reads of tar and table shards, shards that changed since their manifest, the bounded
open files, private copies, pickling, close, and the pins of remote shards (a loopback HTTP
server)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmload.config import RemoteConfig
from mmload.errors import ConfigError, ShardError
from mmload.sources import Dataset
from mmload.sources import dataset as dataset_mod
from mmload.sources.manifest import Manifest
from mmload.sources.tar import TarIndex
from mmload.sources.write import write_parquet, write_tar_shards
from tests.remote import servers
from tests.remote.servers import FileServer

range_server = servers.range_server


def tar_shard(d: Path, name: str, n: int) -> str:
    rows = [{"__key__": f"{name}{i:03d}", "txt": f"{name}-{i}", "cls": str(i)} for i in range(n)]
    d.mkdir(parents=True, exist_ok=True)
    (path,) = write_tar_shards(rows, str(d / f"{name}-%d.tar"), maxcount=max(n, 1))
    return path


def table_shard(d: Path, name: str, n: int, group: int) -> str:
    rows = [{"__key__": f"{name}{i:03d}", "txt": f"{name}-{i}", "x": i} for i in range(n)]
    d.mkdir(parents=True, exist_ok=True)
    return write_parquet(rows, str(d / f"{name}.parquet"), row_group_size=group)


def expanded(ds: Dataset) -> list[tuple[int, int, int]]:
    """(chunk, shard, row) of every global id, from the manifest's records alone."""
    out = []
    chunk = 0
    for s, r in enumerate(ds.manifest.records):
        rows = r.chunk_rows if r.chunk_rows is not None else [r.num_samples]
        first = 0
        for n in rows:
            out += [(chunk, s, first + i) for i in range(n)]
            first += n
            chunk += 1
    return out


def test_the_chunk_table_of_tar_shards(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path, "a", 3), tar_shard(tmp_path, "b", 5), tar_shard(tmp_path, "c", 2)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "cache")
    assert ds.num_shards == 3 and ds.num_samples == 10 and type(ds.num_samples) is int
    assert ds.chunk_counts.tolist() == [3, 5, 2]
    assert ds.chunk_shard.tolist() == [0, 1, 2] and ds.chunk_first_row.tolist() == [0, 0, 0]
    assert ds.chunk_start.tolist() == [0, 3, 8, 10]
    assert ds.chunk_shard.dtype == np.int64 and ds.chunk_first_row.dtype == np.int64
    assert ds.chunk_start.dtype == np.int64
    chunk, shard, row = ds.locate(np.arange(10))
    assert list(zip(chunk.tolist(), shard.tolist(), row.tolist(), strict=True)) == expanded(ds)
    assert ds.remote.tolist() == [False] * 3 and ds.shard_url(1) == paths[1]
    ds.close()


def test_the_chunk_table_of_mixed_shards(tmp_path: Path) -> None:
    paths = [
        tar_shard(tmp_path, "a", 3),
        table_shard(tmp_path, "p", 7, group=3),  # row groups 3, 3, 1
        tar_shard(tmp_path, "b", 2),
        table_shard(tmp_path, "q", 4, group=4),
    ]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "cache")
    assert ds.chunk_counts.tolist() == [3, 3, 3, 1, 2, 4]
    assert ds.chunk_shard.tolist() == [0, 1, 1, 1, 2, 3]
    assert ds.chunk_first_row.tolist() == [0, 0, 3, 6, 0, 0]
    assert ds.chunk_start.tolist() == [0, 3, 6, 9, 10, 12, 16]
    for a in (ds.chunk_counts, ds.chunk_first_row, ds.chunk_start):
        assert a.dtype == np.int64
    assert ds._shard_first_chunk.tolist() == [0, 1, 4, 5]
    ids = np.random.default_rng(0).permutation(16)
    chunk, shard, row = ds.locate(ids)
    want = expanded(ds)
    got = list(zip(chunk.tolist(), shard.tolist(), row.tolist(), strict=True))
    assert got == [want[i] for i in ids.tolist()]
    # every sample, read in a shuffled batch, is the row the table says
    for gid, smp in zip(ids.tolist(), ds.read(ids), strict=True):
        assert isinstance(smp, dict)
        _c, s, r = want[gid]
        name = "apbq"[s]
        txt = smp["txt"] if isinstance(smp["txt"], str) else bytes(smp["txt"]).decode()
        assert smp["__key__"] == f"{name}{r:03d}" and txt == f"{name}-{r}"
        assert smp["__shard__"] == paths[s] and smp["__id__"] == gid
        assert type(smp["__id__"]) is int
    ds.close()


def test_table_rows_without_a_key_column_are_keyed_by_their_id(tmp_path: Path) -> None:
    paths = [table_shard(tmp_path, "p", 5, group=2), table_shard(tmp_path, "q", 3, group=2)]
    ds = Dataset.open(paths, key_column=None, index_cache=False, cache_dir=tmp_path / "c")
    got = ds.read(np.array([6, 0, 3]))
    assert [g["__key__"] for g in got] == ["6", "0", "3"]  # type: ignore[index]
    assert [g["x"] for g in got] == [1, 0, 3]  # type: ignore[index]
    keyed = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    assert [g["__key__"] for g in keyed.read(np.array([6, 0]))] == ["q001", "p000"]  # type: ignore[index]
    only = keyed.read(np.array([1]), {"x"})[0]
    assert isinstance(only, dict) and "txt" not in only and only["x"] == 1
    ds.close()
    keyed.close()


def test_a_table_shard_that_cannot_be_read_fails_its_samples_only(tmp_path: Path) -> None:
    paths = [table_shard(tmp_path, "p", 4, group=2), tar_shard(tmp_path, "a", 2)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    os.unlink(paths[0])
    got = ds.read(np.array([4, 0, 3, 5]))
    assert isinstance(got[0], dict) and isinstance(got[3], dict)
    for g in (got[1], got[2]):
        assert isinstance(g, ShardError) and g.shard == paths[0]
    ds.close()


def test_a_shard_that_changed_since_its_manifest_is_refused(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path / "d", "a", 4)]
    ds = Dataset.open(paths, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "index").glob("*.json"))  # its member table, on disk
    rows = [{"__key__": f"z{i:03d}", "txt": "t", "cls": "c"} for i in range(4)]
    os.unlink(paths[0])
    write_tar_shards(rows, str(tmp_path / "d" / "a-%d.tar"), maxcount=4)  # same count, new keys
    # a copy seen under another version (a remote object's new ETag): its table is built again
    ds.records[0].version = "etag-2"
    with pytest.raises(ShardError) as e:
        ds.index(0)
    assert e.value.shard == paths[0]
    assert e.value.reason == (
        "the shard changed since it was indexed: its member table (keys, offsets) differs "
        "from the manifest's; run `mmload index` again"
    )
    assert ds.store.cached(paths[0], "etag-2") is None  # forgotten, in memory and on disk
    assert not list((tmp_path / "cache" / "index").glob("*.json"))
    # without a digest in the record, the sample count is still checked
    write_tar_shards(rows[:3], str(tmp_path / "d" / "a-%d.tar"), maxcount=4)
    ds.records[0].digest = None
    ds.records[0].version = "etag-3"
    with pytest.raises(ShardError) as e:
        ds.index(0)
    assert e.value.reason == (
        "the shard changed since it was indexed: the manifest says 4 samples, the shard has 3; "
        "run `mmload index` again"
    )
    assert e.value.shard == paths[0]
    got = ds.read(np.array([1]))[0]
    assert isinstance(got, ShardError) and "manifest says 4 samples" in str(got)
    ds.close()


def test_the_index_is_built_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [tar_shard(tmp_path, "a", 4)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    builds: list[str] = []
    real = ds.store.build

    def build(path: str, kind: str, *, url: str, version: str | None) -> Any:
        builds.append(version or "")
        return real(path, kind, url=url, version=version)

    monkeypatch.setattr(ds.store, "build", build)
    ds.store.forget(paths[0])
    a = ds.index(0)
    assert ds.index(0) is a and isinstance(a, TarIndex)
    assert builds == [ds.records[0].index_version]
    ds.close()


def test_open_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_mod, "_MAX_OPEN_FILES", 2)
    tars = [tar_shard(tmp_path, n, 2) for n in "abc"]
    tables = [table_shard(tmp_path, n, 2, group=1) for n in "pqr"]
    ds = Dataset.open(tars + tables, index_cache=False, cache_dir=tmp_path / "c")
    ds.read(np.array([0]))
    first = ds._fds[0]
    ds.read(np.array([2]))
    ds.read(np.array([1]))  # shard 0 again: now the most recent
    assert list(ds._fds) == [1, 0]
    ds.read(np.array([4]))  # shard 2: shard 1 is closed
    assert list(ds._fds) == [0, 2] and ds._fds[0] is first
    ds.read(np.array([6]))
    ds.read(np.array([8]))
    ds.read(np.array([7]))  # table shard 3 again
    assert list(ds._tables) == [4, 3]
    ds.read(np.array([10]))
    assert list(ds._tables) == [3, 5]
    # a batch over more tar shards than are kept open: every sample is its own shard's
    ids = np.random.default_rng(1).permutation(12)
    got = ds.read(ids)
    names = "aabbccppqqrr"
    for gid, g in zip(ids.tolist(), got, strict=True):
        assert isinstance(g, dict) and g["__key__"] == f"{names[gid]}{gid % 2:03d}"
        txt = g["txt"] if isinstance(g["txt"], str) else bytes(g["txt"]).decode()
        assert txt == f"{names[gid]}-{gid % 2}"
    assert len(ds._fds) == 2 and len(ds._tables) == 2
    ds.close()
    assert ds._fds == {} and ds._tables == {}


def test_a_batch_over_more_tar_shards_than_stay_open(tmp_path: Path) -> None:
    """A whole-data-set shuffle over small shards: one batch reads more shards than the
    descriptor LRU keeps open (256), and each sample still holds its own shard's bytes (closing
    a descriptor the batch was about to copy from let the next open reuse its number, and the
    sample read another shard's bytes)."""
    n = dataset_mod._MAX_OPEN_FILES + 44
    rows = [{"__key__": f"k{i:05d}", "txt": f"t{i}"} for i in range(2 * n)]
    paths = write_tar_shards(rows, str(tmp_path / "s-%04d.tar"), maxcount=2)
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    ids = np.random.default_rng(0).permutation(2 * n)
    for fields in (None, {"txt"}):
        got = ds.read(ids, fields)
        for gid, g in zip(ids.tolist(), got, strict=True):
            assert isinstance(g, dict) and g["__shard__"] == paths[gid // 2]
            assert (g["__key__"], bytes(g["txt"])) == (f"k{gid:05d}", f"t{gid}".encode())
    assert len(ds._fds) == dataset_mod._MAX_OPEN_FILES
    ds.close()


def test_a_shard_removed_after_indexing_fails_with_the_open_error(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path, "a", 2), tar_shard(tmp_path, "b", 2)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    ds.index(0)
    os.unlink(paths[0])
    got = ds.read(np.array([1, 3]))
    assert isinstance(got[0], ShardError) and got[0].key is None
    assert str(got[0]) == f"cannot open shard: No such file or directory (shard {paths[0]!r})"
    assert got[0].__cause__ is None
    assert isinstance(got[1], dict) and got[1]["__key__"] == "b001"
    ds.close()


def texts(got: list[Any]) -> list[str]:
    return [g["txt"] if isinstance(g["txt"], str) else bytes(g["txt"]).decode() for g in got]


def test_private_copies_and_pickles_have_handles_of_their_own(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path, "a", 3), table_shard(tmp_path, "p", 3, group=2)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    want = texts(ds.read(np.arange(6)))
    assert want == ["a-0", "a-1", "a-2", "p-0", "p-1", "p-2"]
    other = ds.private_copy()
    assert other.records is ds.records and other.store is ds.store
    assert other._fds == {} and other._tables == {} and other._lock is not ds._lock
    assert other._buffers is not ds._buffers and other._copier is not ds._copier
    assert texts(other.read(np.arange(6))) == want
    assert other._fds[0] is not ds._fds[0]
    other.close()
    assert 0 in ds._fds  # closing the copy leaves the original's files open
    state = ds.__getstate__()
    for k in ("_pid", "_fds", "_tables", "_chunk_cache", "_buffers", "_copier", "_lock", "_pinned"):
        assert k not in state
    back = pickle.loads(pickle.dumps(ds))
    assert back._fds == {} and back._pinned == {} and back._pid == os.getpid()
    assert texts(back.read(np.arange(6))) == want
    back.close()
    ds.close()


def test_a_forked_copy_starts_its_handles_afresh(tmp_path: Path) -> None:
    ds = Dataset.open([tar_shard(tmp_path, "a", 3)], index_cache=False, cache_dir=tmp_path / "c")
    ds.read(np.arange(3))
    fds, lock = ds._fds, ds._lock
    ds._pid = -1  # as a forked child sees it
    ds._own()
    assert ds._fds is not fds and ds._fds == {} and ds._lock is not lock
    assert ds._pid == os.getpid()
    ds._own()  # the same process: kept
    assert ds._fds == {}
    ds.read(np.arange(3))
    kept = ds._fds
    ds._own()
    assert ds._fds is kept
    ds._pid = -1
    ds.close()  # a forked copy closes nothing of its parent's
    assert ds._fds == {} and ds._pid == os.getpid()
    for f in fds.values():
        os.fstat(f.fd)  # still open
        f.close()


def test_close_closes_files_and_a_later_read_opens_them_again(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path, "a", 3), table_shard(tmp_path, "p", 3, group=2)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    ds.read(np.arange(6))
    fd = ds._fds[0].fd
    assert ds._tables and ds._chunk_cache
    ds.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert ds._fds == {} and ds._tables == {} and len(ds._chunk_cache) == 0
    assert all(isinstance(g, dict) for g in ds.read(np.arange(6)))
    ds.close_cache()


# ---------------------------------------------------------------- remote shards


def served(server: FileServer, tmp_path: Path, sizes: list[int]) -> list[str]:
    urls = []
    for k, n in enumerate(sizes):
        path = tar_shard(tmp_path / "src", f"r{k}", n)
        urls.append(server.put(os.path.basename(path), Path(path).read_bytes()))
    return urls


def test_needs_of_remote_shards(tmp_path: Path, range_server: FileServer) -> None:
    urls = served(range_server, tmp_path, [2, 3])
    ds = Dataset.open(urls, cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    assert ds.remote.tolist() == [True, True]
    n = ds.need(1, 4, 9)
    assert (n.url, n.first, n.last, n.compressed) == (urls[1], 4, 9, False)
    assert n.size == ds.records[1].size and n.version == ds.records[1].version
    assert n.version is not None
    ds.records[1].version = "mtime:1:2"  # a record made from a local file: checked by size
    assert ds.need(1, 0, 0).version is None
    ds.records[1].version = None
    assert ds.need(1, 0, 0).version is None
    ds.close_cache()


def test_remote_shards_are_pinned_while_needed(
    tmp_path: Path, range_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = served(range_server, tmp_path, [2, 3, 2])
    ds = Dataset.open(urls, cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    followed: list[tuple[list[tuple[str, int, int]], int]] = []
    advanced: list[int] = []
    released: list[str] = []
    real_follow, real_advance, real_release = ds.cache.follow, ds.cache.advance, ds.cache.release

    def follow(needs: Any, *, skew: int = 0) -> None:
        followed.append(([(n.url, n.first, n.last) for n in needs], skew))
        real_follow(needs, skew=skew)

    def advance(batch: int) -> None:
        advanced.append(batch)
        real_advance(batch)

    def release(url: str) -> None:
        released.append(url)
        real_release(url)

    monkeypatch.setattr(ds.cache, "follow", follow)
    monkeypatch.setattr(ds.cache, "advance", advance)
    monkeypatch.setattr(ds.cache, "release", release)
    # shard 0 in batches 0-1 and again at 3; shard 1 in 2; shard 2 in 4
    ds.expect([(0, 0, 1), (1, 2, 2), (0, 3, 3), (2, 4, 4)], skew=2)
    assert followed == [([(urls[0], 0, 1), (urls[1], 2, 2), (urls[0], 3, 3), (urls[2], 4, 4)], 2)]
    assert ds._last_need == {0: 3, 1: 2, 2: 4}
    got = ds.read(np.arange(7))
    assert [g["__key__"] for g in got] == [  # type: ignore[index]
        "r0000",
        "r0001",
        "r1000",
        "r1001",
        "r1002",
        "r2000",
        "r2001",
    ]
    assert sorted(ds._pinned) == [0, 1, 2]
    ds.advance(3)  # shard 1's last batch (2) has passed
    assert sorted(ds._pinned) == [0, 2] and released == [urls[1]] and advanced == [3]
    assert 1 not in ds._fds
    ds.advance(3)
    assert released == [urls[1]]
    ds.advance(5)
    assert ds._pinned == {} and sorted(released) == sorted(urls)
    # a new epoch's plan replaces the old one
    ds.expect([(2, 0, 0)])
    assert ds._last_need == {2: 0} and followed[-1] == ([(urls[2], 0, 0)], 0)
    ds.close_cache()


def test_a_remote_index_is_keyed_by_the_copy_read(tmp_path: Path, range_server: FileServer) -> None:
    urls = served(range_server, tmp_path, [2])
    ds = Dataset.open(urls, cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    ds.index(0)
    got = ds.cache.remote_object(urls[0])
    assert got is not None
    key = f"{ds.records[0].index_version}|{got.size}|{got.version}"
    assert ds.store.cached(urls[0], key) is not None
    assert ds.store.cached(urls[0], ds.records[0].index_version) is None
    path = ds._path(0)
    assert ds._path(0) == path and ds._pinned == {0: path}  # pinned once
    ds.close()
    assert ds._pinned == {}
    ds.close_cache()


def test_a_manifest_round_trip_opens_the_same_data_set(tmp_path: Path) -> None:
    paths = [tar_shard(tmp_path / "d", "a", 3), table_shard(tmp_path / "d", "p", 5, group=2)]
    ds = Dataset.open(paths, cache_dir=tmp_path / "c")
    ds.manifest.write(str(tmp_path / "d" / "mmload.index.json"), relative_to=str(tmp_path / "d"))
    again = Dataset.open(str(tmp_path / "d" / "mmload.index.json"), cache_dir=tmp_path / "c2")
    assert again.chunk_counts.tolist() == ds.chunk_counts.tolist()
    assert isinstance(again.manifest, Manifest)
    assert [g["__key__"] for g in again.read(np.arange(8))] == [  # type: ignore[index]
        g["__key__"]
        for g in ds.read(np.arange(8))  # type: ignore[index]
    ]
    ds.close()
    again.close()


# ---------------------------------------------------------------- opening


def test_open_passes_its_settings_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [tar_shard(tmp_path / "d", "a", 3), tar_shard(tmp_path / "d", "b", 2)]
    monkeypatch.setenv("MMLOAD_CACHE_DIR", str(tmp_path / "default"))
    cfg = RemoteConfig(fetchers=3)
    with caplog.at_level(logging.INFO, "mmload.sources.dataset"):
        ds = Dataset.open(paths, remote=cfg)  # cache_dir: the default
    assert ds.cache.root == tmp_path / "default" / "shards" and ds.cache.cfg is cfg
    assert ds.store.dir == tmp_path / "default" / "index"
    assert (ds.store.key_column, ds.store.skip) == ("__key__", False)
    assert ds.cache_chunks == 64 and ds.key_column == "__key__"
    assert ds.manifest_cache_file is not None and ds.manifest_cache_file.is_file()
    assert ds.manifest_cache_file.parent == tmp_path / "default" / "manifests"
    assert isinstance(ds.index_seconds, float) and 0 < ds.index_seconds < 60
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("opened 2 shards, 5 samples in ") and msg.endswith(
        "s (2 indexed now, the rest from a manifest)"
    )
    ds.close_cache()
    other = Dataset.open(
        paths,
        key_column=None,
        skip_bad=True,
        cache_dir=tmp_path / "c",
        index_cache=False,
        cache_chunks=7,
    )
    assert other.store.dir is None and (other.store.key_column, other.store.skip) == (None, True)
    assert other.cache.root == tmp_path / "c" / "shards" and other.cache_chunks == 7
    assert other.cache.cfg == RemoteConfig() and other.key_column is None
    assert not (tmp_path / "c" / "manifests").exists()  # no manifest cache either
    other.close_cache()


def test_open_with_bad_shards_skipped_or_not(tmp_path: Path) -> None:
    good = tar_shard(tmp_path / "d", "a", 2)
    bad = tmp_path / "d" / "bad.tar"
    bad.write_bytes(bytes(100))
    with pytest.raises(ShardError, match="shorter than one tar header"):
        Dataset.open([good, str(bad)], cache_dir=tmp_path / "c")  # skip_bad=False by default
    ds = Dataset.open([good, str(bad)], skip_bad=True, cache_dir=tmp_path / "c")
    assert ds.num_shards == 1 and [b.shard for b in ds.bad] == [str(bad)]
    assert ds.bad == ds.manifest.bad and ds.bad is not ds.manifest.bad
    with pytest.raises(ShardError) as e:
        Dataset.open([str(bad)], skip_bad=True, cache_dir=tmp_path / "c")
    assert e.value.reason == "no readable shard in the spec"
    assert e.value.shard == str([str(bad)])


def test_open_refuses_a_data_set_without_samples(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    empty = [str(tmp_path / "d" / n) for n in ("e0.parquet", "e1.parquet")]
    for p in empty:  # tables of no rows (an empty tar is refused when indexed)
        pq.write_table(pa.table({"__key__": pa.array([], pa.string())}), p)
    with pytest.raises(ShardError) as e:
        Dataset.open(empty, cache_dir=tmp_path / "c")
    assert e.value.reason == (
        "the data set has no samples: all 2 readable shards are empty (the first is named here)"
    )
    assert e.value.shard == empty[0]
    one = Dataset.open([*empty, tar_shard(tmp_path / "d", "a", 1)], cache_dir=tmp_path / "c")
    assert one.num_samples == 1  # one sample is a data set
    one.close()


def test_open_pipes_only_when_allowed(tmp_path: Path) -> None:
    path = tar_shard(tmp_path / "d", "a", 2)
    spec = f"pipe:cat {path}"
    with pytest.raises(ConfigError, match="allow_pipe=True"):
        Dataset.open(spec, cache_dir=tmp_path / "c")
    ds = Dataset.open(spec, allow_pipe=True, cache_dir=tmp_path / "c")
    assert ds.num_samples == 2 and ds.remote.tolist() == [True]
    ds.close_cache()


def test_a_dataset_made_directly_has_defaults(tmp_path: Path) -> None:
    ds = Dataset.open([tar_shard(tmp_path / "d", "a", 2)], cache_dir=tmp_path / "c")
    direct = Dataset(ds.specs, ds.manifest, store=ds.store, cache=ds.cache)
    assert direct.cache_chunks == 64 and direct.index_seconds == 0.0
    assert direct.manifest_cache_file is None
    assert direct.remote.dtype == bool and direct._is_tar.dtype == bool
    ds.close()


def test_the_plan_takes_the_last_batch_of_a_shard_read_twice_and_unplanned_pins_go(
    tmp_path: Path, range_server: FileServer
) -> None:
    urls = served(range_server, tmp_path, [2, 2])
    ds = Dataset.open(urls, cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    ds.expect([(0, 0, 5), (1, 1, 1), (0, 2, 3)])  # shard 0 again, within its first span
    assert ds._last_need == {0: 5, 1: 1}
    ds.expect([])
    ds.read(np.arange(4))  # read without a plan for them: pinned
    assert sorted(ds._pinned) == [0, 1]
    ds.advance(1)  # no plan: no longer needed
    assert ds._pinned == {}
    ds.close_cache()


def test_more_tar_shards_than_stay_open_are_gathered_in_whole_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_mod, "_MAX_OPEN_FILES", 2)
    paths = [tar_shard(tmp_path, f"s{k}", 2) for k in range(7)]
    ds = Dataset.open(paths, index_cache=False, cache_dir=tmp_path / "c")
    groups: list[list[str]] = []
    real = dataset_mod.gather_tar

    def spy(parts: Any, *a: Any) -> None:
        groups.append([p.url for p in parts])
        real(parts, *a)

    monkeypatch.setattr(dataset_mod, "gather_tar", spy)
    ids = np.random.default_rng(3).permutation(14)
    got = ds.read(ids, {"txt"})
    order = list(dict.fromkeys(int(i) // 2 for i in ids))  # shards in first-seen order
    assert groups == [[paths[s] for s in order[g : g + 2]] for g in range(0, 7, 2)]
    for gid, smp in zip(ids.tolist(), got, strict=True):
        assert isinstance(smp, dict) and smp["__key__"] == f"s{gid // 2}{gid % 2:03d}"
        assert bytes(smp["txt"]) == f"s{gid // 2}-{gid % 2}".encode() and "cls" not in smp
    ds.close()


def test_large_batches_use_the_copy_thread_and_bytes_fields_stay_bytes(tmp_path: Path) -> None:
    rows = [{"__key__": f"k{i:03d}", "bin": bytes([i]) * 5000, "txt": f"t{i}"} for i in range(40)]
    (path,) = write_tar_shards(rows, str(tmp_path / "s-%d.tar"), maxcount=40)
    ds = Dataset.open([path], index_cache=False, cache_dir=tmp_path / "c")
    from mmload.sources import gather

    gather._load_compiled()
    got = ds.read(np.arange(40), None, frozenset({"txt"}))  # 200 KB: the copy thread's
    assert ds._copier._pool is not None
    for i, smp in enumerate(got):
        assert (
            isinstance(smp, dict) and type(smp["txt"]) is bytes and smp["txt"] == f"t{i}".encode()
        )
        assert isinstance(smp["bin"], memoryview) and bytes(smp["bin"]) == bytes([i]) * 5000
    ds.close()


def test_remote_table_readers_go_with_their_pins(tmp_path: Path, range_server: FileServer) -> None:
    path = table_shard(tmp_path / "src", "p", 4, group=2)
    url = range_server.put("p.parquet", Path(path).read_bytes())
    ds = Dataset.open([url], cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    ds.expect([(0, 0, 0)])
    assert [g["__key__"] for g in ds.read(np.arange(4))] == ["p000", "p001", "p002", "p003"]  # type: ignore[index]
    reader = ds._tables[0]
    ds.advance(1)
    assert ds._tables == {} and ds._pinned == {} and reader is not None
    assert ds.cache._pins == {}
    ds.close_cache()


def test_a_shard_pinned_by_two_threads_at_once_is_released_once(
    tmp_path: Path, range_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = served(range_server, tmp_path, [2])
    ds = Dataset.open(urls, cache_dir=tmp_path / "c", remote=RemoteConfig(retries=0))
    real = ds.cache.acquire

    def acquire(need: Any) -> str:
        path = real(need)
        real(need)  # another thread of this reader pinned it meanwhile ...
        ds._pinned[0] = path  # ... and recorded it first
        return path

    monkeypatch.setattr(ds.cache, "acquire", acquire)
    ds._path(0)
    assert ds.cache._pins[urls[0]][1] == 1  # one pin per record: the extra one released
    monkeypatch.undo()
    ds.close()
    assert ds.cache._pins == {}
    ds.close_cache()
