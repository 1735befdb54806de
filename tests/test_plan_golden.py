"""The epoch order is part of the checkpoint contract: a run resumed after an upgrade must see
the same order, or its cursor points at other samples. These values pin the hash, the
permutations and whole orders (with partitions, interleave and multi-chunk shards). A
deliberate change of the order must update them and bump the state version (LoaderState), so
old checkpoints are refused instead of resumed onto another order. Also pins the plan's
validation messages (issue 15: mutants of the hash constants and messages survived)."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

from mmload.config import ShuffleConfig
from mmload.errors import ConfigError
from mmload.plan import (
    EpochOrder,
    LoaderState,
    Schedule,
    World,
    _bijection,
    _permutation,
    hash_u64,
    hash_uniform,
)

UNEVEN = np.array([7, 1, 13, 0, 5, 22, 3, 9, 2, 11])


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.asarray(a, dtype="<i8").tobytes())


def test_hash_values_are_pinned() -> None:
    assert hash_u64(1, 2, 3, np.arange(4)).tolist() == [
        17784419016358014932,
        10647382797828564347,
        15695041423637717366,
        136015902816967820,
    ]
    u = hash_uniform(1, 2, 3, np.arange(3))
    assert u.dtype == np.float64
    assert u.tolist() == [0.9640952866963938, 0.5771957780345258, 0.8508299004378999]


def test_permutations_are_pinned() -> None:
    assert _permutation(7, 1, 5, 10).tolist() == [8, 5, 0, 3, 6, 9, 7, 4, 2, 1]
    assert _bijection(7, 1, 5, 10).tolist() == [7, 4, 6, 3, 2, 5, 0, 8, 1, 9]
    assert _bijection(7, 1, 5, 1000)[:8].tolist() == [771, 717, 861, 110, 326, 307, 0, 749]
    small = {  # word sizes at and around powers of two
        4: [3, 1, 2, 0],
        5: [4, 1, 3, 2, 0],
        8: [6, 1, 5, 2, 0, 3, 7, 4],
        9: [7, 4, 6, 3, 2, 5, 0, 8, 1],
        16: [11, 4, 6, 10, 2, 5, 0, 8, 1, 13, 3, 12, 7, 14, 9, 15],
        17: [7, 11, 8, 12, 6, 2, 3, 10, 13, 5, 1, 4, 15, 14, 16, 9, 0],
    }
    for n, want in small.items():
        assert _bijection(7, 1, 5, n).tolist() == want, n
    assert _bijection(7, 1, 5, 1).tolist() == [0] and _bijection(7, 1, 5, 0).tolist() == []
    # tiny data sets are shuffled too: over seeds, every order of 2 and of 3 shards occurs
    for n, orders in ((2, 2), (3, 6)):
        seen = {tuple(_bijection(s, e, 5, n).tolist()) for s in range(20) for e in range(10)}
        assert len(seen) == orders


def test_orders_are_pinned() -> None:
    shards = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])  # several chunks per shard
    o = EpochOrder(
        UNEVEN, seed=3, epoch=1, shuffle=ShuffleConfig(3), partitions=2, chunk_shard=shards
    ).full()
    assert o[:24].tolist() == [
        50, 13, 52, 30, 68, 42, 71, 27, 48, 24, 51, 19,
        58, 17, 64, 28, 57, 36, 63, 45, 54, 15, 62, 38,
    ]  # fmt: skip
    assert _crc(o) == 399910889
    big = EpochOrder(np.full(50, 40), seed=11, epoch=4, shuffle=ShuffleConfig(4), partitions=4)
    full = big.full()
    assert _crc(full) == 3059907102
    assert full[:8].tolist() == [908, 1268, 924, 1568, 1960, 1263, 248, 1594]
    # The lazy lookup agrees after its caches have turned over many times.
    small = EpochOrder(
        np.full(50, 40), seed=11, epoch=4, shuffle=ShuffleConfig(4), partitions=4, cache_groups=1
    )
    pos = np.random.default_rng(1).permutation(len(full))
    assert np.array_equal(np.concatenate([small[p] for p in np.array_split(pos, 97)]), full[pos])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": True}, "World.rank=True: must be an int"),
        ({"num_workers": 1.0}, "World.num_workers=1.0: must be an int"),
        ({"rank": 2, "world_size": 2}, "World(rank=2, world_size=2): need 0 <= rank < world_size"),
        ({"rank": 0, "world_size": 0}, "World(rank=0, world_size=0): need 0 <= rank < world_size"),
        ({"worker": -1}, "World(worker=-1, num_workers=1): need 0 <= worker < num_workers"),
        (
            {"worker": 0, "num_workers": 0},
            "World(worker=0, num_workers=0): need 0 <= worker < num_workers",
        ),
    ],
)
def test_world_validation_messages(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        World(**kwargs)  # type: ignore[arg-type]


def test_order_and_schedule_validation_messages() -> None:
    with pytest.raises(ConfigError, match=re.escape("chunk_counts must be a 1-d array")):
        EpochOrder(np.array([[1, 2]]), seed=0, epoch=0, shuffle=None)
    with pytest.raises(ConfigError, match=re.escape("chunk_counts must be a 1-d array")):
        EpochOrder(np.array([3, -1]), seed=0, epoch=0, shuffle=None)
    for bad in (0, True, 1.5):
        with pytest.raises(
            ConfigError, match=re.escape(f"partitions={bad!r}: must be a positive int")
        ):
            EpochOrder(UNEVEN, seed=0, epoch=0, shuffle=None, partitions=bad)  # type: ignore[arg-type]
    with pytest.raises(IndexError, match=re.escape("epoch positions out of range [0, 73)")):
        EpochOrder(UNEVEN, seed=0, epoch=0, shuffle=ShuffleConfig(2))[np.array([73])]
    with pytest.raises(IndexError):
        EpochOrder(UNEVEN, seed=0, epoch=0, shuffle=ShuffleConfig(2))[np.array([-1])]
    with pytest.raises(ConfigError, match=re.escape("batch_size=0: must be >= 1")):
        Schedule(10, batch_size=0, world_size=1)
    with pytest.raises(ConfigError, match=re.escape("world_size=0: must be >= 1")):
        Schedule(10, batch_size=1, world_size=0)
    with pytest.raises(
        ConfigError, match=re.escape("resume position 11 is outside the epoch of 10")
    ):
        Schedule(10, batch_size=1, world_size=1, start=11)
    with pytest.raises(
        ConfigError, match=re.escape("resume position 3 is not a multiple of world_size=2")
    ):
        Schedule(10, batch_size=1, world_size=2, start=3)
    Schedule(9, batch_size=1, world_size=2, start=9)  # the end of the epoch is always valid
    with pytest.raises(IndexError, match=re.escape("batch 3 outside [0, 3)")):
        Schedule(10, batch_size=4, world_size=1).positions(0, 3)


def test_state_validation_messages() -> None:
    good = LoaderState(epoch=1, seed=2, samples_consumed=4, num_samples=10).to_dict()
    assert LoaderState.from_dict(good).to_dict() == good
    with pytest.raises(ConfigError, match=re.escape("state_dict has unknown fields ['x']")):
        LoaderState.from_dict({**good, "x": 1})
    with pytest.raises(ConfigError, match=re.escape("state_dict['epoch']=1.0: must be an int")):
        LoaderState.from_dict({**good, "epoch": 1.0})
    with pytest.raises(ConfigError, match=re.escape("epoch and samples_consumed must be >= 0")):
        LoaderState.from_dict({**good, "samples_consumed": -1})


def test_more_state_and_schedule_messages() -> None:
    good = LoaderState(epoch=1, seed=2, samples_consumed=4, num_samples=10).to_dict()
    with pytest.raises(ConfigError, match=re.escape("state_dict version 1 is not supported")) as e:
        LoaderState.from_dict({**good, "version": 1})
    assert "version 1 states come from mmload before partitioned orders" in str(e.value)
    with pytest.raises(ConfigError, match=re.escape("state_dict partitions=0: must be >= 1")):
        LoaderState.from_dict({**good, "partitions": 0})
    with pytest.raises(
        ConfigError, match=re.escape("the state was saved with (batch_size * world_size)")
    ):
        Schedule(10, batch_size=1, world_size=2, start=3)


@pytest.mark.parametrize(("n", "b", "w"), [(10, 3, 3), (11, 2, 4), (7, 4, 2), (2, 3, 3)])
def test_padding_repeats_only_a_ranks_own_positions(n: int, b: int, w: int) -> None:
    s = Schedule(n, batch_size=b, world_size=w)
    for r in range(w):
        for k in range(s.num_batches):
            pos = s.positions(r, k)
            first = k * b * w + r
            want_real = [p for p in range(first, first + b * w, w) if p < n]
            assert pos[: len(want_real)].tolist() == want_real
            pads = pos[len(want_real) :]
            assert s.padding_in(r, k) == len(pads) == b - len(want_real)
            if len(pads) and n >= w:  # repeats of positions of this rank (its own partitions)
                assert all(int(p) % w == r and 0 <= int(p) < n for p in pads), (r, k, pos)


def test_empty_and_unshuffled_partitioned_orders() -> None:
    empty = EpochOrder(np.array([], dtype=np.int64), seed=0, epoch=0, shuffle=ShuffleConfig(2))
    assert len(empty) == 0 and empty.full().tolist() == []
    # Unshuffled with P partitions: position t is sample t // P of partition t % P, the layout
    # cut into P contiguous segments in stored order (by hand for 3 chunks of 4 and P = 3).
    o = EpochOrder(np.array([4, 4, 4]), seed=0, epoch=0, shuffle=None, partitions=3).full()
    assert o.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_hash_with_an_array_of_streams_is_one_hash_per_stream() -> None:
    """augment.py draws several streams at once: row s is stream s's draws."""
    streams = np.array([3, 10, 11])
    both = hash_u64(1, 2, streams, np.arange(5))
    assert both.shape == (3, 5)
    for row, s in zip(both, streams.tolist(), strict=True):
        assert row.tolist() == hash_u64(1, 2, s, np.arange(5)).tolist()


def test_exact_messages_and_edge_layouts() -> None:
    with pytest.raises(
        ConfigError, match=r"^chunk_counts must be a 1-d array of non-negative ints$"
    ):
        EpochOrder(np.array([[1]]), seed=0, epoch=0, shuffle=None)
    # Shard ids need not start at 0 (a first shard without chunks): the same grouping, the same
    # order.
    counts = np.array([3, 4, 2, 5, 1])
    kw = {"seed": 4, "epoch": 2, "shuffle": ShuffleConfig(2), "partitions": 2}
    a = EpochOrder(counts, chunk_shard=np.array([0, 0, 1, 2, 2]), **kw).full()  # type: ignore[arg-type]
    b = EpochOrder(counts, chunk_shard=np.array([1, 1, 2, 3, 3]), **kw).full()  # type: ignore[arg-type]
    assert np.array_equal(a, b)
    # interleave=1 with one-sample chunks: each chunk is its own group, whatever its size.
    sizes = np.array([1, 3, 1, 2])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    o = EpochOrder(sizes, seed=1, epoch=0, shuffle=ShuffleConfig(1)).full()
    chunk_of = np.searchsorted(starts, o, side="right") - 1
    runs = [int(c) for i, c in enumerate(chunk_of) if i == 0 or c != chunk_of[i - 1]]
    assert sorted(runs) == [0, 1, 2, 3]  # every chunk's samples stay together


def test_padding_when_a_rank_has_no_sample_of_its_own() -> None:
    """Fewer samples than ranks: the padding repeats positions modulo the epoch."""
    s = Schedule(2, batch_size=3, world_size=3)
    # rank r's raw positions r, r + 3, r + 6, those past the end taken modulo 2
    assert [s.positions(r, 0).tolist() for r in range(3)] == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
