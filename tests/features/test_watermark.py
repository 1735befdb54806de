"""``join_with_watermark`` and ``PinnedTable`` directly, on a real FeatureTable: which samples
are early (newer than the watermark, or all of them when it is unknown), the three ``late``
policies, and a pinned table answering from its snapshot whatever the live table does later."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmload.features import FOUND, FeatureTable
from mmload.features.watermark import EARLY, PinnedTable, join_with_watermark


def _table() -> FeatureTable:
    t = FeatureTable(key="user", timestamp="ts")
    t.update(pa.table({"user": [1, 1, 2], "ts": [10, 20, 10], "v": [1.0, 2.0, 3.0]}))
    return t


KEYS = [1, 1, 2, 3]
TS = np.array([15, 25, 30, 5], dtype=np.int32)  # any integer dtype


@pytest.mark.parametrize(
    ("wm", "early"),
    [(None, [1, 1, 1, 1]), (15, [0, 1, 1, 0]), (25, [0, 0, 1, 0]), (30, [0, 0, 0, 0])],
)
def test_join_policy_joins_every_sample_and_flags_the_early_ones(
    wm: int | None, early: list[int]
) -> None:
    t = _table()
    if wm is not None:
        t.advance_watermark(wm)
    out, n_early, waited = join_with_watermark(t, KEYS, TS, "join", 5.0)
    assert out[EARLY].tolist() == [bool(e) for e in early] and n_early == sum(early)
    assert out["v"].tolist() == [1.0, 2.0, 3.0, 0.0] and out[FOUND].tolist() == [1, 1, 1, 0]
    assert waited == 0.0


def test_skip_policy_joins_early_samples_to_nothing() -> None:
    t = _table()
    t.advance_watermark(20)
    out, n_early, _ = join_with_watermark(t, KEYS, TS, "skip", 5.0)
    assert out[EARLY].tolist() == [False, True, True, False] and n_early == 2
    assert out[FOUND].tolist() == [True, False, False, False]  # key 3 has no rows at all
    assert out["v"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_wait_policy_waits_for_the_watermark_to_pass_the_newest_sample() -> None:
    t = _table()
    t.advance_watermark(10)
    passed = threading.Event()

    def advance() -> None:
        time.sleep(0.2)
        t.update(pa.table({"user": [2], "ts": [28], "v": [9.0]}))
        t.advance_watermark(30)
        passed.set()

    threading.Thread(target=advance, daemon=True).start()
    out, n_early, waited = join_with_watermark(t, KEYS, TS, "wait", 60.0)
    assert passed.is_set() and n_early == 0 and waited < 60.0  # ended by the watermark
    assert out["v"].tolist() == [1.0, 2.0, 9.0, 0.0]  # the row that arrived while waiting


def test_wait_policy_gives_up_after_max_wait() -> None:
    t = _table()
    t0 = time.monotonic()
    out, n_early, waited = join_with_watermark(t, KEYS, TS, "wait", 0.3)
    assert 0.3 <= waited <= time.monotonic() - t0 and n_early == 4
    assert out[EARLY].tolist() == [True] * 4 and out[EARLY].dtype == torch.bool
    out, n_early, waited = join_with_watermark(t, [], np.zeros(0, np.int64), "wait", 30.0)
    assert (n_early, waited) == (0, 0.0) and out[EARLY].tolist() == []


def test_a_pinned_table_answers_from_its_snapshot_and_never_waits() -> None:
    t = _table()
    pinned = PinnedTable(t, t.snapshot(), watermark=12)
    t.update(pa.table({"user": [1], "ts": [12], "v": [7.0]}))  # after the pin
    t.advance_watermark(100)
    assert pinned.version == pinned.snapshot.version < t.snapshot().version
    assert pinned.column_names == ("v",) and pinned.layout is pinned.snapshot.layout
    assert pinned.key == "user" and pinned.live is False  # the table's own attributes
    out, n_early, waited = join_with_watermark(pinned, KEYS, TS, "wait", 30.0)
    assert waited == 0.0 and n_early == 3  # its recorded watermark, not the live one
    assert out["v"].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert t.join([1], np.array([15]))["v"].tolist() == [7.0]


def test_a_pinned_table_before_any_update() -> None:
    t = FeatureTable(key="user", timestamp="ts")
    pinned = PinnedTable(t, t.snapshot(), watermark=None)
    t.update(pa.table({"user": [1], "ts": [1], "v": [1.0]}))
    assert pinned.layout is None and pinned.column_names == t.column_names == ("v",)
