"""Plan behaviours checked against oracles independent of the plan's code (issue 15): what the
interleave setting groups, that successive epochs shuffle independently, and what a resumed
``drop_last`` schedule has left."""

from __future__ import annotations

import numpy as np
import pytest

from mmload.config import ShuffleConfig
from mmload.plan import EpochOrder, Schedule

C = 10  # samples per chunk


def _chunk_of(ids: np.ndarray) -> np.ndarray:
    return ids // C  # equal chunks: sample id -> chunk, by construction


@pytest.mark.parametrize("interleave", [1, 3, 4])
def test_interleave_shuffles_exactly_groups_of_that_many_whole_chunks(interleave: int) -> None:
    n_chunks = 12
    order = EpochOrder(
        np.full(n_chunks, C), seed=5, epoch=2, shuffle=ShuffleConfig(interleave=interleave)
    ).full()
    span = interleave * C
    seen: set[int] = set()
    for g in range(0, len(order), span):
        chunks = _chunk_of(order[g : g + span])
        members = set(chunks.tolist())
        # each run of interleave * C positions holds exactly `interleave` whole chunks...
        assert len(members) == min(interleave, n_chunks - g // C)
        assert all((chunks == c).sum() == C for c in members)
        assert not members & seen  # ...that no other group holds
        seen |= members
        # ...shuffled together: not chunk after chunk (for a group of several chunks)
        if len(members) > 1:
            assert (np.diff(chunks) != 0).sum() > len(members)
    # interleave=0 mixes the whole partition: the first 3 chunks' worth comes from many chunks
    whole = EpochOrder(np.full(n_chunks, C), seed=5, epoch=2, shuffle=ShuffleConfig(0)).full()
    assert len(set(_chunk_of(whole[: 3 * C]).tolist())) > 6


def test_successive_epochs_shuffle_a_group_independently() -> None:
    n = 400  # one chunk, one group: only the within-group shuffle orders it
    orders = [
        EpochOrder(np.array([n]), seed=1, epoch=e, shuffle=ShuffleConfig(0)).full()
        for e in range(4)
    ]
    rank = [np.argsort(o) for o in orders]  # position of each sample in each epoch
    for a in range(4):
        for b in range(a + 1, 4):
            fixed = int((orders[a] == orders[b]).sum())
            assert fixed < 8  # ~1 expected for independent permutations of 400
            corr = np.corrcoef(rank[a], rank[b])[0, 1]
            assert abs(corr) < 0.2  # ~N(0, 0.05) for independent permutations


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resumed_drop_last_schedule_counts_what_remains(world: int) -> None:
    n, b = 103, 4
    full = Schedule(n, batch_size=b, world_size=world, drop_last=True)
    gb = b * world
    assert full.num_batches == n // gb and full.dropped == n % gb
    for k in range(full.num_batches + 1):
        start = full.consumed_after(k)
        if start == n:
            continue
        rest = Schedule(n, batch_size=b, world_size=world, start=start, drop_last=True)
        assert rest.num_batches == full.num_batches - k  # the batches not yet taken
        assert rest.num_batches == (n - k * gb) // gb
        got = [rest.positions(r, j) for j in range(rest.num_batches) for r in range(world)]
        want = [full.positions(r, j) for j in range(k, full.num_batches) for r in range(world)]
        assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))


@pytest.mark.parametrize("shuffle", [None, ShuffleConfig(), ShuffleConfig(interleave=1)])
@pytest.mark.parametrize(("counts", "partitions"), [([2], 4), ([3, 0, 1], 8), ([5, 5], 3)])
def test_pieces_cover_every_sample_once_even_past_the_data(
    shuffle: ShuffleConfig | None, counts: list[int], partitions: int
) -> None:
    """``pieces(p)`` of every partition, also partitions past the data (more partitions than
    samples: an IndexError before), slice the samples exactly once, and each piece's span
    holds the positions where the order really puts its samples."""
    order = EpochOrder(np.array(counts), seed=4, epoch=1, shuffle=shuffle, partitions=partitions)
    full = order.full()
    n = int(sum(counts))
    covered: list[int] = []
    spans: dict[tuple[int, int], list[int]] = {}
    for p in range(partitions):
        first, lens, lo, hi = order.pieces(p)
        local = full[p::partitions]  # the partition's samples in order (oracle: the round robin)
        for f, ln, a, b in zip(
            first.tolist(), lens.tolist(), lo.tolist(), hi.tolist(), strict=True
        ):
            ids = range(f, f + ln)
            covered += ids
            where = [int(np.flatnonzero(local == i)[0]) for i in ids]
            assert a <= min(where) and max(where) <= b
            spans.setdefault((a, b), []).extend(where)
        # The spans are tight: a piece unshuffled is read exactly where it lies; shuffled, the
        # pieces sharing a span (one group) fill every position of it and no other.
        for (a, b), where in spans.items():
            assert sorted(where) == list(range(a, b + 1)), (p, a, b)
        spans.clear()
        if len(local) == 0:
            assert len(first) == len(lens) == len(lo) == len(hi) == 0
    assert sorted(covered) == list(range(n))
