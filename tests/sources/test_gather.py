"""The gather module's parts on their own: the shard mapping, the short-read error, loading the
compiled copy, the copier's thread across close and fork, and ``gather_tar`` on member layouts
the batch tests (``test_read_batch.py``) do not single out: empty members and samples, large
``as_bytes`` members, files cut between the ``fstat`` and the read, and parts that failed to
open."""

from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmload.errors import ShardError
from mmload.sources import gather as g
from mmload.sources.gather import BatchBuffers, Copier, OpenShard, TarPart, gather_tar
from mmload.sources.index import build_index
from mmload.sources.tar import TarIndex


def tar_file(path: Path, members: list[tuple[str, bytes]]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return str(path)


def index(path: str) -> TarIndex:
    idx = build_index(path, "tar", shard=path, key_column="__key__", skip=False)
    assert isinstance(idx, TarIndex)
    return idx


def part(path: str, idx: TarIndex, rows: list[int], js: list[int] | None = None) -> TarPart:
    fd = os.open(path, os.O_RDONLY)
    js = list(range(len(rows))) if js is None else js
    return TarPart(OpenShard(fd), idx, path, js, rows, [100 + r for r in rows])


def values(sample: Any) -> dict[str, bytes]:
    assert isinstance(sample, dict)
    return {k: bytes(v) for k, v in sample.items() if k not in ("__key__", "__shard__", "__id__")}


# ---------------------------------------------------------------- the mapping


def test_the_mapping_is_kept_renewed_and_refused(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abcdef")
    shard = OpenShard(os.open(p, os.O_RDONLY))
    m = shard.mapping(6)
    assert m is not None and bytes(m) == b"abcdef" and m.dtype == np.uint8
    assert shard.mapping(6) is m  # the same size: the same mapping
    with pytest.raises(ValueError, match="read-only"):
        m[0] = 1
    with open(p, "ab") as f:
        f.write(b"gh")
    m2 = shard.mapping(8)
    assert m2 is not m and m2 is not None and bytes(m2) == b"abcdefgh"
    assert shard.mapping(0) is None and shard._map is None  # an empty file is not mapped
    assert bytes(m2) == b"abcdefgh"  # a mapping lives as long as its array
    shard.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(shard.fd)


def test_a_file_that_cannot_be_mapped_is_not_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()  # a special file: mmap refuses it
    shard = OpenShard(r)
    assert shard.mapping(10) is None and shard._unmappable
    tries: list[int] = []
    monkeypatch.setattr(g.mmap, "mmap", lambda *a, **k: tries.append(1))
    assert shard.mapping(10) is None and tries == []
    shard.close()
    os.close(w)


def test_a_mapping_error_of_either_kind_means_unmappable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    for exc in (OSError("no"), ValueError("no")):

        def refuse(*a: Any, exc: Exception = exc, **k: Any) -> Any:
            raise exc

        monkeypatch.setattr(g.mmap, "mmap", refuse)
        shard = OpenShard(os.open(p, os.O_RDONLY))
        assert shard.mapping(3) is None and shard._unmappable
        shard.close()


def test_the_short_read_error() -> None:
    e = g._short("jpg", 10, 44, "/d/a.tar", "k7")
    assert isinstance(e, ShardError) and (e.shard, e.key) == ("/d/a.tar", "k7")
    assert e.reason == "short read of field 'jpg': 10 of 44 bytes (shard truncated after indexing?)"


# ---------------------------------------------------------------- the compiled copy and copier


def test_a_failed_load_of_the_compiled_copy_is_said_once_and_copies_inline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mmload.sources.memcopy as memcopy

    monkeypatch.setattr(g, "_compiled", None)

    def broken(ops: Any, dst: int) -> None:
        raise RuntimeError("no llvm here")

    monkeypatch.setattr(memcopy, "copy_ranges", broken)
    with caplog.at_level(logging.WARNING, "mmload.sources.gather"):
        g._load_compiled()
    assert g._compiled is None
    assert [r.getMessage() for r in caplog.records] == [
        "mmload: compiled batch copy unavailable, copying inline (RuntimeError('no llvm here'))"
    ]
    monkeypatch.undo()
    g._load_compiled()
    assert g._compiled is memcopy.copy_ranges


def test_inline_copies(tmp_path: Path) -> None:
    src = np.frombuffer(b"0123456789", dtype=np.uint8)
    dst = np.zeros(8, dtype=np.uint8)
    g._copy([(0, src.ctypes.data + 2, 3), (5, src.ctypes.data + 7, 3)], dst.ctypes.data, None)
    assert bytes(dst) == b"234\x00\x00789"
    started = threading.Event()
    dst[:] = 0
    g._load_compiled()
    ops = np.array([[1, src.ctypes.data, 4]], dtype=np.int64)
    g._copy_free(ops, dst.ctypes.data, None, started)
    assert started.is_set() and bytes(dst) == b"\x000123\x00\x00\x00"


def test_the_copier_thread_before_and_after_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    g._load_compiled()
    monkeypatch.setattr(g, "_compiled", None)
    block = threading.Event()
    real = g._load_compiled

    def held() -> None:
        block.wait(30)
        real()

    monkeypatch.setattr(g, "_load_compiled", held)
    src = np.frombuffer(b"abcdefgh", dtype=np.uint8)
    dst = np.zeros(8, dtype=np.uint8)
    c = Copier()
    assert c.submit([(0, src.ctypes.data, 8)], dst.ctypes.data, None) is None  # inline
    assert bytes(dst) == b"abcdefgh"
    pool = c._pool
    assert pool is not None
    threads = [t.name for t in threading.enumerate() if t.name.startswith("mmload-copy")]
    assert threads  # the thread loads the compiled copy first
    block.set()
    pool.submit(lambda: None).result(30)  # the load has run
    assert g._compiled is not None
    dst[:] = 0
    fut = c.submit([(2, src.ctypes.data, 3)], dst.ctypes.data, None)
    assert fut is not None
    fut.result(30)
    assert bytes(dst) == b"\x00\x00abc\x00\x00\x00" and c._pool is pool
    c.close()
    assert c._pool is None
    c.close()  # twice: nothing to do


def test_a_copier_closed_meanwhile_or_inherited_by_a_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    g._load_compiled()
    src = np.frombuffer(b"abcdefgh", dtype=np.uint8)
    dst = np.zeros(8, dtype=np.uint8)
    c = Copier()
    fut = c.submit([(0, src.ctypes.data, 2)], dst.ctypes.data, None)
    assert fut is not None
    fut.result(30)
    pool = c._pool
    assert pool is not None
    pool.shutdown()  # closed by another thread just now: copied here
    dst[:] = 0
    assert c.submit([(0, src.ctypes.data, 4)], dst.ctypes.data, None) is None
    assert bytes(dst[:4]) == b"abcd"
    c._pid = -1  # a forked child's copier: a pool of its own
    fut = c.submit([(4, src.ctypes.data, 4)], dst.ctypes.data, None)
    assert fut is not None and c._pool is not pool and c._pid == os.getpid()
    fut.result(30)
    assert bytes(dst) == b"abcdabcd"
    mine = c._pool
    assert mine is not None
    c._pid = -1
    c.close()  # not this process's pool: left alone
    assert c._pool is None and not mine._shutdown
    mine.shutdown()


# ---------------------------------------------------------------- gather_tar


@pytest.fixture(params=["mapped", "unmapped"])
def mapped(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param == "unmapped":
        monkeypatch.setattr(OpenShard, "mapping", lambda self, size: None)
    return request.param == "mapped"


def test_empty_members_and_samples(tmp_path: Path, mapped: bool) -> None:
    path = tar_file(
        tmp_path / "a.tar",
        [("k0.txt", b""), ("k0.cls", b""), ("k1.txt", b"x"), ("k1.cls", b""), ("k2.txt", b"yz")],
    )
    idx = index(path)
    for fields in (None, {"txt"}, {"cls"}):
        out: list[Any] = [None] * 3
        gather_tar([part(path, idx, [0, 1, 2])], fields, out, BatchBuffers())
        want = [{"txt": b"", "cls": b""}, {"txt": b"x", "cls": b""}, {"txt": b"yz"}]
        for got, w in zip(out, want, strict=True):
            assert values(got) == {k: v for k, v in w.items() if fields is None or k in fields}
        assert [o["__id__"] for o in out] == [100, 101, 102]
        assert [o["__key__"] for o in out] == ["k0", "k1", "k2"]
        assert all(o["__shard__"] == path for o in out)


def test_a_sample_without_the_wanted_fields(tmp_path: Path) -> None:
    path = tar_file(tmp_path / "a.tar", [("k0.txt", b"a"), ("k1.cls", b"b")])
    idx = index(path)
    out: list[Any] = [None] * 2
    gather_tar([part(path, idx, [0, 1])], {"cls"}, out, BatchBuffers())
    assert values(out[0]) == {} and values(out[1]) == {"cls": b"b"}


def test_large_and_small_members_handed_on_as_bytes(tmp_path: Path, mapped: bool) -> None:
    big = bytes(range(256)) * 80  # 20 KiB: read by pread
    small = b"s" * g._BYTES_FROM_MAP  # at the limit: from the mapping
    path = tar_file(
        tmp_path / "a.tar",
        [("k0.jpg", big), ("k0.txt", b"t0"), ("k1.jpg", small), ("k1.txt", b"t1")],
    )
    idx = index(path)
    out: list[Any] = [None] * 2
    gather_tar([part(path, idx, [1, 0])], None, out, BatchBuffers(), None, frozenset({"jpg"}))
    assert type(out[0]["jpg"]) is bytes and type(out[1]["jpg"]) is bytes
    assert out[0]["jpg"] == small and out[1]["jpg"] == big
    assert isinstance(out[0]["txt"], memoryview) and bytes(out[1]["txt"]) == b"t0"
    assert list(out[1]) == ["__key__", "jpg", "txt", "__shard__", "__id__"]


def test_a_large_bytes_member_cut_after_the_fstat_fails_its_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = b"b" * (g._BYTES_FROM_MAP + 1)
    path = tar_file(tmp_path / "a.tar", [("k0.jpg", big), ("k1.jpg", b"x")])
    idx = index(path)
    real = os.pread

    def cut(fd: int, n: int, o: int) -> bytes:
        return real(fd, n, o)[: n - 5]  # the file lost its tail after the fstat

    monkeypatch.setattr(g.os, "pread", cut)
    out: list[Any] = [None] * 2
    gather_tar([part(path, idx, [0, 1])], None, out, BatchBuffers(), None, frozenset({"jpg"}))
    assert isinstance(out[0], ShardError) and (out[0].shard, out[0].key) == (path, "k0")
    assert out[0].reason.startswith(
        f"short read of field 'jpg': {len(big) - 5} of {len(big)} bytes"
    )
    assert values(out[1]) == {"jpg": b"x"}


def test_an_unmapped_file_cut_after_the_fstat_fails_the_samples_past_the_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OpenShard, "mapping", lambda self, size: None)
    path = tar_file(
        tmp_path / "a.tar",
        [("k0.txt", b"a" * 600), ("k1.txt", b"b" * 600), ("k2.txt", b"c" * 600)],
    )
    idx = index(path)
    cut_at = int(idx.offsets[1]) + 100  # in the middle of k1's member

    def preadv(fd: int, bufs: list[Any], o: int) -> int:
        (b,) = bufs
        n = max(0, min(len(b), cut_at - o))
        b[:n] = os.pread(fd, n, o)
        return n

    monkeypatch.setattr(g.os, "preadv", preadv)
    for fields in (None, {"txt"}):
        out: list[Any] = [None] * 3
        gather_tar([part(path, idx, [0, 1, 2])], fields, out, BatchBuffers())
        assert values(out[0]) == {"txt": b"a" * 600}
        for j, key in ((1, "k1"), (2, "k2")):
            assert isinstance(out[j], ShardError) and out[j].key == key
        assert out[1].reason.startswith("short read of field 'txt': 100 of 600 bytes")
        assert out[2].reason.startswith("short read of field 'txt': 0 of 600 bytes")


def test_a_part_that_failed_to_open_fails_its_samples(tmp_path: Path, mapped: bool) -> None:
    path = tar_file(tmp_path / "a.tar", [("k0.txt", b"a"), ("k1.txt", b"b")])
    idx = index(path)
    err = ShardError("cannot open shard: gone", shard="/d/x.tar")
    out: list[Any] = [None] * 4
    failed = TarPart(err, None, "/d/x.tar", [0, 2], [0, 1], [7, 8])
    gather_tar([failed, part(path, idx, [1, 0], js=[1, 3])], None, out, BatchBuffers())
    assert out[0] is err and out[2] is err
    assert values(out[1]) == {"txt": b"b"} and values(out[3]) == {"txt": b"a"}


def spied_copier(monkeypatch: pytest.MonkeyPatch) -> tuple[Copier, list[list[Any]]]:
    """A copier (with the compiled copy loaded) that records the copies handed to it."""
    g._load_compiled()
    c = Copier()
    calls: list[list[Any]] = []
    real = c.submit

    def spy(ops: Any, dst: int, keep: Any) -> Any:
        calls.append(list(ops))
        return real(ops, dst, keep)

    monkeypatch.setattr(c, "submit", spy)
    return c, calls


@pytest.mark.parametrize(
    ("size", "samples", "threaded"),
    [
        (9000, 8, True),  # 72,000 bytes
        (8192, 8, True),  # 65,536: exactly _COPY_THREAD_BYTES
        (8191, 8, False),  # 65,528
        (9000, 7, False),  # 63,000
    ],
)
def test_large_batches_go_to_the_copy_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, samples: int, threaded: bool
) -> None:
    path = tar_file(tmp_path / "a.tar", [(f"k{i}.bin", bytes([i]) * size) for i in range(8)])
    idx = index(path)
    c, calls = spied_copier(monkeypatch)
    out: list[Any] = [None] * samples
    gather_tar([part(path, idx, list(range(samples)))], None, out, BatchBuffers(), c)
    assert [sum(n for _a, _s, n in ops) for ops in calls] == ([size * samples] if threaded else [])
    assert [values(o)["bin"] for o in out] == [bytes([i]) * size for i in range(samples)]
    assert g._COPY_THREAD_BYTES == 64 << 10 and g._BYTES_FROM_MAP == 16 << 10
    c.close()


def test_the_free_reference_baseline_is_measured_alike_each_time() -> None:
    """``BatchBuffers`` reuses a buffer when its reference count is the baseline measured at
    import: measured again, and on a buffer held only by a list as ``_get`` reads it, it agrees."""
    assert g._free_refs() == g._FREE_REFS
    held = [np.empty(4096, dtype=np.uint8)]
    alone = sys.getrefcount(held[0])  # outside the assert: its rewriting holds temporaries
    view = held[0][:10]
    viewed = sys.getrefcount(held[0])
    del view
    assert (alone, viewed) == (g._FREE_REFS, g._FREE_REFS + 1)  # a view of it counts


def test_batch_buffers_keep_eight_by_default() -> None:
    bufs = BatchBuffers()
    assert bufs.keep_bytes == 512 << 20
    held = [bufs.get(100) for _ in range(10)]  # every one still in use
    assert len(bufs._bufs) == 8 and len({id(h.base) for h in held}) == 10
    del held
    assert len(bufs._bufs) == 8


def test_close_waits_for_the_copy_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's close returns once its copy thread has finished (here: still loading the
    compiled copy), not while the thread may still run."""
    monkeypatch.setattr(g, "_compiled", None)
    block = threading.Event()
    monkeypatch.setattr(g, "_load_compiled", lambda: block.wait(60))
    src = np.frombuffer(b"ab", dtype=np.uint8)
    dst = np.zeros(2, dtype=np.uint8)
    c = Copier()
    assert c.submit([(0, src.ctypes.data, 2)], dst.ctypes.data, None) is None
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (c.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.5)  # the thread is still busy: close waits
    block.set()
    assert closed.wait(30)
    closer.join(30)


def test_a_tar_ending_at_its_last_members_end(tmp_path: Path, mapped: bool) -> None:
    """The end-of-archive blocks lost after indexing: the last member ends at the file's last
    byte, and is read whole on every path."""
    cut = tar_file(
        tmp_path / "a.tar", [("k0.cls", b"c"), ("k0.txt", b"a" * 700), ("k1.txt", b"z" * 1024)]
    )
    idx = index(cut)
    os.truncate(cut, int(idx.offsets[2]) + 1024)  # a multiple of 512: no padding either
    # every field (one copy per sample), some (one per member), and handed on as bytes
    for fields, own in ((None, frozenset()), ({"txt"}, frozenset()), (None, {"txt"})):
        out: list[Any] = [None] * 2
        gather_tar([part(cut, idx, [1, 0])], fields, out, BatchBuffers(), None, own)
        assert values(out[0]) == {"txt": b"z" * 1024}
        assert values(out[1])["txt"] == b"a" * 700


def test_members_far_past_a_cut_fail_without_a_read(tmp_path: Path, mapped: bool) -> None:
    """The shard lost most of its bytes after indexing: the members past the cut, pages away,
    are neither copied nor read (which would fault past the mapping); their samples fail."""
    members = [(f"k{i}.txt", bytes([65 + i]) * 30_000) for i in range(6)]
    members += [(f"k{i}.cls", b"c") for i in range(6)]
    path = tar_file(tmp_path / "a.tar", sorted(members))
    idx = index(path)
    os.truncate(path, int(idx.offsets[2]) + 10)  # inside k1's txt (k0: cls, txt; k1: cls, txt)
    for fields in (None, {"txt"}, {"cls"}):
        out: list[Any] = [None] * 6
        gather_tar([part(path, idx, list(range(6)))], fields, out, BatchBuffers())
        first = values(out[0])
        assert first == {
            k: v
            for k, v in {"cls": b"c", "txt": b"A" * 30_000}.items()
            if fields is None or k in fields
        }
        for j in range(2 if fields == {"cls"} else 1, 6):  # k1's cls lies before the cut
            assert isinstance(out[j], ShardError) and out[j].key == f"k{j}", (fields, j)


def test_one_copy_per_sample_when_every_field_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All of a sample's members lie together: one copy of its span (headers between them
    included) when all are read; one copy per member read otherwise."""
    monkeypatch.setattr(g, "_COPY_THREAD_BYTES", 0)
    path = tar_file(
        tmp_path / "a.tar",
        [(f"k{i}.{f}", f"{f}{i}".encode() * 50) for i in range(3) for f in ("cls", "jpg", "txt")],
    )
    idx = index(path)
    c, calls = spied_copier(monkeypatch)
    for fields, n_ops in ((None, 3), ({"cls", "jpg", "txt"}, 3), ({"jpg", "txt"}, 6)):
        out: list[Any] = [None] * 3
        gather_tar([part(path, idx, [0, 1, 2])], fields, out, BatchBuffers(), c)
        assert len(calls[-1]) == n_ops, fields
        span = calls[-1][0][2]
        if fields is None or len(fields) == 3:  # cls, header, jpg, header, txt
            assert span == int(idx.offsets[2]) + int(idx.sizes[2]) - int(idx.offsets[0])
        for i, o in enumerate(out):
            want = {f: f"{f}{i}".encode() * 50 for f in ("cls", "jpg", "txt")}
            assert values(o) == {k: v for k, v in want.items() if fields is None or k in fields}
    c.close()


def test_bytes_members_up_to_16_kib_come_from_the_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tar_file(
        tmp_path / "a.tar",
        [("k0.jpg", b"a" * (16 << 10)), ("k1.jpg", b"b" * ((16 << 10) + 1))],
    )
    idx = index(path)
    preads: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, o: int) -> bytes:
        preads.append(n)
        return real(fd, n, o)

    monkeypatch.setattr(g.os, "pread", pread)
    out: list[Any] = [None] * 2
    gather_tar([part(path, idx, [0, 1])], None, out, BatchBuffers(), None, frozenset({"jpg"}))
    assert preads == [(16 << 10) + 1]  # only the larger one is read by pread
    assert out[0]["jpg"] == b"a" * (16 << 10) and out[1]["jpg"] == b"b" * ((16 << 10) + 1)


def test_loading_warms_the_specialization_the_copies_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy thread compiles (or loads from cache) the copy for what ``Copier.submit`` passes:
    an int64 ``[k, 3]`` array (a float64 warm-up would leave the first real batch to compile)."""
    import mmload.sources.memcopy as memcopy

    seen: list[tuple[Any, ...]] = []

    def record(ops: np.ndarray, dst: int) -> None:
        seen.append((ops.dtype, ops.shape))

    monkeypatch.setattr(memcopy, "copy_ranges", record)
    monkeypatch.setattr(g, "_compiled", None)
    g._load_compiled()
    assert seen == [(np.dtype(np.int64), (0, 3))]  # nothing copied
    assert g._compiled is record
