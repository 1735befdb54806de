"""The GIL-free gather copy against a NumPy reference: many ranges from several source buffers
into one destination, in one call."""

from __future__ import annotations

import numpy as np

from mmload.sources.memcopy import copy_ranges


def test_copy_ranges_matches_a_slice_by_slice_copy() -> None:
    rng = np.random.default_rng(7)
    sources = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in (1, 37, 4096, 100_003)]
    dst = np.zeros(200_000, dtype=np.uint8)
    want = dst.copy()
    ops, place = [], 0
    for _ in range(300):
        s = int(rng.integers(len(sources)))
        src = sources[s]
        off = int(rng.integers(src.size))
        n = int(rng.integers(0, min(src.size - off, 900) + 1))  # zero-length ranges too
        ops.append((place, src.ctypes.data + off, n))
        want[place : place + n] = src[off : off + n]
        place += n + int(rng.integers(0, 3))  # gaps stay untouched
    copy_ranges(np.array(ops, dtype=np.int64).reshape(-1, 3), dst.ctypes.data)
    assert place < dst.size and np.array_equal(dst, want)


def test_no_ranges_copies_nothing() -> None:
    dst = np.full(8, 5, dtype=np.uint8)
    copy_ranges(np.zeros((0, 3), dtype=np.int64), dst.ctypes.data)
    assert dst.tolist() == [5] * 8
