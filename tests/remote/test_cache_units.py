"""The node-local shard cache (mmload.sources.cache) on its own: names, the working set, hits
and refetches, space accounting, pins, the eviction order, look-ahead, bad limits, pickling.
Shards are local files (fetched by copy), so every test is exact and fast. Written from the
cache's mutants (issue 15)."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import re
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmload.config import RemoteConfig
from mmload.errors import ConfigError, ShardError
from mmload.sources import cache as cache_mod
from mmload.sources.cache import CacheStats, Need, ShardCache, _NoRoom, cache_name, working_set
from mmload.sources.fetch import RemoteObject

pytestmark = pytest.mark.timeout(60)

SIZE = 1000


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def shards(tmp_path: Path, *names: str, size: int = SIZE) -> dict[str, str]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    urls = {}
    for i, n in enumerate(names):
        p = src / f"{n}.tar"
        p.write_bytes(bytes([i + 1]) * size)
        urls[n] = str(p)
    return urls


def present(c: ShardCache, urls: dict[str, str]) -> set[str]:
    return {n for n, u in urls.items() if c.path(u).exists()}


def need(url: str, first: int, last: int, size: int = SIZE) -> Need:
    return Need(url, size, None, False, first, last)


# -- names and the working set ------------------------------------------------------------------


def test_cache_name() -> None:
    def h(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:16]

    url = "https://h/data/shard-0001.tar"
    assert cache_name(url) == f"{h(url)}-shard-0001.tar"
    for url, tail in [
        ("s3://b/x/a.tar.gz", "a.tar"),
        ("s3://b/x/a.tgz", "a.tar"),
        ("https://h/p/a b+c.tar?sig=1", "a_b_c.tar"),
        ("https://h/p/dir/", "dir"),
        ("https://h/?q", "shard"),
        ("https://h/a.tar?x?y", "a.tar"),
        ("https://h/p/BOX", "BOX"),
        ("https://h/" + "n" * 100 + ".tar", ("n" * 100 + ".tar")[-80:]),
    ]:
        assert cache_name(url) == f"{h(url)}-{tail}", url


def test_working_set_sweeps_inclusive_intervals() -> None:
    assert working_set([]) == (0, 0)
    needs = [
        Need("a", 10, None, False, 0, 1),
        Need("b", 20, None, False, 1, 2),  # overlaps a at batch 1
        Need("c", 5, None, False, 2, 4),  # overlaps b at batch 2 only
        Need("d", None, None, False, 0, 9),  # unknown size: not counted
        Need("e", 0, None, False, 0, 9),
    ]
    assert working_set(needs) == (30, 1)
    assert working_set([Need("a", 7, None, False, 3, 3), Need("b", 7, None, False, 4, 4)]) == (7, 3)
    assert working_set([Need("a", 7, None, False, 2, 5), Need("a", 7, None, False, 5, 6)]) == (
        14,
        5,
    )


def test_cache_stats_snapshot() -> None:
    s = CacheStats(1, 2, 3, 4, 5, 6, 1.23456)
    assert s.snapshot() == {
        "cache_fetched_bytes": 1,
        "cache_fetches": 2,
        "cache_hits": 3,
        "cache_evicted": 4,
        "cache_evicted_bytes": 5,
        "cache_peak_bytes": 6,
        "cache_wait_seconds": 1.235,
    }


# -- fetch, hits and refetches ------------------------------------------------------------------


def test_fetch_once_then_hit_and_meta(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    a = urls["a"]
    version = str(os.stat(a).st_mtime_ns)
    path = c.fetch(a, size=SIZE, version=version, compressed=False)
    assert path == str(c.path(a)) == str(tmp_path / "cache" / cache_name(a))
    assert Path(path).read_bytes() == Path(a).read_bytes()
    meta = json.loads(Path(path + ".meta").read_text())
    assert meta == {"size": SIZE, "version": version}
    assert c.remote_object(a) == RemoteObject(SIZE, version)
    assert c.remote_object(urls["b"]) is None
    assert (c.stats.fetches, c.stats.hits, c.stats.fetched_bytes) == (1, 0, SIZE)
    assert c.stats.peak_bytes == SIZE
    assert c.fetch(a, size=SIZE, version=version, compressed=False) == path
    assert c.fetch(a, size=None, version=None, compressed=False) == path
    assert (c.stats.fetches, c.stats.hits) == (1, 2)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        [cache_name(a), cache_name(a) + ".meta", cache_name(a) + ".lock"]
    )


def test_changed_or_unrecorded_copy_is_fetched_again(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    c.fetch(a, size=None, version=None, compressed=False)
    meta = Path(str(c.path(a)) + ".meta")
    meta.write_text(json.dumps({"size": SIZE, "version": "old"}))
    # The manifest names another version or size: the cached copy is not that object.
    c.fetch(a, size=None, version=str(os.stat(a).st_mtime_ns), compressed=False)
    assert c.stats.fetches == 2
    meta.write_text(json.dumps({"size": SIZE + 1, "version": None}))
    c.fetch(a, size=SIZE, version=None, compressed=False)
    assert c.stats.fetches == 3
    meta.write_text(json.dumps({"size": None, "version": None}))  # nothing to compare: a hit
    c.fetch(a, size=SIZE, version="v", compressed=False)
    assert c.stats.fetches == 3
    for bad in ("not json", "[1, 2]"):  # a damaged record: fetched again
        meta.write_text(bad)
        c.fetch(a, size=SIZE, version=None, compressed=False)
    meta.unlink()
    c.fetch(a, size=SIZE, version=None, compressed=False)
    assert c.stats.fetches == 6


def test_a_fetch_waits_for_the_node_lock(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    for _ in range(2):  # a fetch and a hit first: the count goes on from there
        c.fetch(urls["b"], size=SIZE, version=None, compressed=False)
    lock = open(str(c.path(a)) + ".lock", "a+b")  # noqa: SIM115 (closed below)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is fetching it

    import threading

    result: list[str] = []
    t = threading.Thread(
        target=lambda: result.append(c.fetch(a, size=SIZE, version=None, compressed=False))
    )
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not result  # waiting, not fetching
    # The other process finishes its fetch (shard and record) and lets go.
    c.path(a).write_bytes(Path(a).read_bytes())
    Path(str(c.path(a)) + ".meta").write_text(json.dumps({"size": SIZE, "version": "v"}))
    fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(30)
    lock.close()
    assert result == [str(c.path(a))]
    assert (c.stats.fetches, c.stats.hits) == (1, 2)  # found it there: not fetched again


# -- space ------------------------------------------------------------------------------------


def test_used_and_disk_bytes(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    root = tmp_path / "cache"
    c = ShardCache(root, RemoteConfig(read_timeout=1.0))
    assert c.used_bytes() == 0 and c.disk_bytes() == 0  # no directory yet
    c.fetch(urls["a"], size=SIZE, version=None, compressed=False)
    c.fetch(urls["b"], size=SIZE, version=None, compressed=False)
    assert c.used_bytes() == c.disk_bytes() == 2 * SIZE  # .meta and .lock files not counted

    # A reservation held (locked) by a fetch in flight counts; one whose owner died is removed.
    live = root / ".reserve-live"
    live.write_bytes(b"700")
    fd = os.open(live, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    dead = root / ".reserve-dead"
    dead.write_bytes(b"500")
    # A partial download: young ones are left alone, old ones (their process died) removed.
    young, old = root / ".fetch-young", root / ".fetch-old"
    young.write_bytes(b"y" * 300)
    old.write_bytes(b"o" * 300)
    past = time.time() - (2 * 1.0 + 60) - 5
    os.utime(old, (past, past))
    # Entries that vanish while scanned (a dangling link) or cannot be read count nothing.
    (root / "gone.tar").symlink_to(root / "nowhere")
    bad = root / ".reserve-bad"
    bad.write_bytes(b"not a number")
    bad_fd = os.open(bad, os.O_RDWR)
    fcntl.flock(bad_fd, fcntl.LOCK_EX)
    try:
        assert c.used_bytes() == 2 * SIZE + 700
        assert not dead.exists() and not old.exists()
        assert live.exists() and young.exists()
        assert c.disk_bytes() == 2 * SIZE
    finally:
        os.close(fd)
        os.close(bad_fd)
    assert c.used_bytes() == 2 * SIZE  # its owner is gone now
    assert not live.exists()


def test_reserve_bounds_and_releases(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    root = tmp_path / "cache"
    c = ShardCache(root, RemoteConfig())
    assert c._reserve(10**12, "x", wait=True) is None  # no limit: nothing reserved
    c = ShardCache(root, RemoteConfig(cache_limit=1500))
    with pytest.raises(ConfigError, match=r"cache_limit=1500 bytes is smaller than shard u \(2000"):
        c._reserve(2000, "u", wait=True)
    root.mkdir()
    r = c._reserve(1500, "u", wait=True)
    assert r is not None
    assert r.path.parent == root and r.path.name.startswith(".reserve-")
    assert r.path.read_bytes() == b"1500"
    assert c.used_bytes() == 1500
    with pytest.raises(_NoRoom):
        c._reserve(1, "v", wait=False)
    r.release()
    assert not r.path.exists() and c.used_bytes() == 0
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r.fd)
    r = c._reserve(10, "u", wait=True)
    assert r is not None
    r.path.unlink()  # already gone: releasing still closes it
    r.release()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r.fd)
    c.fetch(urls["a"], size=SIZE, version=None, compressed=False)
    assert [p for p in os.listdir(root) if p.startswith((".reserve-", ".fetch-"))] == []


def test_reserve_gives_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=1500, read_timeout=10.0))
    c.acquire(need(urls["a"], 0, 0))  # pinned: cannot be evicted
    readings: list[float] = []

    def clock() -> float:  # 3 s a look
        readings.append(3.0 * len(readings))
        return readings[-1]

    fake = types.SimpleNamespace(monotonic=clock, perf_counter=time.perf_counter, time=time.time)
    monkeypatch.setattr(cache_mod, "time", fake)  # the cache's clock only
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        c.fetch(urls["b"], size=SIZE, version=None, compressed=False)
    assert str(e.value) == (
        f"cache_limit=1500 bytes cannot hold the shards in use plus {urls['b']} (1000 bytes): "
        "every cached shard is still needed or in use. Raise cache_limit (>= (interleave * "
        "partitions per rank + lookahead + 2) x shard size, see docs/streaming.md)"
    )
    # It gave up at the first look past 4 x max(read_timeout 10 s, 30 s) = 120 s (a fake clock),
    # having waited 0.05 s (a real one) between looks.
    assert readings[0] == 0 and readings[-2:] == [120.0, 123.0]
    assert time.perf_counter() - t0 < 30  # 40 looks of 0.05 s, not of a second
    c.release(urls["a"])


# -- pins ---------------------------------------------------------------------------------------


def test_pins_count_and_protect(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    a = urls["a"]
    root = tmp_path / "cache"
    c = ShardCache(root, RemoteConfig(cache_limit=SIZE))
    p1 = c.acquire(need(a, 0, 0))
    p2 = c.acquire(need(a, 0, 0))
    assert p1 == p2 == str(c.path(a))
    assert c._pins[a][1] == 2 and c.stats.fetches == 1
    assert c.stats.hits == 0  # a pinned shard is handed out without a look at the cache
    fd = c._pins[a][0]
    c.acquire(need(a, 0, 0))
    c.release(a)
    assert c._pins[a] == (fd, 2)
    # Pinned (a shared lock): another process cannot evict it.
    other = ShardCache(root, RemoteConfig(cache_limit=SIZE))
    assert not other._try_remove(c.path(a))
    c.release(a)
    assert not other._try_remove(c.path(a))  # still pinned once
    c.release(a)
    c.release(a)  # not pinned: nothing to do
    assert a not in c._pins
    assert other._try_remove(c.path(a))
    assert not c.path(a).exists() and not Path(str(c.path(a)) + ".meta").exists()
    assert (other.stats.evicted, other.stats.evicted_bytes) == (1, SIZE)
    assert not other._try_remove(c.path(a))  # gone: nothing removed


def test_acquire_refetches_a_shard_evicted_before_it_was_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    real_fetch = ShardCache.fetch
    evictions = [2]

    def fetch_then_lose(self: ShardCache, url: str, **kw: object) -> str:
        path = real_fetch(self, url, **kw)  # type: ignore[arg-type]
        if evictions[0]:
            evictions[0] -= 1
            os.unlink(path)  # another process evicted it between fetch and pin
        return path

    monkeypatch.setattr(ShardCache, "fetch", fetch_then_lose)
    assert c.acquire(need(a, 0, 0)) == str(c.path(a))
    assert c.stats.fetches == 3
    c.release(a)
    evictions[0] = 100
    with pytest.raises(ShardError) as e:
        c.acquire(need(a, 0, 0))
    assert str(e.value).startswith(
        "the shard was evicted 8 times before it could be read: raise cache_limit"
    )
    assert e.value.shard == a
    # Eight tries (the copy there, evicted; seven fetches, each evicted), then the error.
    assert (c.stats.fetches, c.stats.hits) == (3 + 7, 1)


# -- eviction order and look-ahead ----------------------------------------------------------------


def test_lookahead_fetches_ahead_and_evicts_what_is_done_first(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b", "c", "d", "e")
    cfg = RemoteConfig(cache_limit=3 * SIZE, lookahead=2, fetchers=1)
    c = ShardCache(tmp_path / "cache", cfg)
    needs = [need(urls[n], i, i) for i, n in enumerate("abcde")]
    c.follow(needs)
    # Batch 0 needs a; b and c are fetched ahead (lookahead 2); d waits.
    wait_for(lambda: present(c, urls) == {"a", "b", "c"} and not c._inflight, "look-ahead")
    time.sleep(0.1)
    assert present(c, urls) == {"a", "b", "c"}
    c.advance(1)  # a is done: evicted to make room for d
    wait_for(lambda: present(c, urls) == {"b", "c", "d"} and not c._inflight, "d")
    assert (c.stats.evicted, c.stats.fetches) == (1, 4)
    c.advance(2)
    wait_for(lambda: present(c, urls) == {"c", "d", "e"} and not c._inflight, "e")
    for n in "cde":
        assert c.acquire(needs["abcde".index(n)]) == str(c.path(urls[n]))
    assert c.stats.fetches == 5 and c.stats.hits == 3  # the acquires found them fetched
    c.close()


def test_eviction_order_done_then_foreign_then_farthest_later(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b", "c", "x", "n")
    root = tmp_path / "cache"
    ShardCache(root, RemoteConfig()).fetch(urls["x"], size=SIZE, version=None, compressed=False)
    c = ShardCache(root, RemoteConfig(cache_limit=4 * SIZE))
    for n in "abc":
        c.fetch(urls[n], size=SIZE, version=None, compressed=False)
    # a: done (last batch 0 < current 2); b needed at 5, c at 9 (fetched ahead); x: not ours.
    c._needs = [need(urls["a"], 0, 0), need(urls["b"], 5, 5), need(urls["c"], 9, 9)]
    c._current = 2
    assert c._evict_one(urls["n"], now=False)
    assert present(c, urls) == {"b", "c", "x"}
    assert c._evict_one(urls["n"], now=False)
    assert present(c, urls) == {"b", "c"}
    assert not c._evict_one(urls["n"], now=False)  # look-ahead never evicts what is needed
    assert c._evict_one(urls["n"], now=True)  # a fetch needed now does: the farthest first
    assert present(c, urls) == {"b"}
    assert c._evict_one(urls["n"], now=True)
    assert present(c, urls) == set()
    assert (c.stats.evicted, c.stats.evicted_bytes) == (4, 4 * SIZE)


def test_eviction_spares_current_pinned_skewed_and_the_target(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b", "c", "d")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=4 * SIZE))
    for n in "abcd":
        c.fetch(urls[n], size=SIZE, version=None, compressed=False)
    c._needs = [
        need(urls["a"], 0, 3),  # needed by the current batch
        need(urls["b"], 0, 1),  # done, but within the skew of slower readers
        need(urls["c"], 0, 0),  # done and pinned
        need(urls["d"], 0, 0),  # done: the shard being fetched
    ]
    c._current, c._skew = 3, 2
    c.acquire(c._needs[2])
    assert not c._evict_one(urls["d"], now=True)
    assert present(c, urls) == {"a", "b", "c", "d"}
    c._skew = 1
    assert c._evict_one(urls["d"], now=True)
    assert present(c, urls) == {"a", "c", "d"}
    c.release(urls["c"])
    assert c._evict_one(urls["a"], now=True)
    assert present(c, urls) == {"a", "d"}


def test_follow_rejects_a_limit_below_the_working_set(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=1500))
    with pytest.raises(ConfigError) as e:
        c.follow([need(urls["a"], 0, 2), need(urls["b"], 2, 3)])
    assert str(e.value) == (
        "cache_limit=1500 bytes is smaller than the shards this process reads at once: 2000 "
        "bytes at batch 2 (a group of `interleave` chunks in each of the rank's partitions). "
        "Raise cache_limit, or lower ShuffleConfig.interleave or partitions per rank "
        "(docs/streaming.md)"
    )
    assert c._pool is None  # nothing started
    c.follow([need(urls["a"], 0, 1), need(urls["b"], 2, 3)])
    wait_for(lambda: present(c, urls) == {"a"} and not c._inflight, "a")
    c.close()


def test_lookahead_without_room_waits_for_a_release(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=SIZE, lookahead=4, fetchers=1))
    needs = [need(urls["a"], 0, 0), need(urls["b"], 1, 1)]
    c.follow(needs)
    path = c.acquire(needs[0])
    wait_for(lambda: c._blocked and not c._inflight, "b deferred for room")
    assert present(c, urls) == {"a"} and c._next == 1  # b is handed out again later
    c.release(urls["a"])
    c.advance(1)
    wait_for(lambda: present(c, urls) == {"b"} and not c._inflight, "b fetched after the release")
    assert not Path(path).exists()
    c.close()


def test_close_and_pickle_start_afresh(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a")
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=1))
    c.follow([need(urls["a"], 0, 0)])
    c.acquire(need(urls["a"], 0, 0))
    ((fd, _),) = c._pins.values()
    copy = pickle.loads(pickle.dumps(c))
    assert copy._pins == {} and copy._pool is None and copy._inflight == {}
    assert copy.root == c.root and copy.cfg == c.cfg and copy._pid == os.getpid()
    assert copy.fetch(urls["a"], size=SIZE, version=None, compressed=False) == str(
        c.path(urls["a"])
    )
    assert copy.acquire(need(urls["a"], 0, 0)) == str(c.path(urls["a"]))
    copy.release(urls["a"])
    copy.close()
    c.close()
    assert c._pins == {} and c._pool is None and c._needs == []
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # the pin's descriptor is closed
    c.close()  # twice: nothing left to do


def test_stale_partial_downloads_after_twice_the_read_timeout_and_a_minute(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    c = ShardCache(root, RemoteConfig(read_timeout=100.0))  # stale after 260 s
    for name, age in ((".fetch-255", 255), (".fetch-265", 265)):
        (root / name).write_bytes(b"x")
        t = time.time() - age
        os.utime(root / name, (t, t))
    c.used_bytes()
    assert sorted(os.listdir(root)) == [".fetch-255"]


def test_fetch_checks_the_manifest_and_gunzips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = shards(tmp_path, "a")
    a = urls["a"]
    root = tmp_path / "deep" / "cache"  # parents are made
    c = ShardCache(root, RemoteConfig())
    for size, version in ((SIZE + 1, None), (SIZE, "other")):
        with pytest.raises(ShardError, match="shard changed since it was indexed"):
            c.fetch(a, size=size, version=version, compressed=False)
    # No size in the manifest: nothing to check against (a version alone is not checked).
    c.fetch(a, size=None, version="whatever", compressed=False)
    assert c.stats.fetches == 1

    gz = tmp_path / "src" / "b.tar.gz"
    plain = b"y" * 5000
    gz.write_bytes(gzip.compress(plain))
    with caplog.at_level("DEBUG", logger="mmload.sources.cache"):
        path = c.fetch(str(gz), size=gz.stat().st_size, version=None, compressed=True)
    assert Path(path).read_bytes() == plain and path.endswith("-b.tar")
    assert c.stats.fetches == 2
    assert c.stats.fetched_bytes == SIZE + gz.stat().st_size  # bytes fetched, not unpacked
    took = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.fullmatch(rf"fetched {re.escape(str(gz))} \((\d+\.\d\d)s\)", r.getMessage()))
    ]
    assert len(took) == 1 and 0 <= took[0] < 60


def _child_pins(c: ShardCache, url: str, q: Any) -> None:
    try:
        c.acquire(need(url, 0, 0))
        c.acquire(need(url, 0, 0))
        q.put(c._pins[url][1])
        c.follow([need(url, 0, 0)])  # a pool of its own
        c.close()
        q.put("ok")
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        q.put(repr(e))


def test_a_forked_child_starts_afresh(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a")
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    c.follow([need(urls["a"], 0, 0)])
    c.acquire(need(urls["a"], 0, 0))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_pins, args=(c, urls["a"], q))
    p.start()
    got = [q.get(timeout=60), q.get(timeout=60)]
    p.join(60)
    assert got == [2, "ok"]  # its own pins (two), not the parent's, and its own pool
    assert c._pins[urls["a"]][1] == 1  # the parent's are untouched
    c.close()


# -- races with the look-ahead, other threads and other processes (written from the mutants
# that survived the tests above) ----------------------------------------------------------------


def _fcntl_with(flock: Callable[[Any, int], None]) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        flock=flock,
        LOCK_SH=fcntl.LOCK_SH,
        LOCK_EX=fcntl.LOCK_EX,
        LOCK_UN=fcntl.LOCK_UN,
        LOCK_NB=fcntl.LOCK_NB,
    )


def _open_fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.removesuffix(" (deleted)") == str(path)
    return n


def test_acquire_takes_the_look_ahead_fetch_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard the look-ahead is fetching: acquire waits for that fetch, it does not start one
    of its own (nor count a cache hit)."""
    import threading

    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=1, fetchers=1))
    started, gate, looked = threading.Event(), threading.Event(), threading.Event()
    real = cache_mod.download

    def slow(*args: Any, **kw: Any) -> Any:
        started.set()
        assert gate.wait(30)
        return real(*args, **kw)

    class Inflight(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            looked.set()
            return super().get(key, default)

    monkeypatch.setattr(cache_mod, "download", slow)
    c._inflight = Inflight()
    c.follow([need(a, 0, 0)])
    assert started.wait(30)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(c.acquire(need(a, 0, 0))))
    t.start()
    looked.wait(30)  # acquire found the fetch in flight
    gate.set()
    t.join(30)
    assert out == [str(c.path(a))]
    assert (c.stats.fetches, c.stats.hits) == (1, 0)
    c.release(a)
    c.close()


def test_two_threads_pinning_one_shard_share_one_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    c.fetch(a, size=SIZE, version=None, compressed=False)
    inside, go = threading.Event(), threading.Event()
    real_fetch = c.fetch
    calls: list[str] = []

    def fetch(url: str, **kw: Any) -> str:
        calls.append(url)
        if len(calls) == 1:  # the first thread stops between its fetch and its pin
            inside.set()
            assert go.wait(30)
        return real_fetch(url, **kw)

    monkeypatch.setattr(c, "fetch", fetch)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(c.acquire(need(a, 0, 0))))
    t.start()
    assert inside.wait(30)
    c.acquire(need(a, 0, 0))  # this thread pins it first
    fd = c._pins[a][0]
    assert c._pins[a] == (fd, 1)
    go.set()
    t.join(30)
    assert out == [str(c.path(a))]
    assert c._pins[a] == (fd, 2)  # the same descriptor, pinned twice
    assert _open_fds_to(c.path(a)) == 1  # the other thread's own descriptor was closed
    c.release(a)
    c.release(a)
    assert a not in c._pins and _open_fds_to(c.path(a)) == 0


def test_acquire_retries_a_shard_evicted_between_open_and_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    evictions = [1]

    def flock(fd: Any, op: int) -> None:
        if op == fcntl.LOCK_SH and evictions[0] and isinstance(fd, int):
            evictions[0] -= 1  # another process held it exclusively and unlinked it
            os.unlink(os.readlink(f"/proc/self/fd/{fd}"))
        fcntl.flock(fd, op)

    monkeypatch.setattr(cache_mod, "fcntl", _fcntl_with(flock))
    path = c.acquire(need(a, 0, 0))
    assert Path(path).read_bytes() == Path(a).read_bytes()
    assert os.fstat(c._pins[a][0]).st_nlink == 1  # pinned the new copy, not the unlinked one
    assert c.stats.fetches == 2
    assert _open_fds_to(c.path(a)) == 1  # the unlinked copy's descriptor was closed
    c.release(a)


def test_acquire_fetches_what_the_need_describes(tmp_path: Path) -> None:
    """The need's size, version and compression reach the fetch: a cached copy of another
    size or version is fetched again, a gzipped shard is unpacked."""
    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    version = str(os.stat(a).st_mtime_ns)
    meta = Path(str(c.path(a)) + ".meta")
    c.fetch(a, size=SIZE, version=None, compressed=False)
    meta.write_text(json.dumps({"size": SIZE, "version": "old"}))
    c.acquire(Need(a, SIZE, version, False, 0, 0))
    c.release(a)
    assert c.stats.fetches == 2 and c.remote_object(a) == RemoteObject(SIZE, version)
    meta.write_text(json.dumps({"size": SIZE + 1, "version": None}))
    c.acquire(Need(a, SIZE, None, False, 0, 0))
    c.release(a)
    assert c.stats.fetches == 3
    gz = tmp_path / "src" / "b.tar.gz"
    gz.write_bytes(gzip.compress(b"z" * 3000))
    path = c.acquire(Need(str(gz), gz.stat().st_size, None, True, 0, 0))
    assert Path(path).read_bytes() == b"z" * 3000
    c.release(str(gz))


def test_acquire_counts_its_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    real = cache_mod.download

    def slow(*args: Any, **kw: Any) -> Any:
        time.sleep(0.2)
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "download", slow)
    for n in "ab":
        c.acquire(need(urls[n], 0, 0))
    assert 0.4 <= c.stats.wait_seconds < 60  # both waits, added up


def test_space_is_reserved_and_released_under_the_node_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process scanning the cache holds ``.space.lock``: a fetch neither reserves
    space nor gives its reservation back meanwhile, so a scan never sees the shard and its
    reservation both, or neither."""
    import threading

    urls = shards(tmp_path, "a")
    root = tmp_path / "cache"
    root.mkdir()
    c = ShardCache(root, RemoteConfig(cache_limit=10 * SIZE))
    downloaded, relocked = threading.Event(), threading.Event()
    real = cache_mod.download

    def dl(*args: Any, **kw: Any) -> Any:
        got = real(*args, **kw)
        downloaded.set()
        assert relocked.wait(30)
        return got

    def reservations() -> list[str]:
        return [n for n in os.listdir(root) if n.startswith(".reserve-")]

    monkeypatch.setattr(cache_mod, "download", dl)
    space = open(root / ".space.lock", "a+b")  # noqa: SIM115 (closed below)
    fcntl.flock(space, fcntl.LOCK_EX)
    t = threading.Thread(
        target=lambda: c.fetch(urls["a"], size=SIZE, version=None, compressed=False)
    )
    t.start()
    time.sleep(0.2)
    assert not downloaded.is_set() and reservations() == []  # waiting for the lock
    fcntl.flock(space, fcntl.LOCK_UN)
    assert downloaded.wait(30)
    assert len(reservations()) == 1
    fcntl.flock(space, fcntl.LOCK_EX)
    relocked.set()
    time.sleep(0.2)
    assert t.is_alive() and len(reservations()) == 1  # the release waits for the lock too
    fcntl.flock(space, fcntl.LOCK_UN)
    t.join(30)
    space.close()
    assert reservations() == [] and present(c, urls) == {"a"}


def test_a_fetch_needed_now_evicts_a_shard_needed_later(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b", "c")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=2 * SIZE))
    for n in "ab":
        c.fetch(urls[n], size=SIZE, version=None, compressed=False)
    c._needs = [need(urls["a"], 5, 5), need(urls["b"], 9, 9), need(urls["c"], 0, 0)]
    with pytest.raises(_NoRoom):  # the look-ahead never evicts what is needed
        c.fetch(urls["c"], size=SIZE, version=None, compressed=False, wait=False)
    c.fetch(urls["c"], size=SIZE, version=None, compressed=False)
    assert present(c, urls) == {"a", "c"}  # b, needed the farthest ahead, made room


def test_a_shard_of_unknown_size_reserves_nothing(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a", "b")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=SIZE))
    c.fetch(urls["a"], size=SIZE, version=None, compressed=False)  # the cache is full
    c.fetch(urls["b"], size=None, version=None, compressed=False)
    assert present(c, urls) == {"a", "b"} and c.stats.evicted == 0


def test_a_record_left_half_written_is_a_stale_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that dies writing the shard's record leaves a hidden ``.fetch-`` file: not
    counted as a shard, removed once stale like a partial download."""
    urls = shards(tmp_path, "a")
    root = tmp_path / "cache"
    c = ShardCache(root, RemoteConfig(read_timeout=1.0))
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".meta"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        c.fetch(urls["a"], size=SIZE, version=None, compressed=False)
    monkeypatch.undo()
    (left,) = [
        n for n in os.listdir(root) if not n.endswith(".lock") and n != cache_name(urls["a"])
    ]
    assert left.startswith(".fetch-")
    assert c.used_bytes() == SIZE  # the shard; the half-written record is not a shard
    past = time.time() - (2 * 1.0 + 60) - 5
    os.utime(root / left, (past, past))
    c.used_bytes()
    assert not (root / left).exists()


def test_eviction_details(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A shard needed by the current batch is never evicted, even when its first batch is the
    current one; a shard needed twice later counts from its earlier need; a shard being fetched,
    hidden files and a shard without a record; no cache directory at all."""
    urls = shards(tmp_path, "a", "b", "c", "d", "f")
    root = tmp_path / "cache"
    c = ShardCache(root, RemoteConfig(cache_limit=10 * SIZE))
    assert not c._evict_one("x", now=True)  # no directory yet: nothing to evict
    for n in "abcdf":
        c.fetch(urls[n], size=SIZE, version=None, compressed=False)
    (root / ".fetch-partial").write_bytes(b"p" * 10)  # another process's download
    (root / ".reserve-x").write_bytes(b"10")
    c._current = 4
    c._needs = [
        need(urls["a"], 4, 6),  # first needed by the current batch
        need(urls["b"], 5, 5),  # needed later twice: from batch 5 on
        need(urls["c"], 7, 7),
        need(urls["b"], 9, 9),
        need(urls["d"], 0, 0),  # done, but being fetched again (in flight)
        need(urls["f"], 0, 0),  # done
    ]
    c._inflight = {urls["d"]: None}  # type: ignore[dict-item]
    Path(str(c.path(urls["f"])) + ".meta").unlink()
    with caplog.at_level("DEBUG", logger="mmload.sources.cache"):
        assert c._evict_one("x", now=True)
    assert present(c, urls) == {"a", "b", "c", "d"}  # f, done, went first
    assert f"evicted {cache_name(urls['f'])} ({SIZE} bytes)" in caplog.messages
    assert c._evict_one("x", now=True)
    assert present(c, urls) == {"a", "b", "d"}  # c (7) is farther than b (5)
    assert c._evict_one("x", now=True)
    assert present(c, urls) == {"a", "d"}
    assert not c._evict_one("x", now=True)
    assert present(c, urls) == {"a", "d"}
    assert (root / ".fetch-partial").exists() and (root / ".reserve-x").exists()
    assert (c.stats.evicted, c.stats.evicted_bytes) == (3, 3 * SIZE)
    c._inflight = {}


def test_each_follow_starts_a_new_generation(tmp_path: Path) -> None:
    """Fetches handed out for an earlier plan report to a generation that is no longer
    current, so they cannot move the new plan's look-ahead."""
    urls = shards(tmp_path, "a")
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    seen = set()
    for _ in range(3):
        c.follow([need(urls["a"], 0, 0)])
        seen.add(c._generation)
    assert len(seen) == 3
    c.close()


def test_a_release_lets_a_blocked_look_ahead_go_on(tmp_path: Path) -> None:
    """The look-ahead found no room while a finished shard was still pinned (a slower reader);
    its release makes room, and the look-ahead goes on then, not a batch later."""
    urls = shards(tmp_path, "a", "b", "c")
    cfg = RemoteConfig(cache_limit=2 * SIZE, lookahead=2, fetchers=1)
    c = ShardCache(tmp_path / "cache", cfg)
    needs = [need(urls[n], i, i) for i, n in enumerate("abc")]
    c.follow(needs)
    c.acquire(needs[0])
    c.advance(1)  # a is done but still pinned: b fits, c does not
    wait_for(
        lambda: present(c, urls) == {"a", "b"} and c._blocked and not c._inflight, "c deferred"
    )
    c.release(urls["a"])
    wait_for(lambda: present(c, urls) == {"b", "c"} and not c._inflight, "c after the release")
    assert c._current == 1  # no batch boundary was needed
    c.close()


def test_lookahead_hands_out_exactly_what_it_may(tmp_path: Path) -> None:
    """No limit on space: the look-ahead fetches the shards needed now and ``lookahead`` more,
    once each; a copy already cached is not fetched (nor counted a hit), a stale one (another
    version or size) is."""
    urls = shards(tmp_path, "a", "b", "c", "d", "e")
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=3, fetchers=2))
    version = {n: str(os.stat(u).st_mtime_ns) for n, u in urls.items()}
    for n in "bcd":
        c.fetch(urls[n], size=SIZE, version=None, compressed=False)
    Path(str(c.path(urls["c"])) + ".meta").write_text(json.dumps({"size": SIZE, "version": "old"}))
    Path(str(c.path(urls["d"])) + ".meta").write_text(json.dumps({"size": 1, "version": None}))
    needs = [Need(urls[n], SIZE, version[n], False, i, i) for i, n in enumerate("abcde")]
    c.follow(needs)
    want = {"a", "b", "c", "d"}
    wait_for(lambda: present(c, urls) == want and c.stats.fetches == 6 and not c._inflight, "a-d")
    assert c._next == 4 and present(c, urls) == want
    assert (c.stats.fetches, c.stats.hits) == (3 + 3, 0)  # a and the stale c, d; b left alone
    for n in "cd":
        assert c.remote_object(urls[n]) == RemoteObject(SIZE, version[n])
    c.close()


def test_lookahead_unpacks_and_uses_at_most_fetchers_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    urls = shards(tmp_path, "a", "b", "c")
    gz = tmp_path / "src" / "g.tar.gz"
    gz.write_bytes(gzip.compress(b"g" * 4000))
    urls["g"] = str(gz)
    lock = threading.Lock()
    running, peak, names = [0], [0], set()
    real = cache_mod.download

    def counted(*args: Any, **kw: Any) -> Any:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            names.add(threading.current_thread().name)
        try:
            time.sleep(0.05)
            return real(*args, **kw)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(cache_mod, "download", counted)
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=3, fetchers=1))
    needs = [need(urls[n], i, i) for i, n in enumerate("abc")]
    needs.append(Need(str(gz), gz.stat().st_size, None, True, 3, 3))
    c.follow(needs)
    wait_for(lambda: present(c, urls) == set("abcg") and not c._inflight, "all four")
    assert peak[0] == 1 and len(names) == 1 and names.pop().startswith("mmload-fetch")
    assert c.path(str(gz)).read_bytes() == b"g" * 4000  # unpacked, as the need says
    c.close()


def test_a_shard_needed_now_makes_room_in_the_background(tmp_path: Path) -> None:
    """The look-ahead fetches the current batch's shard as a fetch needed now: it evicts a
    shard needed later to make room, rather than waiting for the consumer to ask for it."""
    urls = shards(tmp_path, "a", "x")
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=SIZE, lookahead=1, fetchers=1))
    c.fetch(urls["x"], size=SIZE, version=None, compressed=False)
    c.follow([need(urls["a"], 0, 0), need(urls["x"], 5, 5)])
    wait_for(lambda: present(c, urls) == {"a"} and not c._inflight, "a fetched, x evicted")
    assert not c._blocked
    c.close()


def test_a_failed_look_ahead_fetch_is_recorded(tmp_path: Path) -> None:
    urls = shards(tmp_path, "a")
    missing = str(tmp_path / "src" / "gone.tar")
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=2, fetchers=1, retries=0))
    c.follow([need(urls["a"], 0, 0), need(missing, 1, 1)])
    wait_for(lambda: not c._inflight and len(c.stats.errors) == 1, "the failure")
    (err,) = c.stats.errors
    assert err == f"{missing}: shard not found (shard {missing!r})"
    with pytest.raises(ShardError):  # the consumer gets the error when it needs the shard
        c.acquire(need(missing, 1, 1))
    c.close()


def test_close_cancels_queued_fetches_and_ends_the_fetch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    urls = shards(tmp_path, "a", "b", "c", "d")
    started, gate = threading.Event(), threading.Event()
    real = cache_mod.download

    def held(*args: Any, **kw: Any) -> Any:
        started.set()
        assert gate.wait(30)
        return real(*args, **kw)

    before = set(threading.enumerate())

    def fetch_threads() -> list[threading.Thread]:  # this cache's
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith("mmload-fetch") and t not in before
        ]

    monkeypatch.setattr(cache_mod, "download", held)
    c = ShardCache(tmp_path / "cache", RemoteConfig(lookahead=3, fetchers=1))
    c.follow([need(urls[n], i, i) for i, n in enumerate("abcd")])
    assert started.wait(30)  # a is being fetched; b, c, d wait in the queue
    assert len(fetch_threads()) == 1
    c.close()
    gate.set()
    wait_for(lambda: fetch_threads() == [], "the fetch thread to end")
    assert c.stats.fetches == 1 and present(c, urls) == {"a"}  # the queued ones never ran
