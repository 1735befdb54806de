"""Joins while a producer keeps updating: no future value, no torn snapshot, never going back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mmload.errors import MmloadError
from mmload.features import FOUND, FeatureTable

KEYS = 64


def _producer(
    table: FeatureTable, stop: threading.Event, steps: int, seed: int, interleave: bool = False
) -> None:
    """Step s writes every key at ts = 10 s (value = ts, exact in int64), then a late row for
    a few keys at an older ts (an out-of-order update), which must not hide newer rows.
    ``interleave``: before each step, wait until a reader has joined since the last one, so
    updates and joins really alternate however the threads are scheduled."""
    rng = np.random.default_rng(seed)
    keys = np.arange(KEYS)
    joins = table.stats()["joins"]
    for s in range(1, steps + 1):
        if interleave:
            deadline = time.monotonic() + 60
            while table.stats()["joins"] <= joins and time.monotonic() < deadline:
                time.sleep(0.0005)
            joins = table.stats()["joins"]
        if stop.is_set():
            return
        ts = np.full(KEYS, 10 * s)
        table.update({"k": keys, "ts": ts, "value": ts, "vec": np.stack([ts, ts], 1) * 1.0})
        late = rng.choice(keys, 4, replace=False)
        old = 10 * s - 5 - 10 * rng.integers(0, s, 4)
        table.update({"k": late, "ts": old, "value": old, "vec": np.stack([old, old], 1) * 1.0})


@pytest.mark.parametrize("retention", [None, 30])
def test_update_while_join_sees_consistent_snapshots(retention: int | None) -> None:
    table = FeatureTable(key="k", timestamp="ts", retention=retention)
    zero = np.zeros(KEYS, np.int64)
    table.update({"k": np.arange(KEYS), "ts": zero, "value": zero, "vec": np.zeros((KEYS, 2))})
    stop = threading.Event()
    errors: list[Exception] = []
    steps = 150
    producer = threading.Thread(target=_producer, args=(table, stop, steps, 0, True), daemon=True)

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        last_all = 0
        try:
            while producer.is_alive() or last_all < 10 * steps:
                newest = table.stats()["newest_feature_ts"] or 0
                # 1. never a future value, at any query time (within retention, the exact one)
                q_ts = rng.integers(0, newest + 20, 256)
                q_keys = rng.integers(0, KEYS, 256)
                out = table.join(q_keys, q_ts)
                found = out[FOUND].numpy()
                value = out["value"].numpy()
                assert (value[found] <= q_ts[found]).all(), "a feature from the future"
                assert (out["vec"].numpy()[found, 0] == value[found]).all(), "torn row"
                # 2. a whole update or none: all keys at +inf show the same step
                latest = table.join(np.arange(KEYS), np.full(KEYS, 10**12))
                v = latest["value"].numpy()
                assert latest[FOUND].all()
                assert (v == v[0]).all(), f"torn snapshot: {sorted(set(v.tolist()))[:5]}"
                # 3. snapshots only move forward
                assert v[0] >= last_all
                last_all = int(v[0])
        except (AssertionError, MmloadError) as e:  # re-raised in the test thread below
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    producer.start()
    for r in readers:
        r.start()
    producer.join(120)
    for r in readers:
        r.join(120)
    stop.set()
    assert not errors, errors[0]
    assert not producer.is_alive() and not any(r.is_alive() for r in readers)
    s = table.stats()
    # every step waited for a join since the previous one: updates and joins interleaved
    assert s["updates_applied"] == 1 + 2 * steps and s["joins"] >= steps
    assert s["newest_feature_ts"] == 10 * steps


def test_exact_values_after_concurrent_updates() -> None:
    """After the producer finishes, every (key, ts) resolves to the row it must."""
    table = FeatureTable(key="k", timestamp="ts")
    stop = threading.Event()
    _producer(table, stop, 30, 1)
    keys = np.repeat(np.arange(KEYS), 2)
    ts = np.tile([155, 300], KEYS)
    out = table.join(keys, ts)
    value = out["value"].numpy()
    assert out[FOUND].all()
    assert (value[1::2] == 300).all()
    assert ((value[0::2] == 150) | (value[0::2] == 155)).all()  # 155 only where a late row is
