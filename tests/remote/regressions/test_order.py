"""Regression test from the review of issue 8."""

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import numpy as np
from test_needs import FakeDS

from mmload.config import ShuffleConfig
from mmload.plan import EpochOrder, Schedule


def test_perm_and_exactly_once():
    rng = np.random.default_rng(1)
    for trial in range(2000):
        S = int(rng.integers(1, 10))
        rows = [list(rng.integers(0, 5, size=int(rng.integers(1, 4)))) for _ in range(S)]
        if sum(map(sum, rows)) == 0:
            rows[0] = [3]
        ds = FakeDS(None, rows)
        W = int(rng.choice([1, 2, 3]))
        P = W * int(rng.integers(1, 4))
        shuf = None if rng.random() < 0.3 else ShuffleConfig(interleave=int(rng.integers(0, 4)))
        o = EpochOrder(
            ds.chunk_counts,
            seed=trial,
            epoch=0,
            shuffle=shuf,
            partitions=P,
            chunk_shard=ds.chunk_shard,
        )
        N = o.num_samples
        if N < W:
            continue
        full = o.full()
        assert np.array_equal(np.sort(full), np.arange(N)), trial
        bs = int(rng.integers(1, 4))
        G = bs * W
        start = int(rng.choice(list(range(0, N + 1, G))))
        sch = Schedule(num_samples=N, batch_size=bs, world_size=W, start=start, drop_last=False)
        seen = []
        for r in range(W):
            for k in range(sch.num_batches):
                pos = sch.positions(r, k)
                pad = sch.padding_in(r, k)
                assert len(pos) == bs or W == 1
                seen += pos[: len(pos) - pad].tolist()
                assert all(o[pos] is not None for _ in [0])
                # rank reads only its partitions
                assert set((pos % P % W).tolist()) <= {r}
        assert sorted(seen) == list(range(start, N)), (trial, W, P, bs, start, N)
        assert (
            sum(sch.padding_in(r, sch.num_batches - 1) for r in range(W)) == sch.padded
            if sch.num_batches
            else True
        )
