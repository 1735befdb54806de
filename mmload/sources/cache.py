"""The node-local shard cache: remote shards fetched whole, on demand and ahead of need, bounded.

Layout: ``<root>/<hash>-<name>`` holds a shard's bytes, ``<file>.meta`` its remote size and
version (ETag / mtime), ``<file>.lock`` serialises its fetch across the processes of a node.

* **Fetch once per node.** A fetch holds an exclusive ``flock`` on the shard's lock file; a
  second process (another DataLoader worker, another rank on the node) waiting on it finds the
  shard present when it gets the lock. Bytes go to a temporary file renamed into place: a
  half-downloaded shard never enters the cache.
* **In use.** A process holds a shared ``flock`` on every cached shard it reads (its pin); an
  evictor takes the file only if it gets an exclusive lock without waiting, so it never
  removes a shard another process is reading. An unlinked file stays readable through the
  descriptors already open, so even a race costs a re-fetch, never a wrong byte.
* **Look-ahead and eviction.** :meth:`ShardCache.follow` receives this process's shards in the
  order its plan needs them, with the last batch that needs each; fetcher threads stay up to
  ``lookahead`` shards ahead of the consumer. Before a fetch would take the cache past
  ``cache_limit``, shards no longer needed (last batch passed) are evicted first, then shards
  this process does not need at all (another process's leftovers, unlocked); shards still
  needed ahead are only waited for, never evicted.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mmload.config import RemoteConfig
from mmload.errors import ConfigError, ShardError
from mmload.sources.fetch import RemoteObject, download

__all__ = ["CacheStats", "Need", "ShardCache", "cache_name", "working_set"]

log = logging.getLogger(__name__)


class _Reservation:
    """Space reserved for a fetch in flight: a ``.reserve-*`` file holding its size, locked."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


def _live_reservation(path: Path) -> int:
    """The bytes a reservation holds; 0 (and it is removed) if its owner died: its lock is
    free. Call under the space lock."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(os.pread(fd, 32, 0) or b"0")
        os.unlink(path)  # nobody holds it: left by a process killed mid-fetch
        return 0
    finally:
        os.close(fd)


class _NoRoom(Exception):
    """No room for a look-ahead fetch now (it is fetched when needed)."""


def cache_name(url: str) -> str:
    """A file name for ``url``: a hash (unique) plus the tail of its name (readable)."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "shard"
    for suffix in (".tar.gz", ".tgz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)] + ".tar"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{safe}"


@dataclass(frozen=True)
class Need:
    """A shard this process reads: from batch ``first`` to batch ``last`` (rank-local numbers)."""

    url: str
    size: int | None
    version: str | None
    compressed: bool
    first: int
    last: int


def working_set(needs: Sequence[Need]) -> tuple[int, int]:
    """The most bytes of shards needed at the same batch, and that batch (a sweep over the
    needs' [first, last] intervals; a shard needed twice counts once per interval)."""
    events: list[tuple[int, int]] = []
    for n in needs:
        if n.size:
            events += [(n.first, n.size), (n.last + 1, -n.size)]
    events.sort()
    cur = peak = 0
    at = 0
    for batch, delta in events:
        cur += delta
        if cur > peak:
            peak, at = cur, batch
    return peak, at


@dataclass
class CacheStats:
    fetched_bytes: int = 0
    fetches: int = 0
    hits: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    peak_bytes: int = 0
    wait_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, int | float]:
        return {
            "cache_fetched_bytes": self.fetched_bytes,
            "cache_fetches": self.fetches,
            "cache_hits": self.hits,
            "cache_evicted": self.evicted,
            "cache_evicted_bytes": self.evicted_bytes,
            "cache_peak_bytes": self.peak_bytes,
            "cache_wait_seconds": round(self.wait_seconds, 3),
        }


class ShardCache:
    """Remote shards on local disk for one process (shared safely with the others of a node)."""

    def __init__(self, root: Path, cfg: RemoteConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.stats = CacheStats()
        self._cond = threading.Condition()
        self._pins: dict[str, tuple[int, int]] = {}  # url -> (fd holding LOCK_SH, refcount)
        self._inflight: dict[str, Future[str]] = {}
        self._needs: list[Need] = []
        self._firsts: list[int] = []
        self._blocked = False
        self._next = 0  # the first need not yet handed to a fetcher
        self._current = 0  # the consumer's batch
        self._skew = 0  # how far behind the other readers of the node's shards may be
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._generation = 0

    def _check_pid(self) -> None:
        # A forked process inherits the parent's pins (its shared locks) and pool threads that
        # do not exist here: start afresh, never closing the parent's descriptors.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._cond = threading.Condition()
            self._pins = {}
            self._inflight = {}
            self._pool = None
            self._needs, self._firsts, self._next = [], [], 0

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for k in ("_cond", "_pins", "_inflight", "_pool"):
            del state[k]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._cond = threading.Condition()
        self._pins, self._inflight, self._pool = {}, {}, None
        self._pid = os.getpid()

    # -- paths ----------------------------------------------------------------------------------

    def path(self, url: str) -> Path:
        return self.root / cache_name(url)

    def _meta(self, url: str) -> RemoteObject | None:
        try:
            d = json.loads(self.path(url).with_name(self.path(url).name + ".meta").read_text())
            return RemoteObject(d.get("size"), d.get("version"))
        except (OSError, ValueError, AttributeError):
            return None

    def remote_object(self, url: str) -> RemoteObject | None:
        """What the server reported about the cached copy of ``url`` (size, version)."""
        return self._meta(url)

    def _present(self, url: str, size: int | None, version: str | None) -> bool:
        p = self.path(url)
        if not p.exists():
            return False
        meta = self._meta(url)
        if meta is None:
            return False
        if size is not None and meta.size is not None and meta.size != size:
            return False
        return version is None or meta.version is None or meta.version == version

    def used_bytes(self) -> int:
        """Bytes of every shard in the cache plus the space reserved by fetches in flight (all
        processes of the node); partial downloads are covered by their reservation."""
        total = 0
        stale_after = 2 * self.cfg.read_timeout + 60  # no live download is silent that long
        try:
            with os.scandir(self.root) as it:
                for e in it:
                    name = e.name
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        if name.startswith(".reserve-"):
                            total += _live_reservation(Path(e.path))
                        elif name.startswith(".fetch-"):
                            if time.time() - e.stat().st_mtime > stale_after:
                                os.unlink(e.path)  # left by a process killed mid-fetch
                        elif not name.startswith(".") and not name.endswith((".meta", ".lock")):
                            total += e.stat().st_size
        except FileNotFoundError:
            return 0
        return total

    def disk_bytes(self) -> int:
        """Bytes of the complete shards in the cache."""
        total = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as it:
            for e in it:
                if not e.name.startswith(".") and not e.name.endswith((".meta", ".lock")):
                    with contextlib.suppress(FileNotFoundError):
                        total += e.stat().st_size
        return total

    # -- fetch ----------------------------------------------------------------------------------

    def fetch(
        self,
        url: str,
        *,
        size: int | None,
        version: str | None,
        compressed: bool,
        wait: bool = True,
    ) -> str:
        """The shard's local path, fetched first if it is not cached (once per node)."""
        self._check_pid()
        if self._present(url, size, version):
            self.stats.hits += 1
            return str(self.path(url))
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(url)
        lock_path = target.with_name(target.name + ".lock")
        t0 = time.perf_counter()
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process fetching it: wait for it
            try:
                if self._present(url, size, version):
                    self.stats.hits += 1
                    return str(target)
                reservation = self._reserve(size or 0, url, wait=wait)
                try:
                    expect = RemoteObject(size, version) if size is not None else None
                    got = download(url, target, self.cfg, compressed=compressed, expect=expect)
                finally:
                    if reservation is not None:  # under the space lock: a scan in progress
                        with open(self.root / ".space.lock", "a+b") as space:  # sees it or
                            fcntl.flock(space, fcntl.LOCK_EX)  # the shard, never neither
                            reservation.release()
                meta = target.with_name(target.name + ".meta")
                tmp = meta.with_name(".fetch-" + meta.name)
                tmp.write_text(json.dumps({"size": got.size, "version": got.version}))
                os.replace(tmp, meta)
                with self._cond:
                    self.stats.fetches += 1
                    self.stats.fetched_bytes += got.size or target.stat().st_size
                    self.stats.peak_bytes = max(self.stats.peak_bytes, self.disk_bytes())
                    self._cond.notify_all()
                log.debug("fetched %s (%.2fs)", url, time.perf_counter() - t0)
                return str(target)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def acquire(self, need: Need) -> str:
        """Fetch (or wait for the fetcher of) ``need`` and pin it: the returned path is not
        evicted until :meth:`release`."""
        self._check_pid()
        with self._cond:
            held = self._pins.get(need.url)
            if held is not None:
                self._pins[need.url] = (held[0], held[1] + 1)
                return str(self.path(need.url))
            fut = self._inflight.get(need.url)
        t0 = time.perf_counter()
        for _ in range(8):  # another process may evict it between the fetch and the lock
            path = fut.result() if fut is not None else ""
            fut = None
            if not path:  # not fetched ahead (or deferred for room): fetch it now
                path = self.fetch(
                    need.url, size=need.size, version=need.version, compressed=need.compressed
                )
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)
                continue
            break
        else:
            raise ShardError(
                "the shard was evicted 8 times before it could be read: raise cache_limit",
                shard=need.url,
            )
        self.stats.wait_seconds += time.perf_counter() - t0
        with self._cond:
            held = self._pins.get(need.url)
            if held is not None:  # another thread pinned it meanwhile
                os.close(fd)
                self._pins[need.url] = (held[0], held[1] + 1)
            else:
                self._pins[need.url] = (fd, 1)
        return path

    def release(self, url: str) -> None:
        """Unpin ``url`` (once per :meth:`acquire`). The last release makes it evictable: a
        look-ahead waiting for room goes on at once, not at the next batch."""
        with self._cond:
            held = self._pins.get(url)
            if held is None:
                return
            if held[1] > 1:
                self._pins[url] = (held[0], held[1] - 1)
                return
            del self._pins[url]
            os.close(held[0])
            self._blocked = False
            self._cond.notify_all()
        self._schedule()

    # -- eviction -------------------------------------------------------------------------------

    def _reserve(self, size: int, for_url: str, *, wait: bool) -> _Reservation | None:
        """Evict until ``size`` more bytes fit under ``cache_limit``, then reserve them (a
        ``.reserve-*`` file the other processes count) under a node-wide lock, so concurrent
        fetches cannot overshoot the limit together. No limit: nothing to do."""
        limit = self.cfg.cache_limit
        if limit is None:
            return None
        if size > limit:
            raise ConfigError(
                f"cache_limit={limit} bytes is smaller than shard {for_url} ({size} bytes)"
            )
        deadline = time.monotonic() + max(self.cfg.read_timeout, 30.0) * 4
        while True:
            with open(self.root / ".space.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                used = self.used_bytes()  # one scan per eviction, not two
                while used + size > limit and self._evict_one(for_url, now=wait):
                    used = self.used_bytes()
                if used + size <= limit:
                    # Held under an exclusive flock while the fetch runs: a reservation whose
                    # lock can be taken belongs to a process that died mid-fetch.
                    fd, path = tempfile.mkstemp(dir=self.root, prefix=".reserve-")
                    os.write(fd, str(size).encode())
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    return _Reservation(Path(path), fd)
            if not wait:
                raise _NoRoom(for_url)
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"cache_limit={limit} bytes cannot hold the shards in use plus {for_url} "
                    f"({size} bytes): every cached shard is still needed or in use. Raise "
                    "cache_limit (>= (interleave * partitions per rank + lookahead + 2) x "
                    "shard size, see docs/streaming.md)"
                )
            with self._cond:  # wait for a release or a batch boundary, then look again
                self._cond.wait(0.05)

    def _evict_one(self, for_url: str, *, now: bool) -> bool:
        """Remove one evictable shard, in this order: one this process no longer needs, one it
        does not need at all, and (only to make room for a shard needed ``now``) one it needs
        later (fetched ahead; fetched again when its turn comes). Never a pinned one, one
        being fetched, or one another process reads (it holds a shared lock)."""
        with self._cond:
            later: dict[str, int] = {}
            alive: set[str] = set()
            for n in self._needs:
                if n.last + self._skew >= self._current:
                    alive.add(n.url)
                    if n.first > self._current:
                        later[n.url] = min(later.get(n.url, n.first), n.first)
            soon = {u for u in alive if u not in later}  # needed by the current batch
            done = [n.url for n in self._needs if n.url not in alive]
            keep = soon | set(self._pins) | set(self._inflight) | {for_url}
        try:
            with os.scandir(self.root) as it:
                names = {
                    e.name
                    for e in it
                    if not e.name.startswith(".") and not e.name.endswith((".meta", ".lock"))
                }
        except FileNotFoundError:
            return False
        keep_names = {cache_name(u) for u in keep}
        mine = {cache_name(u) for u in alive | set(done)}
        order = [cache_name(u) for u in dict.fromkeys(done)]
        order += sorted(n for n in names if n not in mine)
        if now:  # the farthest first
            order += [cache_name(u) for u in sorted(later, key=lambda u: -later[u])]
        for name in order:
            if name in names and name not in keep_names and self._try_remove(self.root / name):
                return True
        return False

    def _try_remove(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another process reads it
            size = os.fstat(fd).st_size
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.with_name(path.name + ".meta"))
            self.stats.evicted += 1
            self.stats.evicted_bytes += size
            log.debug("evicted %s (%d bytes)", path.name, size)
            return True
        finally:
            os.close(fd)

    # -- look-ahead -----------------------------------------------------------------------------

    def follow(self, needs: Sequence[Need], *, skew: int = 0) -> None:
        """This process's shards for the rest of the epoch, in the order it first needs them;
        fetching starts at once, up to ``lookahead`` shards ahead of :meth:`advance`. A shard
        counts as no longer needed ``skew`` batches after its last one: the other workers of
        the rank, which read the same shards, may be that far behind."""
        self._check_pid()
        limit = self.cfg.cache_limit
        if limit is not None:
            peak, at = working_set(needs)
            if peak > limit:
                raise ConfigError(
                    f"cache_limit={limit} bytes is smaller than the shards this process reads "
                    f"at once: {peak} bytes at batch {at} (a group of `interleave` chunks in "
                    "each of the rank's partitions). Raise cache_limit, or lower "
                    "ShuffleConfig.interleave or partitions per rank (docs/streaming.md)"
                )
        with self._cond:
            self._generation += 1
            self._needs = sorted(needs, key=lambda n: n.first)
            self._firsts = [n.first for n in self._needs]
            self._next = 0
            self._current = 0
            self._skew = skew
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.cfg.fetchers, thread_name_prefix="mmload-fetch"
                )
        self._schedule()

    def advance(self, batch: int) -> None:
        """The consumer reached ``batch``: shards whose last batch passed may be evicted, and
        the look-ahead moves on."""
        with self._cond:
            self._current = batch
            self._blocked = False
            self._cond.notify_all()
        self._schedule()

    def _schedule(self) -> None:
        with self._cond:
            if self._pool is None:
                return
            # Shards needed now are always fetched; up to `lookahead` more beyond them (needs are
            # sorted by first batch, so those handed out and not needed yet are a suffix).
            while self._next < len(self._needs):
                n = self._needs[self._next]
                if n.first > self._current:
                    if self._blocked:  # no room for look-ahead until something is released
                        break
                    ahead = self._next - bisect.bisect_right(self._firsts, self._current)
                    if ahead >= self.cfg.lookahead:
                        break
                if n.url not in self._inflight and not self._present(n.url, n.size, n.version):
                    fut = self._pool.submit(self._fetch_need, n, self._generation)
                    self._inflight[n.url] = fut
                self._next += 1

    def _fetch_need(self, n: Need, generation: int) -> str:
        now = n.first <= self._current
        try:
            return self.fetch(
                n.url, size=n.size, version=n.version, compressed=n.compressed, wait=now
            )
        except _NoRoom:
            with self._cond:  # fetched when it is needed, or when room frees up
                if generation == self._generation:
                    self._blocked = True
                    self._next = min(self._next, self._needs.index(n))
            return ""
        except (ShardError, ConfigError) as e:
            self.stats.errors.append(f"{n.url}: {e}")
            raise
        finally:
            with self._cond:
                fut = self._inflight.pop(n.url, None)
                if generation == self._generation and fut is not None:
                    self._cond.notify_all()
            self._schedule()

    def close(self) -> None:
        self._check_pid()
        with self._cond:
            pool, self._pool = self._pool, None
            self._needs = []
            for fd, _ in self._pins.values():
                os.close(fd)
            self._pins.clear()
        if pool is not None and self._pid == os.getpid():
            # Downloads in flight finish (or fail) on their own; closing does not wait for them.
            pool.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            self._inflight.clear()
