"""Runs, LSM merges and retention: what compaction keeps, and that joins do not change."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from mmload.features import FeatureTable
from mmload.features.runs import FANOUT, MAX_RUNS

from .featuredata import check_join, oracle, random_update


def needed_rows(updates: list[pa.Table], cutoff: int) -> int:
    """Distinct (key, ts) rows a join at any time >= cutoff can need: all newer than the cutoff,
    plus each key's newest row at or before it."""
    df = pd.concat([u.select(["k", "ts"]).to_pandas() for u in updates]).drop_duplicates()
    newer = int((df["ts"] > cutoff).sum())
    return newer + int(df[df["ts"] <= cutoff]["k"].nunique())


@pytest.mark.parametrize("seed", range(25))
def test_retention_keeps_what_joins_after_the_cutoff_need(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    keys = [f"k{i}" for i in range(int(rng.integers(1, 15)))]
    retention = int(rng.integers(0, 30))
    table = FeatureTable(key="k", timestamp="ts", retention=retention)
    updates, next_id = [], 0
    for _ in range(int(rng.integers(2, 10))):
        n = int(rng.integers(1, 60))
        u = random_update(rng, next_id, n, keys, 100)
        next_id += n
        table.update(u)
        updates.append(u)
        now = table.stats()["newest_feature_ts"]
        cutoff = now - retention
        b = 50
        q_keys = [keys[j] for j in rng.integers(0, len(keys), b)]
        q_ts = rng.integers(cutoff, now + 10, b)  # at or after the cutoff: nothing lost
        check_join(table.join(q_keys, q_ts), oracle(updates, q_keys, q_ts))
        # run by run, each run keeps at most one old row per key
        assert table.stats()["rows"] <= needed_rows(updates, cutoff) + len(keys) * MAX_RUNS
    table.compact()
    assert table.stats()["rows"] == needed_rows(updates, cutoff)
    q_keys = [keys[j] for j in rng.integers(0, len(keys), 50)]
    q_ts = rng.integers(cutoff, now + 10, 50)
    check_join(table.join(q_keys, q_ts), oracle(updates, q_keys, q_ts))


def test_retention_drops_old_history_by_hand() -> None:
    t = FeatureTable(key="k", timestamp="ts", retention=10)
    t.update({"k": [1, 1, 1, 1, 2], "ts": [1, 5, 95, 100, 3], "x": [1.0, 5.0, 95.0, 100.0, 3.0]})
    # now = 100, cutoff = 90: key 1 keeps 95, 100 and its newest row <= 90 (ts 5); key 2 keeps 3
    assert t.stats()["rows"] == 4 and t.stats()["rows_dropped"] == 1
    out = t.join([1, 1, 2, 1], [92, 3, 500, 99])
    assert out["x"].tolist() == [5.0, 0.0, 3.0, 95.0]  # key 1 at ts 3 lost its row (ts 1)


def test_many_small_updates_keep_few_runs() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    rng = np.random.default_rng(3)
    sizes = []
    for i in range(200):
        k = rng.choice(50, 5, replace=False)
        t.update({"k": k, "ts": np.full(5, i), "x": np.full(5, float(i))})
        runs = t.snapshot().runs
        sizes.append(len(runs))
        assert len(runs) <= MAX_RUNS
        # size-tiered: each run is more than FANOUT times the next (newer) one
        assert all(a.n > FANOUT * b.n for a, b in itertools.pairwise(runs))
    assert max(sizes) > 1 and t.stats()["merges"] > 0
    assert t.stats()["rows"] == 1000  # no duplicates, no retention: nothing dropped


@pytest.mark.parametrize("duplicate", ["last", "first"])
def test_duplicate_rule_within_and_across_updates(duplicate: str) -> None:
    t = FeatureTable(key="k", timestamp="ts", duplicate=duplicate)
    t.update({"k": [1, 1, 2], "ts": [5, 5, 5], "x": [1.0, 2.0, 3.0]})
    t.update({"k": [1, 2], "ts": [5, 6], "x": [4.0, 5.0]})
    assert len(t.snapshot().runs) == 1  # the small second run was merged into the first
    t.update({"k": [2], "ts": [5], "x": [6.0]})  # a new run that ties with the older one
    want = {"last": [4.0, 6.0, 5.0], "first": [1.0, 3.0, 5.0]}[duplicate]
    assert t.join([1, 2, 2], [5, 5, 6])["x"].tolist() == want
    t.compact()
    assert t.join([1, 2, 2], [5, 5, 6])["x"].tolist() == want


def test_compact_does_not_change_joins() -> None:
    rng = np.random.default_rng(11)
    t = FeatureTable(key="k", timestamp="ts")
    for i in range(6):
        t.update(random_update(rng, i * 100, 100, list(range(20)), 50))
    q_keys, q_ts = rng.integers(0, 22, 400), rng.integers(-1, 55, 400)
    before = t.join(q_keys, q_ts)
    version = t.stats()["version"]
    t.compact()
    assert len(t.snapshot().runs) == 1 and t.stats()["version"] == version + 1
    after = t.join(q_keys, q_ts)
    for name in before:
        torch.testing.assert_close(after[name], before[name])


def test_old_snapshot_is_not_changed_by_later_updates() -> None:
    t = FeatureTable(key="k", timestamp="ts", retention=0)
    t.update({"k": [1, 1], "ts": [1, 2], "x": [1.0, 2.0]})
    snap = t.snapshot()
    arrays = [(r.codes.copy(), r.ts.copy(), r.floats.copy()) for r in snap.runs]
    for i in range(3, 40):
        t.update({"k": [1], "ts": [i], "x": [float(i)]})
    t.compact()
    for r, (codes, ts, floats) in zip(snap.runs, arrays, strict=True):
        assert np.array_equal(r.codes, codes) and np.array_equal(r.ts, ts)
        assert np.array_equal(r.floats, floats)
