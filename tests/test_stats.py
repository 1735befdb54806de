"""Stats: counters, the bad-sample list and budget, per-batch values, the held epoch view and
the bottleneck rule, each against values worked out by hand."""

from __future__ import annotations

import pickle

import pytest

from mmload.errors import BadEntry, DecodeError, ShardError
from mmload.stats import PER_BATCH, STAGE_ORDER, EpochStats, Stats, bottleneck


def entries(n: int, shard: str = "s.tar") -> list[BadEntry]:
    return [BadEntry(shard, f"k{i}", f"reason {i}") for i in range(n)]


def test_a_new_stats_starts_from_zero_with_no_budget() -> None:
    s = Stats()
    snap = s.snapshot()
    assert s.budget == 0
    for name in ("batches", "samples", "samples_padded", "samples_dropped", "samples_replaced"):
        assert snap[name] == 0
    assert snap["bad_samples"] == 0
    assert snap["bad"] == []
    assert {k: v for k, v in snap["seconds"].items() if k != "elapsed"} == {
        "read": 0.0,
        "decode": 0.0,
        "wait": 0.0,
    }
    assert snap["stage_wait"] == {}
    assert snap["per_batch"] == {}
    assert snap["bottleneck"] is None
    assert snap["samples_per_second"] == 0.0
    with pytest.raises(ShardError):  # budget 0: the first bad sample is one too many
        s.add_bad(entries(1))


def test_counters_timings_and_waits_accumulate() -> None:
    s = Stats()
    s.add("samples", 5)
    s.add("samples", 7)
    s.add("batches")
    s.add("brand_new")
    s.time("read", 0.25)
    s.time("read", 0.5)
    s.time("other", 1.0)
    s.wait_on("decode", 0.5)
    s.wait_on("decode", 0.25)
    snap = s.snapshot()
    assert snap["samples"] == 12
    assert snap["batches"] == 1
    assert snap["brand_new"] == 1
    assert snap["seconds"]["read"] == 0.75
    assert snap["seconds"]["other"] == 1.0
    assert snap["stage_wait"] == {"decode": 0.75}
    assert snap["seconds"]["elapsed"] > 0
    assert snap["samples_per_second"] == pytest.approx(12 / snap["seconds"]["elapsed"], rel=0.05)


def test_peak_keeps_the_largest_value() -> None:
    s = Stats()
    s.peak("cache_peak", 3)
    s.peak("cache_peak", 10)
    s.peak("cache_peak", 4)
    assert s.snapshot()["cache_peak"] == 10
    s.peak("negative", -2)
    assert s.snapshot()["negative"] == 0  # an unset counter counts as 0


def test_per_batch_keeps_the_latest_values_in_order() -> None:
    s = Stats()
    for i in range(PER_BATCH + 10):
        s.per_batch("padded", i)
    s.per_batch("other", 7)
    snap = s.snapshot()["per_batch"]
    assert PER_BATCH == 64
    assert snap["padded"] == list(range(10, PER_BATCH + 10))
    assert snap["other"] == [7]


def test_bad_entries_are_counted_and_listed_up_to_the_cap() -> None:
    s = Stats(budget=10**9)
    s.add_listed(entries(600, "a.tar"))
    s.record_bad(entries(300, "b.tar"))
    s.add_bad(entries(250, "c.tar"))
    snap = s.snapshot()
    assert snap["bad_samples"] == 1150
    listed = snap["bad"]
    assert len(listed) == 1000  # the first 1000, in order; the count goes on
    assert listed[0] == {"shard": "a.tar", "key": "k0", "reason": "reason 0"}
    assert [b["shard"] for b in listed].count("a.tar") == 600
    assert [b["shard"] for b in listed].count("b.tar") == 300
    assert [b["shard"] for b in listed].count("c.tar") == 100
    assert listed[-1] == {"shard": "c.tar", "key": "k99", "reason": "reason 99"}
    s.add_listed(entries(5))  # past the cap: counted, not listed
    s.record_bad(entries(5))
    assert s.snapshot()["bad_samples"] == 1160
    assert len(s.snapshot()["bad"]) == 1000


def test_entries_listed_before_the_epoch_do_not_spend_its_budget() -> None:
    s = Stats(budget=2)
    s.add_listed(entries(5))
    s.record_bad(entries(5))
    s.add_bad(entries(2))  # exactly the budget: allowed
    assert s.snapshot()["bad_samples"] == 12
    with pytest.raises(ShardError):
        s.add_bad(entries(1))


def test_add_bad_raises_once_the_epoch_exceeds_the_budget() -> None:
    s = Stats(budget=3)
    s.add_bad([])  # nothing bad: nothing counted
    s.add_bad(entries(2))
    s.add_bad(entries(1))
    with pytest.raises(ShardError) as info:
        s.add_bad([BadEntry("x.tar", "k9", "truncated member")])
    err = info.value
    assert err.shard == "x.tar"
    assert err.key == "k9"
    assert str(err) == (
        "bad-sample budget exceeded: 4 bad samples this epoch > 3 allowed (this process's "
        "share of max_bad_samples); last: truncated member (shard 'x.tar', key 'k9')"
    )
    assert s.snapshot()["bad_samples"] == 4  # the sample that broke the budget is counted


def test_the_budget_error_is_a_decode_error_when_any_cause_was_one() -> None:
    s = Stats(budget=0)
    shard_error = ShardError("bad member", shard="s.tar", key="a")
    decode_error = DecodeError("bad jpeg", shard="s.tar", key="b")
    with pytest.raises(DecodeError):
        s.add_bad(entries(2), errors=[shard_error, decode_error])
    with pytest.raises(ShardError) as info:
        Stats(budget=0).add_bad(entries(1), errors=[shard_error])
    assert not isinstance(info.value, DecodeError)


def test_start_epoch_resets_the_epoch_count_and_keeps_totals() -> None:
    s = Stats(budget=2)
    s.add_bad(entries(2))
    s.start_epoch(1)
    assert s.budget == 1
    s.add_bad(entries(1))  # the new epoch's count starts again from 0
    with pytest.raises(ShardError, match="2 bad samples this epoch > 1 allowed"):
        s.add_bad(entries(1))
    assert s.snapshot()["bad_samples"] == 4


def test_stats_pickle_without_the_lock_and_work_after() -> None:
    s = Stats(budget=5)
    s.add("samples", 3)
    s.add_bad(entries(2))
    t = pickle.loads(pickle.dumps(s))
    assert t.budget == 5
    assert t.snapshot()["samples"] == 3
    assert t.snapshot()["bad_samples"] == 2
    t.add("samples", 1)  # the lock was rebuilt
    assert t.snapshot()["samples"] == 4
    assert "_lock" not in s.__getstate__()
    assert "_lock" in s.__dict__  # getstate copies; the live object keeps its lock


def test_epoch_stats_forward_to_the_parent_with_their_own_budget() -> None:
    parent = Stats(budget=100)
    run = EpochStats(parent, budget=1)
    run.add("samples", 4)
    run.add("batches")  # one by default
    run.time("decode", 0.5)
    run.peak("p", 9)
    run.per_batch("padded", 2)
    run.wait_on("read", 0.25)
    run.add_listed(entries(3))
    run.add_bad(entries(1))
    snap = parent.snapshot()
    assert run.snapshot()["samples"] == snap["samples"] == 4
    assert snap["batches"] == 1
    assert snap["seconds"]["decode"] == 0.5
    assert snap["p"] == 9
    assert snap["per_batch"] == {"padded": [2]}
    assert snap["stage_wait"] == {"read": 0.25}
    assert snap["bad_samples"] == 4
    with pytest.raises(ShardError):  # the run's budget (1), not the parent's (100)
        run.add_bad(entries(1))


def test_a_held_epoch_records_nothing_until_adopted() -> None:
    parent = Stats()
    parent.add("samples", 1)
    run = EpochStats(parent, budget=10, held=True)
    run.add("samples", 2)
    run.record_bad(entries(1))
    run.time("read", 1.0)
    assert parent.snapshot()["samples"] == 1
    assert parent.snapshot()["bad_samples"] == 0
    parent.add("samples", 4)  # the running epoch goes on meanwhile
    run.adopt()
    snap = parent.snapshot()
    assert snap["samples"] == 7
    assert snap["bad_samples"] == 1
    assert snap["seconds"]["read"] == 1.0
    run.add("samples", 1)  # after adopt: straight through
    assert parent.snapshot()["samples"] == 8
    run.adopt()  # a second adopt replays nothing
    assert parent.snapshot()["samples"] == 8


def test_bottleneck_is_the_most_upstream_stage_that_starved_its_consumer() -> None:
    assert STAGE_ORDER == ("workers", "read", "decode", "join", "copy")
    # The trainer waited under 1% of the time: no bottleneck.
    assert bottleneck(0.99, {"read": 5.0}, 100.0) is None
    assert bottleneck(1.0, {"read": 0.5}, 100.0) == "read"  # exactly 1%, exactly half
    assert bottleneck(1.0, {"read": 0.49, "decode": 0.9}, 100.0) == "decode"
    # Upstream first, even when a later stage waited longer.
    assert bottleneck(10.0, {"copy": 9.0, "workers": 6.0, "read": 8.0}, 20.0) == "workers"
    assert bottleneck(10.0, {"join": 5.0, "copy": 9.0}, 20.0) == "join"
    # No stage waited half as long: the one that waited longest, or None without any.
    assert bottleneck(10.0, {"read": 1.0, "decode": 3.0, "other": 2.0}, 20.0) == "decode"
    assert bottleneck(10.0, {}, 20.0) is None
    assert bottleneck(10.0, {"read": 9.0}, 0.0) is None
    assert bottleneck(10.0, {"read": 9.0}, -1.0) is None


def test_snapshot_names_the_bottleneck_from_the_recorded_waits() -> None:
    s = Stats()
    s.time("wait", 1e6)  # the trainer waited (far longer than the elapsed time)
    s.wait_on("decode", 1e6)
    assert s.snapshot()["bottleneck"] == "decode"
