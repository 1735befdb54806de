"""Batch reads of tar shards: the gathered views hold what one ``pread`` per member returns."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmload.errors import ShardError
from mmload.sources import Dataset
from mmload.sources import gather as gather_mod
from mmload.sources.gather import BatchBuffers, OpenShard
from mmload.sources.tar import TarIndex
from mmload.sources.write import write_parquet, write_tar_shards


def _samples(n: int, seed: int, prefix: str) -> list[dict[str, object]]:
    """Members of mixed sizes: some samples span more than one joint read, some lack a field."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        big = rng.random() < 0.2
        size = int(rng.integers(20_000, 40_000)) if big else int(rng.integers(0, 3_000))
        s: dict[str, object] = {
            "__key__": f"{prefix}{i:05d}",
            "jpg": rng.bytes(size),
            "cls": str(i % 7).encode(),
        }
        if rng.random() < 0.7:
            s["txt"] = rng.bytes(int(rng.integers(1, 600)))
        out.append(s)
    return out


def _shards(root: Path, counts: list[int]) -> list[str]:
    paths = []
    for k, c in enumerate(counts):
        paths += write_tar_shards(
            _samples(c, k, f"s{k}_"), str(root / f"t{k}-%03d.tar"), maxcount=c
        )
    return paths


def _reference(ds: Dataset, ids: np.ndarray, fields: set[str] | None) -> list[object]:
    """One ``os.pread`` per member, straight from the index (the reader before batching)."""
    _chunk, shard, row = ds.locate(ids)
    out: list[object] = []
    for gid, s, r in zip(ids.tolist(), shard.tolist(), row.tolist(), strict=True):
        idx = ds.index(s)
        assert isinstance(idx, TarIndex)
        fd = os.open(ds.specs[s].url, os.O_RDONLY)
        try:
            sample: dict[str, object] = {"__key__": idx.keys[r]}
            for m in idx.members(r):
                if fields is None or idx.fields[m] in fields:
                    sample[idx.fields[m]] = os.pread(fd, int(idx.sizes[m]), int(idx.offsets[m]))
        finally:
            os.close(fd)
        sample["__shard__"] = ds.specs[s].url
        sample["__id__"] = gid
        out.append(sample)
    return out


def _same(got: list[object], want: list[object]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, dict) and isinstance(w, dict)
        assert list(g) == list(w)  # keys, fields and their order
        for k, v in w.items():
            if isinstance(v, bytes):  # a tar member: a read-only view of the batch's buffer
                got = g[k]
                assert type(got) is bytes or (isinstance(got, memoryview) and got.readonly), k
                assert bytes(got) == v, k
            else:
                assert g[k] == v and type(g[k]) is type(v), k


@pytest.fixture(params=["mmap", "mmap-thread", "preadv"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every copy path: from the shard's mapping on the calling thread, from it on the copy
    thread (compiled, without the GIL), and ``os.preadv`` where a file cannot be mapped."""
    if request.param == "preadv":
        monkeypatch.setattr(OpenShard, "mapping", lambda self, size: None)
    threshold = 0 if request.param == "mmap-thread" else 1 << 62
    monkeypatch.setattr(gather_mod, "_COPY_THREAD_BYTES", threshold)
    if request.param == "mmap-thread":
        gather_mod._load_compiled()  # else the first batches copy inline while it loads
    return str(request.param)


def test_first_large_batch_does_not_wait_for_the_compiled_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the copy thread has loaded the compiled copy, batches are copied inline; then
    they go to the thread."""
    monkeypatch.setattr(gather_mod, "_COPY_THREAD_BYTES", 0)
    monkeypatch.setattr(gather_mod, "_compiled", None)
    loaded = threading.Event()
    real = gather_mod._load_compiled

    def slow_load() -> None:
        loaded.wait(10)
        real()

    monkeypatch.setattr(gather_mod, "_load_compiled", slow_load)
    ds = Dataset.open(_shards(tmp_path, [40, 25]), index_cache=False)
    want = _reference(ds, np.arange(30), None)
    copier = ds._copier
    assert copier is not None
    used: list[bool] = []
    submit = copier.submit

    def spy(*a: Any) -> Any:
        fut = submit(*a)
        used.append(fut is not None)
        return fut

    monkeypatch.setattr(copier, "submit", spy)
    _same(ds.read(np.arange(30)), want)  # the load is still blocked: copied inline
    assert used == [False]
    loaded.set()
    deadline = time.monotonic() + 30
    while gather_mod._compiled is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _same(ds.read(np.arange(30)), want)
    assert used == [False, True]
    ds.close()


@pytest.mark.parametrize("fields", [None, {"jpg", "cls", "txt"}, {"cls"}, {"txt", "jpg"}, set()])
def test_batches_match_per_member_reads(
    tmp_path: Path, path_kind: str, fields: set[str] | None
) -> None:
    ds = Dataset.open(_shards(tmp_path, [40, 25, 60, 1]), index_cache=False)
    rng = np.random.default_rng(1)
    n = ds.num_samples
    batches = [
        rng.permutation(n)[:64],  # random order across shards
        np.arange(n),  # in file order: neighbours share reads
        np.concatenate([rng.integers(0, n, 20), [5, 5, 5, 70, 5]]),  # repeats in one batch
        np.arange(n)[::-3],
        np.array([], dtype=np.int64),
    ]
    for ids in batches:
        got = ds.read(ids, fields)
        _same(got, _reference(ds, np.asarray(ids, dtype=np.int64), fields))
        # a repeated id is a sample of its own, not the same dict twice
        assert len({id(x) for x in got}) == len(got)
        # fields handed on as bytes are bytes of their own; the others stay views
        for own in (frozenset({"jpg"}), frozenset({"jpg", "txt", "absent"})):
            got = ds.read(ids, fields, own)
            _same(got, _reference(ds, np.asarray(ids, dtype=np.int64), fields))
            for g in got:
                assert isinstance(g, dict)
                for k, v in g.items():
                    if k in own:
                        assert type(v) is bytes, k
                    elif k in ("jpg", "cls", "txt"):
                        assert isinstance(v, memoryview), k
    ds.close()


def test_truncated_shard_fails_only_the_cut_samples(tmp_path: Path, path_kind: str) -> None:
    paths = _shards(tmp_path, [30, 30])
    ds = Dataset.open(paths, index_cache=False)
    ds.read(np.arange(ds.num_samples))  # indexed before the cut
    idx = ds.index(1)
    assert isinstance(idx, TarIndex)
    cut_row = 20  # the shard ends in the middle of this sample's first member
    first = int(idx.starts[cut_row])
    os.truncate(paths[1], int(idx.offsets[first]) + int(idx.sizes[first]) // 2)
    ids = np.random.default_rng(2).permutation(ds.num_samples)
    got = ds.read(ids)
    for gid, g, o in zip(ids.tolist(), got, ds.read(ids, None, frozenset({"jpg"})), strict=True):
        assert type(g) is type(o) and (not isinstance(g, ShardError) or str(g) == str(o)), gid
        if gid < 30 + cut_row:
            assert isinstance(g, dict), gid
            continue
        assert isinstance(g, ShardError), gid
        assert g.shard == paths[1]
        assert g.key == idx.keys[gid - 30]
        assert "short read of field" in str(g) and "truncated" in str(g)
    good = [i for i in ids.tolist() if i < 30 + cut_row]
    _same(ds.read(np.array(good)), _reference(ds, np.array(good), None))
    ds.close()


def test_missing_shard_fails_its_samples_only(tmp_path: Path, path_kind: str) -> None:
    paths = _shards(tmp_path, [10, 10])
    ds = Dataset.open(paths, index_cache=False)
    ds.read(np.arange(20))
    ds.close()  # descriptors dropped: the next read opens the files again
    os.unlink(paths[0])
    got = ds.read(np.array([15, 3, 12, 0]))
    assert [isinstance(g, dict) for g in got] == [True, False, True, False]
    for g in (got[1], got[3]):
        assert isinstance(g, ShardError) and g.shard == paths[0]
    ds.close()


def test_mixed_tar_and_parquet(tmp_path: Path, path_kind: str) -> None:
    tars = _shards(tmp_path, [12, 9])
    rows = [
        {"__key__": f"p{i:04d}", "jpg": bytes([i % 256]) * (i + 1), "cls": i % 3} for i in range(30)
    ]
    pq_path = write_parquet(rows, str(tmp_path / "rows.parquet"), row_group_size=8)
    ds = Dataset.open([tars[0], pq_path, tars[1]], index_cache=False)
    rng = np.random.default_rng(3)
    ids = rng.permutation(ds.num_samples)
    _chunk, shard, _row = ds.locate(ids)
    for fields in (None, {"jpg", "cls"}):
        got = ds.read(ids, fields)
        assert [g["__id__"] for g in got if isinstance(g, dict)] == ids.tolist()
        for j, g in enumerate(got):
            assert isinstance(g, dict)
            if shard[j] == 1:  # a table row: as read alone
                _same([g], ds.read(ids[j : j + 1], fields))
            else:
                _same([g], _reference(ds, ids[j : j + 1], fields))
    ds.close()


def test_views_outlive_later_batches_and_close(tmp_path: Path, path_kind: str) -> None:
    ds = Dataset.open(_shards(tmp_path, [20, 20]), index_cache=False)
    ids = np.random.default_rng(5).permutation(ds.num_samples)
    first = ds.read(ids[:16])
    want = _reference(ds, ids[:16], None)
    for _ in range(3):
        ds.read(ids)  # later batches get buffers of their own
    ds.close()  # the shards unmapped and closed: the views hold copies
    _same(first, want)
    sample = first[0]
    assert isinstance(sample, dict) and isinstance(sample["jpg"], memoryview)
    with pytest.raises(TypeError):
        sample["jpg"][0] = 1  # read-only


def test_rewritten_shard_is_mapped_again(tmp_path: Path, path_kind: str) -> None:
    """A shard whose file grows after it was mapped is mapped again at its new size."""
    paths = _shards(tmp_path, [10])
    ds = Dataset.open(paths, index_cache=False)
    before = ds.read(np.arange(10))
    with open(paths[0], "ab") as f:
        f.write(b"\0" * 10240)  # tar padding: the members are where they were
    _same(ds.read(np.arange(10)), before)
    _same(ds.read(np.arange(10)), _reference(ds, np.arange(10), None))
    ds.close()


def test_batch_buffers_reused_only_when_no_view_is_left() -> None:
    bufs = BatchBuffers(keep=2)
    a = bufs.get(1000)
    view = a.data.toreadonly()[10:20]
    del a
    b = bufs.get(900)  # the first is still viewed: a buffer of its own
    assert b.base is not view.obj.base  # type: ignore[union-attr]
    first = id(view.obj.base)  # type: ignore[union-attr]  (an id: a reference would hold it)
    del view
    c = bufs.get(1000)  # no view of the first is left: reused
    assert id(c.base) == first
    del b, c
    big = bufs.get(5000)  # larger than any kept buffer: a free one is replaced
    assert len(big.base) >= 5000 and len(bufs._bufs) <= 2
    assert BatchBuffers(keep_bytes=100).get(1000).base is not None  # over the cap: not kept
