"""Regression test from the review of issue 8."""

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import numpy as np

from mmload.config import ShuffleConfig
from mmload.pipeline import remote_needs
from mmload.plan import EpochOrder, Schedule, World


class FakeDS:
    def __init__(self, counts, rows=None):
        # counts per shard; rows: chunks per shard (list of lists) for tables
        if rows is None:
            rows = [[c] for c in counts]
        self.chunk_counts = np.concatenate([np.asarray(r) for r in rows]).astype(np.int64)
        self.chunk_shard = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        self.chunk_first_row = np.concatenate(
            [np.concatenate([[0], np.cumsum(r)[:-1]]) for r in rows]
        ).astype(np.int64)
        self.chunk_start = np.concatenate([[0], np.cumsum(self.chunk_counts)]).astype(np.int64)
        self.remote = np.ones(len(rows), bool)
        self.num_shards = len(rows)

    def locate(self, ids):
        chunk = np.searchsorted(self.chunk_start, ids, side="right") - 1
        return chunk, self.chunk_shard[chunk], None


def check(rng, trial):
    S = int(rng.integers(1, 12))
    table = rng.random() < 0.4
    rows = [
        list(rng.integers(0, 5, size=int(rng.integers(1, 4))))
        if table
        else [int(rng.integers(0, 9))]
        for _ in range(S)
    ]
    if sum(map(sum, rows)) == 0:
        rows[0] = [3]
    ds = FakeDS(None, rows)
    W = int(rng.choice([1, 2, 3, 4]))
    P = W * int(rng.integers(1, 4))
    shuf = None if rng.random() < 0.3 else ShuffleConfig(interleave=int(rng.integers(0, 4)))
    o = EpochOrder(
        ds.chunk_counts,
        seed=trial,
        epoch=1,
        shuffle=shuf,
        partitions=P,
        chunk_shard=ds.chunk_shard if len(ds.chunk_counts) != S else None,
    )
    N = o.num_samples
    if P > N:
        return
    bs = int(rng.integers(1, 5))
    drop = bool(rng.random() < 0.3)
    G = bs * W
    starts = [s for s in range(0, N + 1, G)]
    start = int(rng.choice(starts))
    sch = Schedule(num_samples=N, batch_size=bs, world_size=W, start=start, drop_last=drop)
    for r in range(W):
        for nw in (1, 2, 3):
            for w in range(nw):
                world = World(r, W, w, nw)
                needs = remote_needs(ds, o, sch, world)
                for k in sch.worker_batches(world):
                    shards = set(ds.locate(o[sch.positions(r, k)])[1].tolist())
                    for s in shards:
                        ok = any(n[0] == s and n[1] <= k <= n[2] for n in needs)
                        assert ok, (
                            trial,
                            dict(
                                S=S,
                                rows=rows,
                                W=W,
                                P=P,
                                shuf=shuf,
                                bs=bs,
                                drop=drop,
                                start=start,
                                r=r,
                                nw=nw,
                                w=w,
                                k=k,
                                s=s,
                                needs=needs,
                            ),
                        )


def test_needs_cover_reads():
    rng = np.random.default_rng(0)
    for trial in range(3000):
        check(rng, trial)
