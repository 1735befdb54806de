"""Phase 2 of an update: immutable sorted runs (the LSM levels), merged and compacted.

A :class:`Run` holds rows sorted by (key code, ts) with at most one row per (code, ts), plus an
index over its distinct codes, as arrays of the table's device (NumPy on the CPU, torch on a GPU:
see ``backend.py``). Nothing writes a run's arrays after it is built, so a reader that holds a run
sees it whole. One code path builds runs on either device; ``Ops`` supplies the primitives.

Duplicates: ``keep="last"`` keeps the row that arrived last (within an update, the later row;
across runs, the newer run), ``keep="first"`` the one that arrived first.

Retention: with a ``cutoff`` (newest feature ts - retention), a key keeps every row newer than the
cutoff plus its newest row at or before it, which is all that a join at any time >= cutoff needs.
Applied run by run it keeps a superset of that (each run keeps its own newest old row), which
joins the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmload.features.backend import Array, Ops

__all__ = [
    "FANOUT",
    "MAX_RUNS",
    "Keep",
    "Run",
    "add_run",
    "compact",
    "make_run",
    "merge",
    "upper_bound",
]

Keep = Literal["last", "first"]

# Size-tiered LSM: merge the two newest runs while the older is at most FANOUT times the newer,
# and whenever there are more than MAX_RUNS (a join searches every run, one launch each on a GPU).
FANOUT = 4
MAX_RUNS = 4


@dataclass(frozen=True, eq=False)
class Run:
    """Rows sorted by (code, ts), unique per (code, ts); all arrays on one device.

    codes, ts: int64 [n]; floats: float32 [n, n_float]; ints: int64 [n, n_int];
    ukeys: int64 [G] distinct codes (sorted); starts: int64 [G + 1], the rows of ukeys[g] are
    starts[g]:starts[g + 1]; max_group: rows of the largest group; max_ts: newest ts.
    """

    codes: Array
    ts: Array
    floats: Array
    ints: Array
    ukeys: Array
    starts: Array
    max_group: int
    max_ts: int
    cache: dict[str, Any] = field(default_factory=dict)  # GPU kernel arguments, build stream

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])


def _index(ops: Ops, codes: Array, ts: Array, floats: Array, ints: Array) -> Run:
    n = codes.shape[0]
    new = ops.mask(n, True)
    new[1:] = codes[1:] != codes[:-1]
    first = ops.nonzero(new)
    starts = ops.cat([first, ops.full(1, n)])
    sizes = starts[1:] - starts[:-1]
    return Run(
        codes=codes,
        ts=ts,
        floats=floats,
        ints=ints,
        ukeys=codes[first],
        starts=starts,
        max_group=int(sizes.max()),
        max_ts=int(ts.max()),
    )


def _finish(
    ops: Ops,
    codes: Array,
    ts: Array,
    floats: Array,
    ints: Array,
    keep: Keep,
    cutoff: int | None,
) -> tuple[Run | None, int]:
    """Drop duplicates, then rows the retention cutoff does not need; index what is left."""
    n0 = codes.shape[0]
    if n0 > 1:
        same = codes[1:] == codes[:-1]
        dup = same & (ts[1:] == ts[:-1])
        if bool(dup.any()):
            mask = ops.mask(n0, True)
            if keep == "last":
                mask[:-1] = ~dup
            else:
                mask[1:] = ~dup
            codes, ts, floats, ints = codes[mask], ts[mask], floats[mask], ints[mask]
    n = codes.shape[0]
    if cutoff is not None and n > 1:
        newest_old = ops.mask(n, True)
        newest_old[:-1] = (codes[1:] != codes[:-1]) | (ts[1:] > cutoff)
        mask = (ts > cutoff) | newest_old
        if not bool(mask.all()):
            codes, ts, floats, ints = codes[mask], ts[mask], floats[mask], ints[mask]
    if codes.shape[0] == 0:
        return None, n0
    return _index(ops, codes, ts, floats, ints), n0 - int(codes.shape[0])


def make_run(
    ops: Ops,
    codes: Array,
    ts: Array,
    floats: Array,
    ints: Array,
    *,
    keep: Keep,
    cutoff: int | None,
) -> tuple[Run | None, int]:
    """A run from one update's rows (any order); returns (run or None if empty, rows dropped)."""
    if codes.shape[0] == 0:
        return None, 0
    perm = ops.sort_perm(codes, ts)
    return _finish(ops, codes[perm], ts[perm], floats[perm], ints[perm], keep, cutoff)


def upper_bound(ops: Ops, run: Run, q_codes: Array, q_ts: Array) -> tuple[Array, Array]:
    """Per query (int64 [B] each): ``pos``, the number of rows with (code, ts) <= (q_code, q_ts),
    and ``lo``, the first row of q_code's group (its insertion point when absent). The query's
    as-of row is ``pos - 1`` when ``pos > lo``."""
    g_count = run.ukeys.shape[0]
    g = ops.searchsorted(run.ukeys, q_codes)
    lo = run.starts[g]
    gc = ops.minimum(g, g_count - 1)
    hit = (g < g_count) & (run.ukeys[gc] == q_codes)
    hi = ops.where(hit, run.starts[gc + 1], lo)
    pos = lo
    last = run.n - 1
    for _ in range(run.max_group.bit_length()):
        active = pos < hi
        mid = (pos + hi) >> 1
        le = run.ts[ops.minimum(mid, last)] <= q_ts
        pos = ops.where(active & le, mid + 1, pos)
        hi = ops.where(active & ~le, mid, hi)
    return pos, lo


def merge(ops: Ops, a: Run, b: Run, *, keep: Keep, cutoff: int | None) -> tuple[Run | None, int]:
    """Merge ``b`` (newer) into ``a`` in O(n): b's rows go after a's equal (code, ts) rows."""
    pos, _ = upper_bound(ops, a, b.codes, b.ts)
    idx_b = pos + ops.arange(b.n)
    ar_a = ops.arange(a.n)
    idx_a = ar_a + ops.searchsorted(pos, ar_a, right=True)
    n = a.n + b.n

    def two(x: Array, y: Array) -> Array:
        out = ops.empty_rows(x, n)
        out[idx_a] = x
        out[idx_b] = y
        return out

    return _finish(
        ops,
        two(a.codes, b.codes),
        two(a.ts, b.ts),
        two(a.floats, b.floats),
        two(a.ints, b.ints),
        keep,
        cutoff,
    )


def add_run(
    ops: Ops, runs: tuple[Run, ...], new: Run, *, keep: Keep, cutoff: int | None
) -> tuple[tuple[Run, ...], int, int]:
    """Append ``new`` and merge per the LSM policy; returns (runs, merges, rows dropped)."""
    out = [*runs, new]
    merges = dropped = 0
    while len(out) >= 2 and (len(out) > MAX_RUNS or out[-2].n <= FANOUT * out[-1].n):
        b = out.pop()
        a = out.pop()
        m, d = merge(ops, a, b, keep=keep, cutoff=cutoff)
        merges += 1
        dropped += d
        if m is not None:
            out.append(m)
    return tuple(out), merges, dropped


def compact(
    ops: Ops, runs: tuple[Run, ...], *, keep: Keep, cutoff: int | None
) -> tuple[Run | None, int]:
    """Merge all runs (oldest first) into one, applying the retention cutoff."""
    if not runs:
        return None, 0
    acc: Run | None = runs[0]
    dropped = 0
    if len(runs) == 1:
        r = runs[0]
        return _finish(ops, r.codes, r.ts, r.floats, r.ints, keep, cutoff)
    for r in runs[1:]:
        if acc is None:
            acc = r
            continue
        acc, d = merge(ops, acc, r, keep=keep, cutoff=cutoff)
        dropped += d
    return acc, dropped
