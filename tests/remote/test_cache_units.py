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
    urls = shards(tmp_path, "a")
    a = urls["a"]
    c = ShardCache(tmp_path / "cache", RemoteConfig())
    (tmp_path / "cache").mkdir()
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
    assert (c.stats.fetches, c.stats.hits) == (0, 1)  # found it there: not fetched again


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
    assert c._reserve(10**12, "x") is None  # no limit: nothing reserved
    c = ShardCache(root, RemoteConfig(cache_limit=1500))
    with pytest.raises(ConfigError, match=r"cache_limit=1500 bytes is smaller than shard u \(2000"):
        c._reserve(2000, "u")
    root.mkdir()
    r = c._reserve(1500, "u")
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
    r = c._reserve(10, "u")
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
    c = ShardCache(tmp_path / "cache", RemoteConfig(cache_limit=1500))
    c.acquire(need(urls["a"], 0, 0))  # pinned: cannot be evicted
    clock = iter(range(0, 10**6, 7))
    monkeypatch.setattr(cache_mod.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(ConfigError) as e:
        c.fetch(urls["b"], size=SIZE, version=None, compressed=False)
    msg = str(e.value)
    assert (
        f"cache_limit=1500 bytes cannot hold the shards in use plus {urls['b']} (1000 bytes)" in msg
    )
    assert "Raise cache_limit" in msg
    assert next(clock) > 120  # it waited (a fake) 4 x max(read_timeout, 30 s) first
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
    with pytest.raises(Exception, match="evicted 8 times before it could be read") as e:
        c.acquire(need(a, 0, 0))
    assert getattr(e.value, "shard", None) == a


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
    assert c.stats.evicted == 4


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
    assert "cache_limit=1500 bytes is smaller than the shards this process reads" in str(e.value)
    assert "at once: 2000 bytes at batch 2" in str(e.value)
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
    assert any(
        re.fullmatch(rf"fetched {re.escape(str(gz))} \(\d+\.\d\ds\)", r.getMessage())
        for r in caplog.records
    )


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
