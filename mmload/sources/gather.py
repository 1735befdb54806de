"""A batch's tar members gathered into one buffer, handed on as read-only views of it.

Reading a 44 KB member with ``os.pread`` into a new ``bytes`` costs two things besides the
copy: the syscall, and the page faults of the fresh allocation (measured on the 2-core machine:
9-16 us per 44 KB sample, where DALI's reader takes about 8). So the reader maps each shard
read-only and copies the batch's members from the mapping into one buffer per batch (reused
once no view of it is left: :class:`BatchBuffers`); a member's value is a read-only
``memoryview`` of that buffer, which lives as long as any value of the batch does. Media
decoders take the views as they are (``np.frombuffer`` for DALI, a file object for
PIL/PyAV/soundfile). Fields the user receives as ``bytes`` (``as_bytes``) are read into their
own ``bytes`` by ``os.pread`` instead: a view would be copied to ``bytes`` downstream anyway,
after the buffer's copy.

A sample whose members lie together is copied with one copy of its span (the tar headers
between them included); when only some fields are read, each wanted member is copied alone.
The copy of a large batch runs on a copy thread, in one compiled call without the GIL
(:mod:`mmload.sources.memcopy`), while the calling thread builds the sample dicts, which need
only where each member will lie: the copy is bound by memory bandwidth, the dicts by the
interpreter, and they overlap.
The copy thread holds the mapping and the buffer while it copies, so neither can be freed
under it.

Truncation: before copying, each shard's size is checked (one ``fstat`` per shard per batch)
and the mapping renewed when the file changed; a member that ends past the end of the file
fails its sample with the short-read ``ShardError``, as ``pread`` did. Like DALI's readers
(which map by default), a shard truncated *during* that copy, by another program, raises
``SIGBUS``; mmload's own cache never truncates (it unlinks, and an unlinked file stays mapped).
A file that cannot be mapped (an empty one, a special file) is read with ``os.preadv`` into the
same buffer.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmload.errors import ShardError
from mmload.sources.tar import TarIndex

__all__ = ["BatchBuffers", "Copier", "OpenShard", "TarPart", "gather_tar"]

log = logging.getLogger(__name__)


def _free_refs() -> int:
    """What ``sys.getrefcount`` says of an array only a list holds, read as ``_get`` reads it
    (the count's baseline differs between CPython versions)."""
    probe = [np.empty(1, dtype=np.uint8)]
    return sys.getrefcount(probe[0])


_FREE_REFS = _free_refs()


class BatchBuffers:
    """Batch buffers, each reused once no view of it is left (fresh memory costs a page fault
    per 4 KiB on first touch: ~10 us per 44 KB sample here, more than the copy; whether the
    allocator hands back recycled pages depends on what else the process allocates).

    At most ``keep`` buffers and ``keep_bytes`` in all are kept; a batch that finds every kept
    buffer still in use gets a new one. One per thread, like the file handles."""

    def __init__(self, keep: int = 8, keep_bytes: int = 512 << 20) -> None:
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, n: int) -> np.ndarray:
        """``n`` bytes of a buffer that no earlier batch's value still views."""
        with self._lock:  # the slice returned holds its buffer before another thread looks
            return self._get(n)

    def _get(self, n: int) -> np.ndarray:
        bufs = self._bufs
        for i in range(len(bufs)):
            # References: the list's (and getrefcount's argument, where it counts one); a view
            # of a batch adds one (its memoryview's export holds the slice, which holds the
            # buffer). The baseline is measured, not assumed: _FREE_REFS.
            if sys.getrefcount(bufs[i]) <= _FREE_REFS and len(bufs[i]) >= n:
                return bufs[i][:n]
        new = np.empty(n + n // 8, dtype=np.uint8)  # room for the next, slightly larger batch
        free = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) <= _FREE_REFS]
        if free:  # a free buffer too small for this batch: replaced
            bufs.pop(free[0])
        if len(bufs) < self.keep and sum(len(b) for b in bufs) + len(new) <= self.keep_bytes:
            bufs.append(new)
        return new[:n]


class OpenShard:
    """A tar shard open for reading: its descriptor and, once read, its read-only mapping."""

    __slots__ = ("_map", "_unmappable", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: np.ndarray | None = None
        self._unmappable = False

    def mapping(self, size: int) -> np.ndarray | None:
        """The file mapped read-only (uint8), ``size`` (its current size) bytes long; None when
        it cannot be mapped."""
        m = self._map
        if m is not None and len(m) == size:
            return m
        self._map = None
        if size == 0 or self._unmappable:
            return None
        try:
            mm = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            self._unmappable = True
            return None
        # Never closed explicitly: the array holds the mapping, and a copy in flight holds the
        # array; the mapping goes when the last of them does.
        self._map = np.frombuffer(mm, dtype=np.uint8)
        return self._map

    def close(self) -> None:
        self._map = None
        os.close(self.fd)  # the mapping holds a descriptor of its own


@dataclass
class TarPart:
    """The samples of one tar shard in a batch: positions ``js`` in the batch, their rows in
    the shard and global ids; ``shard`` is the open file or the error that stopped opening it."""

    shard: OpenShard | ShardError
    index: TarIndex | None
    url: str
    js: list[int]
    rows: list[int]
    ids: list[int]


def _short(fld: str, got: int, size: int, url: str, key: str) -> ShardError:
    return ShardError(
        f"short read of field {fld!r}: {got} of {size} bytes (shard truncated after indexing?)",
        shard=url,
        key=key,
    )


# ``as_bytes`` members up to this size are copied from the mapping, larger ones read by pread.
_BYTES_FROM_MAP = 16 << 10

# Below this many bytes a batch is copied on the calling thread: the hand-over (~20-50 us) and,
# once per process, loading the compiled copy (~0.2 s) cost more than the copy.
_COPY_THREAD_BYTES = 64 << 10


def _copy(ops: list[tuple[int, int, int]], dst: int, keep: Any) -> None:
    """``memmove`` each ``(at, src, n)`` to ``dst + at`` on this thread, holding the GIL between
    copies (for small batches); ``keep`` stays referenced until the copy ends."""
    mv = ctypes.memmove
    for at, src, n in ops:
        mv(dst + at, src, n)
    del keep


def _copy_free(ops: np.ndarray, dst: int, keep: Any, started: threading.Event) -> None:
    """The same in one compiled call without the GIL (the copy thread's; a loop of
    ``ctypes.memmove`` there would wait for the GIL after every copy while the calling thread
    builds the samples). ``started`` is set just before the call lets the GIL go."""
    started.set()
    _compiled(ops, dst)
    del keep


_compiled: Any = None  # memcopy.copy_ranges once loaded in this process


def _load_compiled() -> None:
    """Import and load the compiled copy (~0.5 s: Numba, then the cached machine code)."""
    global _compiled
    try:
        from mmload.sources.memcopy import copy_ranges

        copy_ranges(np.zeros((0, 3), dtype=np.int64), 0)
    except Exception as e:  # noqa: BLE001 - the inline copy serves; said once per process
        log.warning("mmload: compiled batch copy unavailable, copying inline (%r)", e)
        return
    _compiled = copy_ranges


class Copier:
    """The copy thread of one reader (started on first use, per process). Until the compiled
    copy is loaded, which the thread does first, batches are copied on the calling thread:
    the first batch does not wait for Numba."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def submit(self, ops: list[tuple[int, int, int]], dst: int, keep: Any) -> Future[None] | None:
        """The copy started on the thread; None when it ran here (not loaded yet, or the
        reader is closing).

        Returns once the thread has begun: a thread woken while this one runs Python would get
        the GIL only at the next forced switch (5 ms by default, longer than building a batch's
        samples takes), so the copy would run after the samples are built rather than while."""
        pool = self._pool
        try:
            if pool is None or self._pid != os.getpid():
                pool = self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmload-copy")
                self._pid = os.getpid()
                if _compiled is None:
                    pool.submit(_load_compiled)
            if _compiled is None:
                _copy(ops, dst, keep)
                return None
            arr = np.array(ops, dtype=np.int64).reshape(-1, 3)
            started = threading.Event()
            fut = pool.submit(_copy_free, arr, dst, keep, started)
        except RuntimeError:  # shut down by close() from another thread just now
            _copy(ops, dst, keep)
            return None
        started.wait()  # lets the GIL go to the thread, which lets it go in the copy
        return fut

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)


def gather_tar(
    parts: Sequence[TarPart],
    fields: set[str] | None,
    out: list[Any],
    buffers: BatchBuffers,
    copier: Copier | None = None,
    as_bytes: frozenset[str] = frozenset(),
) -> None:
    """Read each part's samples into ``out[js]``: a dict per sample whose members are read-only
    views of one buffer for the whole batch (members of ``as_bytes`` fields: ``bytes`` of their
    own), or the sample's ``ShardError``.

    Plain Python over scalars: a shuffled batch holds a few samples of each shard, where NumPy's
    cost per call outweighs its gain per sample. A first pass lays the batch out (where each
    sample's bytes go, what to copy), then the copy runs (on ``copier``'s thread when large)
    while the second pass builds the samples."""
    plans: list[tuple[TarPart, TarIndex, bool, list[Any], memoryview | None]] = []
    fsizes: list[int] = []  # each plan's file size
    ops: list[tuple[int, int, int]] = []  # (place in the buffer, source address, length)
    reads: list[tuple[int, int, int, int, int]] = []  # unmapped: (place, fd, offset, n, plan)
    maps: list[np.ndarray] = []
    at = 0
    for part in parts:
        if isinstance(part.shard, ShardError):
            for j in part.js:
                out[j] = part.shard
            continue
        idx = part.index
        assert idx is not None
        fd = part.shard.fd
        fsize = os.fstat(fd).st_size
        src = part.shard.mapping(fsize)
        if src is not None:
            maps.append(src)
            addr = src.ctypes.data
        start, off, size = idx.starts.data, idx.offsets.data, idx.sizes.data
        units: list[Any] = []
        every = (fields is None or fields.issuperset(idx.field_names())) and as_bytes.isdisjoint(
            idx.field_names()
        )
        if every:  # one copy per sample: its span, the tar headers between members included
            for row in part.rows:
                a, b = start[row], start[row + 1]
                base = off[a] if b > a else 0
                n = off[b - 1] + size[b - 1] - base if b > a else 0
                units.append((a, b, at - base))
                if n and base + n <= fsize:  # else the sample fails in the second pass
                    if src is not None:
                        ops.append((at, addr + base, n))
                    else:
                        reads.append((at, fd, base, n, len(plans)))
                at += n
        else:  # one copy per wanted member
            names = idx.fields
            for row in part.rows:
                ms = [
                    m
                    for m in range(start[row], start[row + 1])
                    if fields is None or names[m] in fields
                ]
                units.append((ms, at))
                for m in ms:
                    if names[m] in as_bytes:
                        continue  # read into its own bytes in the second pass
                    o, z = off[m], size[m]
                    if z and o + z <= fsize:
                        if src is not None:
                            ops.append((at, addr + o, z))
                        else:
                            reads.append((at, fd, o, z, len(plans)))
                    at += z
        plans.append((part, idx, every, units, None if src is None else src.data))
        fsizes.append(fsize)
    buf = buffers.get(at)
    w = buf.data
    for place, fd, o, n, k in reads:  # rare (files that cannot be mapped): on this thread
        got = os.preadv(fd, [w[place : place + n]], o)
        if got < n:  # cut after the fstat: the samples past the cut fail
            fsizes[k] = min(fsizes[k], o + got)
    pending: Future[None] | None = None
    if ops:
        dst = buf.ctypes.data
        if copier is not None and at >= _COPY_THREAD_BYTES:
            pending = copier.submit(ops, dst, (buf, maps))
        else:
            _copy(ops, dst, None)
    r = w.toreadonly()
    try:
        for (part, idx, every, units, mapped), fsize in zip(plans, fsizes, strict=True):
            _build(part, idx, fsize, every, units, r, out, as_bytes, mapped)
    finally:
        if pending is not None:
            pending.result()


def _build(
    part: TarPart,
    idx: TarIndex,
    fsize: int,
    every: bool,
    units: list[Any],
    r: memoryview,
    out: list[Any],
    as_bytes: frozenset[str],
    mapped: memoryview | None,
) -> None:
    """Put one part's samples in ``out``: views of ``r`` where the first pass placed them."""
    off, size = idx.offsets.data, idx.sizes.data
    names, keys, url = idx.fields, idx.keys, part.url
    fd = part.shard.fd if isinstance(part.shard, OpenShard) else -1
    for j, row, gid, unit in zip(part.js, part.rows, part.ids, units, strict=True):
        key = keys[row]
        sample: dict[str, Any] = {"__key__": key}
        if every:
            a, b, shift = unit
            for m in range(a, b):
                o, z = off[m], size[m]
                if o + z > fsize:
                    out[j] = _short(names[m], max(0, min(z, fsize - o)), z, url, key)
                    break
                p = o + shift
                sample[names[m]] = r[p : p + z]
            else:
                sample["__shard__"] = url
                sample["__id__"] = gid
                out[j] = sample
        else:
            ms, p = unit
            for m in ms:
                o, z = off[m], size[m]
                if o + z > fsize:
                    out[j] = _short(names[m], max(0, min(z, fsize - o)), z, url, key)
                    break
                if names[m] in as_bytes:
                    # small: from the mapping (no syscall); large: pread, without the GIL
                    if mapped is not None and z <= _BYTES_FROM_MAP:
                        sample[names[m]] = mapped[o : o + z].tobytes()
                        continue
                    v = os.pread(fd, z, o)
                    if len(v) < z:  # cut after the fstat
                        out[j] = _short(names[m], len(v), z, url, key)
                        break
                    sample[names[m]] = v
                    continue
                sample[names[m]] = r[p : p + z]
                p += z
            else:
                sample["__shard__"] = url
                sample["__id__"] = gid
                out[j] = sample
