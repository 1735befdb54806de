"""Tar shards: header-scan index, DALI .idx, webdataset round trip, and every bad-input case."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmload.errors import ShardError
from mmload.sources import Dataset
from mmload.sources.index import build_index
from mmload.sources.tar import read_dali_idx, scan_tar, split_name


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> str:
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_split_name_matches_webdataset() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ["a.jpg", "dir/sub/abc.seg.png", "a.b/c.JPG", "x.tar.gz", "k.cls"]:
        key, ext = base_plus_ext(name)
        assert split_name(name) == (key, ext.lower())
    for name in ["README", ".jpg", "dir/.hidden"]:
        assert split_name(name) is None


def test_scan_matches_tarfile_and_reads_byte_identical(make_shards) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([5, 3])
    idx = scan_tar(paths[0])
    assert idx.keys == keys[:5]
    with tarfile.open(paths[0]) as t:
        members = [m for m in t.getmembers() if m.isfile()]
        for m, off, size in zip(members, idx.offsets, idx.sizes, strict=True):
            assert (m.offset_data, m.size) == (off, size)
    # Every sample reads back exactly what webdataset's own reader yields.
    ds = Dataset.open(paths, index_cache=False)
    got = ds.read(np.arange(ds.num_samples))
    ref = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(got) == len(ref) == 8
    for g, r in zip(got, ref, strict=True):
        assert isinstance(g, dict)
        assert g["__key__"] == r["__key__"]
        for f in ("jpg", "cls", "txt"):
            assert g[f] == r[f]


def test_long_names_gnu_and_pax(tmp_path: Path) -> None:
    long_key = "d/" + "x" * 150
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        p = _tar(
            tmp_path / f"long{fmt}.tar",
            [(f"{long_key}.jpg", b"abc"), (f"{long_key}.cls", b"1")],
            fmt,
        )
        idx = scan_tar(p)
        assert idx.keys == [long_key]
        assert idx.fields == ["jpg", "cls"]


def test_dali_idx_is_used_and_equals_scan(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from wds2idx import IndexCreator

    paths, _ = make_shards([6])
    idx_path = paths[0][: -len(".tar")] + ".idx"
    with IndexCreator(paths[0], idx_path, verbose=False) as ic:
        ic.create_index()
    from_idx = read_dali_idx(idx_path, paths[0])
    scanned = scan_tar(paths[0])
    assert from_idx.keys == scanned.keys
    assert np.array_equal(from_idx.offsets, scanned.offsets)
    assert np.array_equal(from_idx.sizes, scanned.sizes)
    # build_index picks the .idx up; a corrupt .idx is an error naming the shard, not a silent scan
    with open(idx_path, "a") as f:
        f.write("jpg 999999999 5 bogus.jpg\n")
    with pytest.raises(ShardError, match="past the end"):
        build_index(paths[0], "tar", shard=paths[0], key_column=None, skip=False)


def test_index_cache_round_trip_and_invalidation(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A manifest per data set plus one member table per shard, loaded only when read."""
    paths, _ = make_shards([4, 2])
    cache = tmp_path / "cache"
    first = Dataset.open(paths, cache_dir=cache)
    manifests = list((cache / "manifests").iterdir())
    assert len(manifests) == 1, "one manifest per data set"
    files = sorted((cache / "index").iterdir())
    assert len(files) == 2, "one member table per shard"
    mtimes = [f.stat().st_mtime_ns for f in files + manifests]
    second = Dataset.open(paths, cache_dir=cache)
    assert second.store.loaded() == 0, "a warm open loads no member table"
    assert [f.stat().st_mtime_ns for f in files + manifests] == mtimes, "nor rewrites anything"
    assert [first.index(s).keys for s in range(2)] == [second.index(s).keys for s in range(2)]
    assert second.store.loaded() == 2
    # Rewriting one shard (new size/mtime) re-indexes that shard only.
    with wds.TarWriter(paths[0]) as w:
        w.write({"__key__": "only", "cls": b"1"})
    third = Dataset.open(paths, cache_dir=cache)
    assert third.num_samples == 3
    assert third.index(0).keys == ["only"]
    changed = [f.stat().st_mtime_ns != m for f, m in zip(files, mtimes, strict=False)]
    assert sorted(changed) == [False, True], "the unchanged shard's table is kept"
    # A corrupt cache file is ignored (rebuilt), never trusted.
    for f in [*files, *manifests]:
        f.write_text("{not json")
    again = Dataset.open(paths, cache_dir=cache)
    assert again.num_samples == 3
    assert again.index(1).keys == first.index(1).keys


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not found") as e:
        Dataset.open(str(tmp_path / "nope.tar"))
    assert "nope.tar" in str(e.value)


def test_not_a_tar(tmp_path: Path) -> None:
    p = tmp_path / "fake.tar"
    p.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="not a tar") as e:
        Dataset.open(str(p))
    assert "fake.tar" in str(e.value)


def _cut_inside_last_member(path: str) -> None:
    with tarfile.open(path) as t:
        last = t.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


def test_truncated_tar_raises_naming_shard_and_key(make_shards) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([4])
    _cut_inside_last_member(paths[0])
    with pytest.raises(ShardError, match="truncated") as e:
        scan_tar(paths[0])
    assert e.value.shard == paths[0]
    assert e.value.key == keys[-1]


def test_truncated_tar_skip_keeps_complete_samples(make_shards) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([4])
    _cut_inside_last_member(paths[0])
    idx = scan_tar(paths[0], skip=True)
    assert idx.keys == keys[:3]
    assert [b.key for b in idx.bad] == [keys[3], None]  # the sample, then the lost rest
    assert "truncated" in idx.bad[0].reason


def test_members_that_are_not_samples_are_ignored_and_counted(tmp_path: Path) -> None:
    p = _tar(
        tmp_path / "meta.tar",
        [("a.jpg", b"1"), ("README", b"hello"), (".DS_Store", b"x"), ("b.jpg", b"2")],
    )
    for skip in (False, True):
        idx = scan_tar(p, skip=skip)
        assert idx.keys == ["a", "b"] and not idx.bad
        assert idx.ignored == ["README", ".DS_Store"]


def test_member_with_an_empty_field_is_an_error(tmp_path: Path) -> None:
    p = _tar(tmp_path / "nofield.tar", [("a.jpg", b"1"), ("c.", b"hello"), ("b.jpg", b"2")])
    with pytest.raises(ShardError, match="empty field") as e:
        scan_tar(p)
    assert "nofield.tar" in str(e.value) and e.value.key == "c"
    idx = scan_tar(p, skip=True)
    assert idx.keys == ["a", "b"]
    assert len(idx.bad) == 1 and idx.bad[0].key == "c"


def test_duplicate_field_and_noncontiguous_sample(tmp_path: Path) -> None:
    p = _tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.jpg", b"2")])
    with pytest.raises(ShardError, match="duplicate field"):
        scan_tar(p)
    p = _tar(tmp_path / "split.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"3")])
    with pytest.raises(ShardError, match="not contiguous"):
        scan_tar(p)


def test_empty_tar(tmp_path: Path) -> None:
    p = _tar(tmp_path / "empty.tar", [])
    with pytest.raises(ShardError, match="no samples"):
        scan_tar(p)


def test_directories_are_skipped_and_link_samples_reported(tmp_path: Path) -> None:
    """A directory is not sample data; a link named like a sample member is never followed and
    makes its sample bad (it would otherwise vanish, or lose that field, silently)."""
    p = tmp_path / "mixed.tar"
    with tarfile.open(p, "w") as t:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        info = tarfile.TarInfo("sub/a.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("sub/b.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.txt"
        t.addfile(link)
    with pytest.raises(ShardError, match="symbolic link") as e:
        scan_tar(str(p))
    assert e.value.key == "sub/b"
    idx = scan_tar(str(p), skip=True)
    assert idx.keys == ["sub/a"]
    assert [b.key for b in idx.bad] == ["sub/b"]


def test_shardwriter_round_trip(tmp_path: Path, jpegs: list[bytes]) -> None:
    """Shards from webdataset's ShardWriter (rotation, PAX headers) read back byte-identical."""
    samples = [
        {
            "__key__": f"img{i:04d}",
            "jpg": jpegs[i],
            "cls": str(i % 3).encode(),
            "json": b'{"i": %d}' % i,
        }
        for i in range(10)
    ]
    with wds.ShardWriter(str(tmp_path / "sw-%03d.tar"), maxcount=4, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    ds = Dataset.open(str(tmp_path / "sw-{000..002}.tar"), index_cache=False)
    assert [len(ds.index(s).keys) for s in range(ds.num_shards)] == [4, 4, 2]
    got = ds.read(np.arange(10))
    for g, s in zip(got, samples, strict=True):
        assert isinstance(g, dict)
        assert {k: g[k] for k in s} == s


@pytest.mark.parametrize("record", [b"0 path=a\n", b"zz path=a\n", b"99 path=a\n"])
def test_corrupt_pax_header_is_a_shard_error(tmp_path: Path, record: bytes) -> None:
    p = _tar(tmp_path / "pax.tar", [("a.jpg", b"1"), ("b.jpg", b"2")], tarfile.PAX_FORMAT)
    data = bytearray(Path(p).read_bytes())
    # Give member b a PAX header by hand: an 'x' header block followed by the record.
    with tarfile.open(p) as t:
        b_off = t.getmembers()[1].offset
    hdr = bytearray(data[b_off : b_off + 512])
    hdr[156:157] = b"x"
    hdr[124:136] = b"%011o\0" % len(record)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    payload = record.ljust(512, b"\0")
    fixed = bytes(data[:b_off]) + bytes(hdr) + payload + bytes(data[b_off:])
    Path(p).write_bytes(fixed)
    with pytest.raises(ShardError, match="corrupt PAX header") as e:
        scan_tar(p)
    assert "pax.tar" in str(e.value)
    assert scan_tar(p, skip=True).keys == ["a"]


def test_index_store_pickles_without_its_loaded_tables(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Worker processes get the store without the member tables loaded in the parent (each
    loads what it reads), and can still load every one."""
    import pickle

    paths, _ = make_shards([3, 2])
    ds = Dataset.open(paths, cache_dir=tmp_path / "cache")
    want = [ds.index(s).keys for s in range(2)]
    assert ds.store.loaded() == 2
    store = pickle.loads(pickle.dumps(ds.store))
    assert store.loaded() == 0
    assert ds.store.loaded() == 2  # the parent's tables stay loaded
    ds2 = pickle.loads(pickle.dumps(ds))
    assert [ds2.index(s).keys for s in range(2)] == want
