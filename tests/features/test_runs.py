"""The LSM runs directly, against a plain-Python model of their documented contract: rows sorted
by (code, ts), one per (code, ts) by the duplicate rule, the retention cutoff keeping each key's
rows after it plus its newest row at or before it; the index over codes; the merge policy and
its counts of merges and dropped rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmload.features.backend import NumpyOps, Ops, TorchOps
from mmload.features.runs import FANOUT, MAX_RUNS, Run, add_run, compact, make_run, merge

OPS = [NumpyOps(), TorchOps(torch.device("cpu"))]
Row = tuple[int, int, int]  # (code, ts, arrival id)


def _model(rows: list[Row], keep: str, cutoff: int | None) -> list[Row]:
    """What a run of ``rows`` (in arrival order) holds, written from the contract."""
    by_pair: dict[tuple[int, int], Row] = {}
    for r in rows:
        if keep == "last" or (r[0], r[1]) not in by_pair:
            by_pair[(r[0], r[1])] = r
    out = sorted(by_pair.values())
    if cutoff is not None:
        newest_old: dict[int, int] = {}
        for c, t, _ in out:
            if t <= cutoff:
                newest_old[c] = max(t, newest_old.get(c, t))
        out = [r for r in out if r[1] > cutoff or newest_old.get(r[0]) == r[1]]
    return out


def _np(a: object) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _run(ops: Ops, rows: list[Row], keep: str = "last", cutoff: int | None = None):  # type: ignore[no-untyped-def]
    a = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return make_run(
        ops,
        ops.asarray(a[:, 0].copy()),
        ops.asarray(a[:, 1].copy()),
        ops.asarray(a[:, 2:3].astype(np.float32)),  # the arrival id, as a float feature
        ops.asarray(a[:, 2:3].copy()),  # and as an int feature
        keep=keep,  # type: ignore[arg-type]
        cutoff=cutoff,
    )


def _rows(run: Run | None) -> list[Row]:
    if run is None:
        return []
    codes, ts, ids = _np(run.codes), _np(run.ts), _np(run.ints)[:, 0]
    assert (_np(run.floats)[:, 0] == ids).all()
    return list(zip(codes.tolist(), ts.tolist(), ids.tolist(), strict=True))


def _check_index(run: Run) -> None:
    codes, ts = _np(run.codes).tolist(), _np(run.ts).tolist()
    ukeys = sorted(set(codes))
    assert _np(run.ukeys).tolist() == ukeys
    assert _np(run.starts).tolist() == [codes.index(k) for k in ukeys] + [len(codes)]
    assert run.max_group == max(codes.count(k) for k in ukeys)
    assert run.max_ts == max(ts) and type(run.max_ts) is int


def _random_rows(rng: np.random.Generator, n: int, start: int = 0) -> list[Row]:
    codes = rng.integers(0, 6, n)
    ts = rng.integers(0, 12, n)
    return [(int(c), int(t), start + i) for i, (c, t) in enumerate(zip(codes, ts, strict=True))]


@pytest.mark.parametrize("ops", OPS, ids=["numpy", "torch"])
@pytest.mark.parametrize("keep", ["last", "first"])
@pytest.mark.parametrize("cutoff", [None, -1, 0, 5, 11, 20])
def test_make_run_equals_the_model(ops: Ops, keep: str, cutoff: int | None) -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 40, 200):
        rows = _random_rows(rng, n)
        run, dropped = _run(ops, rows, keep, cutoff)
        want = _model(rows, keep, cutoff)
        assert _rows(run) == want and dropped == n - len(want)
        assert run is not None
        _check_index(run)
    assert _run(ops, [], keep, cutoff) == (None, 0)


def test_two_rows_of_a_key_before_the_cutoff_keep_the_newer() -> None:
    run, dropped = _run(NumpyOps(), [(1, 3, 0), (1, 4, 1)], cutoff=10)
    assert _rows(run) == [(1, 4, 1)] and dropped == 1


@pytest.mark.parametrize("ops", OPS, ids=["numpy", "torch"])
@pytest.mark.parametrize("keep", ["last", "first"])
def test_merge_puts_the_newer_run_after_equal_rows(ops: Ops, keep: str) -> None:
    rng = np.random.default_rng(5)
    old, new = _random_rows(rng, 60), _random_rows(rng, 30, start=60)
    a, _ = _run(ops, old, keep)
    b, _ = _run(ops, new, keep)
    assert a is not None and b is not None
    m, dropped = merge(ops, a, b, keep=keep, cutoff=None)  # type: ignore[arg-type]
    want = _model(_rows(a) + _rows(b), keep, None)
    assert _rows(m) == want and dropped == a.n + b.n - len(want)


def _policy(sizes: list[int]) -> tuple[list[int], int]:
    """The documented size-tiered policy on sizes of disjoint runs: merge the two newest while
    the older is at most FANOUT times the newer, or while there are more than MAX_RUNS."""
    runs: list[int] = []
    merges = 0
    for s in sizes:
        runs.append(s)
        while len(runs) >= 2 and (len(runs) > MAX_RUNS or runs[-2] <= FANOUT * runs[-1]):
            runs.append(runs.pop() + runs.pop())
            merges += 1
    return runs, merges


def test_add_run_follows_the_policy() -> None:
    ops = NumpyOps()
    # disjoint keys: merging drops nothing, run sizes add up
    sizes = [200, 40, 9, 2, 1, 1, 300, 1, 5, 70, 2, 2, 2, 2]
    runs: tuple[Run, ...] = ()
    total = 0
    for i, s in enumerate(sizes):
        new, _ = _run(ops, [(i, t, total + t) for t in range(s)])
        assert new is not None
        runs, merges, dropped = add_run(ops, runs, new, keep="last", cutoff=None)
        total += s
        want_sizes, _ = _policy(sizes[: i + 1])
        assert [r.n for r in runs] == want_sizes and dropped == 0
        assert merges == len(_policy(sizes[:i])[0]) + 1 - len(want_sizes)
    assert len(runs) <= MAX_RUNS


def test_add_run_counts_every_merge_and_every_dropped_row() -> None:
    ops = NumpyOps()
    # every run holds the same (code, ts) pairs: each merge drops the older copies
    same = [(c, t, 0) for c in range(3) for t in range(4)]  # 12 rows
    runs: tuple[Run, ...] = ()
    for i in range(MAX_RUNS):  # sizes 12 each: every new run merges down into one
        rows = [(c, t, 100 * i + j) for j, (c, t, _) in enumerate(same)]
        new, _ = _run(ops, rows)
        assert new is not None
        runs, merges, dropped = add_run(ops, runs, new, keep="last", cutoff=None)
        assert (len(runs), merges, dropped) == ((1, 0, 0) if i == 0 else (1, 1, 12))
        assert _rows(runs[0]) == [(c, t, 100 * i + j) for j, (c, t, _) in enumerate(same)]
    # runs of 100, 20 and 4 rows stay apart (each older one is more than FANOUT times the
    # newer); 5 new rows, 4 of them repeating the newest run's pairs, cascade three merges
    runs = ()
    for code, n in ((0, 100), (1, 20), (2, 4), (2, 5)):
        new, _ = _run(ops, [(code, t, t) for t in range(n)])
        assert new is not None
        runs, merges, dropped = add_run(ops, runs, new, keep="last", cutoff=None)
    assert [r.n for r in runs] == [125] and (merges, dropped) == (3, 4)


@pytest.mark.parametrize("ops", OPS, ids=["numpy", "torch"])
def test_compact_merges_all_and_applies_the_cutoff(ops: Ops) -> None:
    assert compact(ops, (), keep="last", cutoff=None) == (None, 0)
    rng = np.random.default_rng(11)
    parts = [_random_rows(rng, n, start=1000 * i) for i, n in enumerate((50, 20, 30))]
    runs = tuple(r for r, _ in (_run(ops, p) for p in parts) if r is not None)
    for cutoff in (None, 4):
        one, dropped = compact(ops, runs, keep="last", cutoff=cutoff)
        want = _model([r for run in runs for r in _rows(run)], "last", cutoff)
        assert _rows(one) == want and dropped == sum(r.n for r in runs) - len(want)
        only, dropped1 = compact(ops, runs[:1], keep="last", cutoff=cutoff)
        want1 = _model(_rows(runs[0]), "last", cutoff)
        assert _rows(only) == want1 and dropped1 == runs[0].n - len(want1)
