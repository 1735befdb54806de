"""The scale simulation (benchmarks/remote_scale.py) as a test: 16 ranks x 2 workers over
1,024 remote shards on loopback, each worker its own Dataset, the workers of a rank sharing a
bounded node cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from remote_scale import simulate


@pytest.mark.timeout(300)
def test_sixteen_ranks_two_workers_thousand_shards() -> None:
    rep, s = simulate(shards=1024, ranks=16, workers=2, lookahead=4, interleave=4)
    assert s["exactly_once"], "every sample once across all ranks x workers"
    lookahead_mb = s["lookahead_kb"] / 1024
    for row in rep.rows:
        # Its share plus the look-ahead, within the 15 %.
        assert row["fetched_mb"] <= 1.15 * row["share_mb"] + lookahead_mb, row
        assert row["peak_cache_kb"] <= row["cache_limit_kb"], row
        # Before the first batch: the shards of that batch plus the look-ahead, whatever the
        # data set's size (a group of `interleave` shards, its neighbour and 4 ahead).
        assert row["first_batch_kb"] <= (4 + 2 + 4) * s["shard_kb"], row
