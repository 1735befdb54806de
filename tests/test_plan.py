"""The plan as a pure function: coverage over world sizes x workers, padding, resume, elasticity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmload.config import ShuffleConfig
from mmload.errors import ConfigError
from mmload.plan import EpochOrder, LoaderState, Schedule, World, hash_uniform

UNEVEN = np.array([7, 1, 13, 0, 5, 22, 3, 9, 2, 11], dtype=np.int64)  # 73 samples, one empty chunk


def _order(
    counts: np.ndarray = UNEVEN, seed: int = 3, epoch: int = 0, interleave: int = 3
) -> EpochOrder:
    return EpochOrder(counts, seed=seed, epoch=epoch, shuffle=ShuffleConfig(interleave=interleave))


def _rank_worker_batches(order: EpochOrder, sched: Schedule, world: World) -> list[np.ndarray]:
    return [order[sched.positions(world.rank, k)] for k in sched.worker_batches(world)]


def _merge_workers(per_worker: list[list[np.ndarray]]) -> list[np.ndarray]:
    """What DataLoader does: take one batch from each worker in turn."""
    out: list[np.ndarray] = []
    for group in itertools.zip_longest(*per_worker):
        out += [b for b in group if b is not None]
    return out


def test_order_is_a_permutation_and_pure() -> None:
    a = _order().full()
    assert sorted(a.tolist()) == list(range(UNEVEN.sum()))
    assert np.array_equal(a, _order().full())
    assert not np.array_equal(a, _order(epoch=1).full())
    assert not np.array_equal(a, _order(seed=4).full())


def test_order_without_shuffle_is_identity() -> None:
    o = EpochOrder(UNEVEN, seed=1, epoch=5, shuffle=None)
    assert np.array_equal(o.full(), np.arange(UNEVEN.sum()))


@pytest.mark.parametrize("interleave", [0, 1, 2, 4, 100])
def test_order_groups_mix_only_their_chunks(interleave: int) -> None:
    o = _order(interleave=interleave)
    full = o.full()
    assert sorted(full.tolist()) == list(range(UNEVEN.sum()))
    # Lazy positions agree with the materialised order, in any access pattern.
    pos = np.random.default_rng(0).permutation(len(full))
    assert np.array_equal(o[pos], full[pos])


def test_hash_uniform_is_uniform_and_pure() -> None:
    u = hash_uniform(7, 2, 11, np.arange(200_000))
    assert u.min() >= 0.0
    assert u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert np.array_equal(u[:10], hash_uniform(7, 2, 11, np.arange(10)))
    assert not np.array_equal(u[:10], hash_uniform(7, 3, 11, np.arange(10)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_coverage_grid(world_size: int, num_workers: int, drop_last: bool) -> None:
    order = _order()
    n = order.num_samples
    sched = Schedule(n, batch_size=4, world_size=world_size, drop_last=drop_last)
    seen: list[int] = []
    per_rank_batches = []
    for rank in range(world_size):
        workers = max(num_workers, 1)
        per_worker = [
            _rank_worker_batches(order, sched, World(rank, world_size, w, workers))
            for w in range(workers)
        ]
        batches = _merge_workers(per_worker)
        # Workers change nothing: the merged stream equals the single-worker stream.
        assert [b.tolist() for b in batches] == [
            b.tolist() for b in _rank_worker_batches(order, sched, World(rank, world_size))
        ]
        per_rank_batches.append(len(batches))
        if world_size == 1 and not drop_last:  # one rank: only the last batch is short
            assert all(len(b) == 4 for b in batches[:-1])
            assert len(batches[-1]) == n - 4 * (len(batches) - 1)
        else:
            assert all(len(b) == 4 for b in batches)
        seen += [int(i) for b in batches for i in b]
    assert len(set(per_rank_batches)) == 1, "every rank gets the same number of batches"
    counts = np.bincount(seen, minlength=n)
    if drop_last:
        assert counts.max() <= 1
        assert (counts == 0).sum() == sched.dropped
        assert sched.padded == 0
    else:
        assert counts.min() >= 1, "every sample at least once"
        assert counts.sum() - n == sched.padded
        assert sched.dropped == 0
        assert sched.padded < 4 * world_size
        if world_size == 1:
            assert sched.padded == 0 and counts.max() == 1, "one rank never repeats a sample"
        padding = [
            sched.padding_in(r, k) for r in range(world_size) for k in range(sched.num_batches)
        ]
        assert sum(padding) == sched.padded


def _remaining(order: EpochOrder, sched: Schedule) -> list[list[int]]:
    """Global batches from the schedule's start, each the concatenation of rank slices."""
    out = []
    for k in range(sched.num_batches):
        out.append([int(i) for r in range(sched.world_size) for i in order[sched.positions(r, k)]])
    return out


def test_exact_resume_at_random_points() -> None:
    order = _order(counts=np.array([40, 17, 33, 8, 25]))
    n = order.num_samples
    full = _remaining(order, Schedule(n, batch_size=3, world_size=2))
    rng = np.random.default_rng(0)
    for k in rng.choice(len(full), size=20, replace=False):
        cursor = Schedule(n, batch_size=3, world_size=2).consumed_after(int(k))
        st = LoaderState.from_dict(
            LoaderState(0, 3, cursor, n, 6).to_dict()
        )  # round-trip through the state dict
        resumed = _remaining(
            order, Schedule(n, batch_size=3, world_size=2, start=st.samples_consumed)
        )
        assert resumed == full[k:]


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (1, 4), (4, 1)])
def test_elastic_resume_changes_world_size(before: int, after: int) -> None:
    order = _order(counts=np.array([50, 23, 31, 19, 44, 5]))
    n = order.num_samples
    gbs = 12
    old = Schedule(n, batch_size=gbs // before, world_size=before)
    rng = np.random.default_rng(before * 10 + after)
    for k in rng.integers(1, old.num_batches, size=10):
        cursor = old.consumed_after(int(k))
        consumed = [i for b in _remaining(order, old)[: int(k)] for i in b]
        new = Schedule(n, batch_size=gbs // after, world_size=after, start=cursor)
        rest = [i for b in _remaining(order, new) for i in b]
        real_rest = _real(order, new)  # padding slots (repeats) left out
        assert sorted(consumed + real_rest) == list(range(n)), "each sample exactly once"
        assert len(rest) - len(real_rest) == new.padded
        # Same global batch size: the remaining global batches equal the uninterrupted run's
        # (the same positions); only the padding of the last one may differ (one rank does not pad).
        new_b, old_b = _remaining(order, new), _remaining(order, old)[int(k) :]
        assert [sorted(b) for b in new_b[:-1]] == [sorted(b) for b in old_b[:-1]]
        tail = n - cursor - gbs * (len(new_b) - 1)
        assert len(set(new_b[-1])) >= tail
        last_real = set(real_rest[-tail:])
        assert last_real <= set(old_b[-1])


def _real(order: EpochOrder, sched: Schedule) -> list[int]:
    """The remaining samples without padding: a rank's padding slots end its batch."""
    out: list[int] = []
    for k in range(sched.num_batches):
        for r in range(sched.world_size):
            ids = order[sched.positions(r, k)]
            out += [int(i) for i in ids[: len(ids) - sched.padding_in(r, k)]]
    return out


def test_schedule_counts_and_errors() -> None:
    s = Schedule(10, batch_size=3, world_size=2)
    assert (s.num_batches, s.padded, s.dropped) == (2, 2, 0)
    s = Schedule(10, batch_size=3, world_size=2, drop_last=True)
    assert (s.num_batches, s.padded, s.dropped) == (1, 0, 4)
    with pytest.raises(ConfigError):
        Schedule(10, batch_size=0, world_size=1)
    with pytest.raises(ConfigError):
        Schedule(10, batch_size=1, world_size=1, start=11)
    with pytest.raises(IndexError):
        s.positions(0, 5)


def test_world_validation() -> None:
    with pytest.raises(ConfigError):
        World(rank=2, world_size=2)
    with pytest.raises(ConfigError):
        World(worker=1, num_workers=1)
    with pytest.raises(ConfigError):
        World(rank=True, world_size=2)  # type: ignore[arg-type]


def test_state_validation() -> None:
    with pytest.raises(ConfigError, match="unknown fields"):
        LoaderState.from_dict({"epoch": 0, "bogus": 1})
    with pytest.raises(ConfigError, match="must be an int"):
        LoaderState.from_dict({"epoch": "0"})
    assert LoaderState.from_dict(LoaderState(2, 1, 5, 9, 3).to_dict()) == LoaderState(2, 1, 5, 9, 3)


def test_seed_and_epoch_do_not_alias() -> None:
    counts = np.array([30, 30, 30])
    a = EpochOrder(counts, seed=0, epoch=1, shuffle=ShuffleConfig(interleave=0)).full()
    b = EpochOrder(counts, seed=1, epoch=0, shuffle=ShuffleConfig(interleave=0)).full()
    assert not np.array_equal(a, b)
    assert not np.array_equal(
        hash_uniform(2, 3, 5, np.arange(8)), hash_uniform(3, 2, 5, np.arange(8))
    )


def test_unshuffled_order_materialises_nothing() -> None:
    o = EpochOrder(np.full(1000, 100_000), seed=0, epoch=0, shuffle=None)  # 1e8 samples
    pos = np.array([0, 5, 99_999_999])
    assert o[pos].tolist() == pos.tolist()
    assert not o._cache


def test_drop_last_state_after_the_last_batch_is_the_next_epoch() -> None:
    s = Schedule(10, batch_size=3, world_size=1, drop_last=True)
    assert s.num_batches == 3
    assert s.consumed_after(2) == 6
    assert s.consumed_after(3) == 10  # the dropped tail counts as consumed


@pytest.mark.parametrize("partitions", [1, 2, 4, 12])
@pytest.mark.parametrize("interleave", [0, 2])
def test_partitioned_order_is_a_permutation_dealt_round_robin(
    partitions: int, interleave: int
) -> None:
    counts = np.array([30, 0, 18, 25, 7, 40, 12, 33, 21, 9, 16, 28], dtype=np.int64)
    o = EpochOrder(
        counts, seed=5, epoch=1, shuffle=ShuffleConfig(interleave), partitions=partitions
    )
    full = o.full()
    assert sorted(full.tolist()) == list(range(counts.sum()))
    pos = np.random.default_rng(1).permutation(len(full))
    assert np.array_equal(o[pos], full[pos]), "lazy lookups agree with the whole order"
    # Position t is in partition t % P; each partition is a contiguous segment of the layout.
    sizes = [o.partition_range(p)[1] - o.partition_range(p)[0] for p in range(partitions)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == counts.sum()
    for p in range(partitions):
        assert len(full[p::partitions]) == sizes[p]


@pytest.mark.parametrize(("partitions", "world_size"), [(4, 1), (4, 2), (4, 4), (12, 3), (12, 6)])
def test_ranks_read_only_their_partitions(partitions: int, world_size: int) -> None:
    counts = np.full(48, 25, dtype=np.int64)  # 48 shards of 25 samples
    o = EpochOrder(counts, seed=2, epoch=0, shuffle=ShuffleConfig(4), partitions=partitions)
    n = o.num_samples
    sched = Schedule(n, batch_size=10, world_size=world_size)
    seen: list[int] = []
    for rank in range(world_size):
        per_worker = [
            _rank_worker_batches(o, sched, World(rank, world_size, w, 2)) for w in range(2)
        ]
        ids = np.concatenate(_merge_workers(per_worker))
        real = np.concatenate(
            [
                o[sched.positions(rank, k)][: 10 - sched.padding_in(rank, k)]
                for k in range(sched.num_batches)
            ]
        )
        seen += real.tolist()
        shards = np.unique(ids // 25)
        # Its share of the shards plus at most one partial shard at each partition boundary.
        assert len(shards) <= 48 // world_size + 2 * partitions // world_size
        mine = set()
        for p in range(rank, partitions, world_size):
            a, b = o.partition_range(p)
            mine |= set(o.full()[p::partitions].tolist())
            assert b > a
        assert set(ids.tolist()) <= mine, "padding included, a rank reads its own partitions"
    assert sorted(seen) == list(range(n)), "every sample exactly once across ranks x workers"


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_consumed_samples_are_a_prefix_of_the_order(world_size: int) -> None:
    """After k steps on any world size the consumed samples are the first k*G positions: the
    cursor is one integer and any world size dividing P resumes from it."""
    counts = np.array([31, 17, 40, 22, 9, 35], dtype=np.int64)
    o = EpochOrder(counts, seed=9, epoch=0, shuffle=ShuffleConfig(2), partitions=6)
    sched = Schedule(o.num_samples, batch_size=12 // world_size, world_size=world_size)
    full = o.full()
    got: list[int] = []
    for k in range(sched.num_batches - 1):
        for r in range(world_size):
            got += o[sched.positions(r, k)].tolist()
        assert sorted(got) == sorted(full[: sched.consumed_after(k + 1)].tolist())


def test_resume_position_must_be_a_multiple_of_the_world_size() -> None:
    with pytest.raises(ConfigError, match="not a multiple of world_size=4"):
        Schedule(100, batch_size=3, world_size=4, start=6)
