"""StreamLoader over a directory that grows while it is read: commit-by-rename part files,
windows in a ledger, exactly-once consumption across restarts and ranks, the idle signal."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import mmload
from mmload.errors import ConfigError, StreamIdle
from mmload.sources.growing import Ledger, Sequencer, list_committed
from mmload.sources.write import write_parquet, write_tar_shards
from tests.streams import Ranks, drain


def _rows(part: int, n: int) -> list[dict[str, Any]]:
    return [{"__key__": f"p{part:04d}-{i:04d}", "x": part * 1000 + i} for i in range(n)]


def commit(root: Path, part: int, n: int, *, kind: str = "parquet", bucket: str = "") -> None:
    """Write a part file under a hidden in-progress name, then commit it by rename (as Flink's
    FileSink does)."""
    d = root / bucket if bucket else root
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"part-{part:05d}.{kind}"
    tmp = d / f".part-{part:05d}.{kind}.inprogress.1234"
    if kind == "parquet":
        write_parquet(_rows(part, n), str(tmp))
    elif kind == "jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in _rows(part, n)))
    else:
        rows = [{"__key__": r["__key__"], "cls": str(r["x"]).encode()} for r in _rows(part, n)]
        (w,) = write_tar_shards(rows, str(d / f".tmp-{part}-%03d.tar"), maxcount=n)
        os.rename(w, tmp)
    os.rename(tmp, final)


def _keys(batch: dict[str, Any]) -> list[str]:
    return list(batch["__key__"])


def test_only_committed_files_are_listed(tmp_path: Path) -> None:
    commit(tmp_path, 1, 3)
    commit(tmp_path, 2, 3, bucket="2026-12-06--03")
    commit(tmp_path, 3, 3, kind="tar")
    (tmp_path / ".part-9.parquet.inprogress.x").write_bytes(b"half")
    (tmp_path / "part-8.parquet.inprogress").write_bytes(b"half")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / "_hidden").mkdir()
    (tmp_path / "_hidden" / "part-7.parquet").write_bytes(b"x")
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "part-6.parquet").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    os.symlink(tmp_path / "part-00001.parquet", tmp_path / "link.parquet")
    got = [f.path for f in list_committed(str(tmp_path))]
    assert sorted(got) == [
        "2026-12-06--03/part-00002.parquet",
        "part-00001.parquet",
        "part-00003.tar",
    ]


def test_ledger_windows_are_written_once_and_read_back(tmp_path: Path) -> None:
    src, led = tmp_path / "src", tmp_path / "ledger"
    src.mkdir()
    commit(src, 1, 2)
    commit(src, 2, 2)
    seq = Sequencer(str(src), Ledger(str(led), str(src)), window_files=1)
    w0, w1 = seq.cut(), seq.cut()
    assert w0 is not None and w1 is not None and seq.cut() is None
    assert [f.path for f in w0.files] == ["part-00001.parquet"]
    assert [f.path for f in w1.files] == ["part-00002.parquet"]
    other = Ledger(str(led), str(src))  # another rank, or a restart
    assert other.count() == 2 and other.window(1) == w1 and other.window(2) is None
    commit(src, 3, 2)
    assert other.window(2) is None  # nobody cut it yet
    # a second sequencer on the same ledger (two jobs, or two rank 0s) is refused
    stale = Ledger(str(led), str(src))
    stale.count = lambda: 1  # type: ignore[method-assign]  # it has not seen window 1 yet
    with pytest.raises(ConfigError, match="cut by another process"):
        stale.append([])
    with pytest.raises(ConfigError, match="belongs to source"):
        Ledger(str(led), str(tmp_path))
    doc = json.loads((led / "window-000000001.json").read_text())
    assert doc["index"] == 1


def test_consumes_a_growing_directory_exactly_once(tmp_path: Path) -> None:
    produced: list[str] = []

    def producer() -> None:
        for p in range(12):
            commit(tmp_path, p, 7 + p)
            produced.extend(r["__key__"] for r in _rows(p, 7 + p))
            time.sleep(0.03)

    with mmload.StreamLoader(tmp_path, batch_size=8, poll_s=0.02, max_wait_s=1.0) as sl:
        t = threading.Thread(target=producer)
        t.start()
        batches = drain(sl)
        t.join()
        batches += drain(sl)  # what the producer committed after the first idle, if anything
        st = sl.stats()
    keys = [k for b in batches for k in _keys(b)]
    assert Counter(keys) == Counter(produced)  # each exactly once (one rank: no padding)
    assert st["samples"] == len(produced) and st["samples_padded"] == 0
    assert st["windows_cut"] >= 2 and st["window"] == st["windows_cut"]


def test_restart_resumes_exactly_while_files_keep_arriving(tmp_path: Path) -> None:
    for p in range(3):
        commit(tmp_path, p, 20)
    kw: dict[str, Any] = dict(batch_size=6, shuffle=True, seed=3, poll_s=0.02, max_wait_s=0.5)
    seen: list[str] = []
    with mmload.StreamLoader(tmp_path, window_files=2, **kw) as sl:
        it = iter(sl)
        for _ in range(5):  # stop inside window 0
            seen += _keys(next(it))
        state = json.loads(json.dumps(sl.state_dict()))
    assert state["window"] == 0 and state["samples_consumed"] == 30
    for p in range(3, 6):  # committed while the trainer is down
        commit(tmp_path, p, 20)
    with mmload.StreamLoader(tmp_path, window_files=2, **kw) as sl:
        sl.load_state_dict(state)
        stop = threading.Event()

        def producer() -> None:  # and while it runs again
            for p in range(6, 9):
                commit(tmp_path, p, 20)
                time.sleep(0.05)
            stop.set()

        t = threading.Thread(target=producer)
        t.start()
        rest = drain(sl)
        t.join()
        rest += drain(sl)
    after = [k for b in rest for k in _keys(b)]
    want = [r["__key__"] for p in range(9) for r in _rows(p, 20)]
    assert Counter(seen + after) == Counter(want)  # none twice, none lost


def test_resume_mid_window_gives_the_same_batches(tmp_path: Path) -> None:
    for p in range(4):
        commit(tmp_path, p, 15)
    kw: dict[str, Any] = dict(batch_size=4, shuffle=True, seed=1, poll_s=0.02, max_wait_s=0.3)
    with mmload.StreamLoader(tmp_path, ledger=tmp_path / "_l", window_files=3, **kw) as sl:
        full = [_keys(b) for b in drain(sl)]
    for cut in (1, 4, 11, 15):  # inside windows 0 and 1, and at a window's end
        with mmload.StreamLoader(tmp_path, ledger=tmp_path / "_l", window_files=3, **kw) as sl:
            it = iter(sl)
            head = [_keys(next(it)) for _ in range(cut)]
            state = sl.state_dict()
        with mmload.StreamLoader(tmp_path, ledger=tmp_path / "_l", window_files=3, **kw) as sl:
            sl.load_state_dict(state)
            tail = [_keys(b) for b in drain(sl)]
        assert head + tail == full, cut


def test_two_ranks_equal_steps_per_window_and_exactly_once(tmp_path: Path) -> None:
    produced: list[str] = []
    for p in range(2):
        commit(tmp_path, p, 9)
        produced += [r["__key__"] for r in _rows(p, 9)]
    ranks = Ranks(
        lambda r: mmload.StreamLoader(
            tmp_path, batch_size=4, rank=r, world_size=2, poll_s=0.02, max_wait_s=1.5
        )
    )
    for p in range(2, 6):
        time.sleep(0.1)
        commit(tmp_path, p, 9)
        produced += [r["__key__"] for r in _rows(p, 9)]
    ranks.join()
    out, stats = ranks.batches, ranks.stats
    assert len(out[0]) == len(out[1])  # equal steps
    keys = [k for r in (0, 1) for _, ks in out[r] for k in ks]
    padded = stats[0]["samples_padded"]
    assert padded == stats[1]["samples_padded"]
    assert set(keys) == set(produced)  # none lost
    assert len(keys) == len(produced) + padded  # none twice except counted padding
    ranks_keys = [{k for _, ks in out[r] for k in ks} for r in (0, 1)]
    assert not (ranks_keys[0] & ranks_keys[1]) or padded  # disjoint shares unless padded


def test_idle_source_raises_stream_idle_then_continues(tmp_path: Path) -> None:
    with mmload.StreamLoader(tmp_path, batch_size=4, poll_s=0.02, max_wait_s=0.2) as sl:
        t0 = time.monotonic()
        with pytest.raises(StreamIdle) as ei:
            next(iter(sl))
        assert ei.value.window == 0 and 0.2 <= ei.value.waited_s < 5
        assert time.monotonic() - t0 < 5
        commit(tmp_path, 0, 4)
        assert _keys(next(iter(sl))) == [r["__key__"] for r in _rows(0, 4)]
        assert sl.stats()["stream_wait_seconds"] >= 0.2


def test_tar_and_jsonl_part_files(tmp_path: Path) -> None:
    commit(tmp_path, 0, 5, kind="tar")
    commit(tmp_path, 1, 5, kind="parquet")
    commit(tmp_path, 2, 5, kind="jsonl")
    with mmload.StreamLoader(
        tmp_path, batch_size=5, poll_s=0.02, max_wait_s=0.2, window_files=1
    ) as sl:
        batches = drain(sl)
    assert [b["cls"].tolist() for b in batches[:1]] == [[0, 1, 2, 3, 4]]
    assert [b["x"].tolist() for b in batches[1:]] == [
        [1000, 1001, 1002, 1003, 1004],
        [2000, 2001, 2002, 2003, 2004],
    ]


def test_bad_arguments_and_states(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        mmload.StreamLoader(tmp_path / "nope", batch_size=2)
    with pytest.raises(ConfigError, match="needs ledger="):
        mmload.StreamLoader("s3://bucket/prefix", batch_size=2)
    with pytest.raises(ConfigError, match="epoch"):
        mmload.StreamLoader(tmp_path, batch_size=2, epoch=3)
    commit(tmp_path, 0, 4)
    with mmload.StreamLoader(tmp_path, batch_size=2, max_wait_s=0.1, poll_s=0.02) as sl:
        with pytest.raises(ConfigError, match="not a StreamLoader state_dict"):
            sl.load_state_dict({"window": 0})
        with pytest.raises(ConfigError, match="has only 0 windows"):
            sl.load_state_dict({"stream_version": 1, "window": 5, "samples_consumed": 0})


def test_other_ranks_follow_rank0s_idle_marker_not_a_stale_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmload.stream as stream_mod
    from mmload.sources.growing import IdleMarkers

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(stream_mod, "_GRACE_S", 0.6)
    led = Ledger(str(tmp_path / "_mmload" / "ledger"), str(tmp_path))
    # an earlier run's marker for (window 0, attempt 0): not this run's decision
    (tmp_path / "_mmload" / "ledger" / "idle-000000000-000000.json").write_text(
        json.dumps({"window": 0, "attempt": 0, "written_at": time.time() - 3600})
    )
    sl = mmload.StreamLoader(
        tmp_path, batch_size=2, rank=1, world_size=2, poll_s=0.02, max_wait_s=0.1
    )
    t0 = time.monotonic()
    with pytest.raises(StreamIdle, match="sent no idle signal"):
        next(iter(sl))
    assert time.monotonic() - t0 >= 0.8  # waited for rank 0 (2 x 0.1 + 0.6 s), then alone
    IdleMarkers(led, None, since=0.0).mark(0, 1)  # rank 0 gives up on attempt 1
    monkeypatch.setattr(stream_mod, "_GRACE_S", 60.0)  # waiting again would take a minute
    t0 = time.monotonic()
    with pytest.raises(StreamIdle, match="rank 0 found no new committed file"):
        next(iter(sl))
    assert time.monotonic() - t0 < 20  # rank 0's marker is read at once, no grace wait
    commit(tmp_path, 0, 4)
    Sequencer(str(tmp_path), led).cut()  # rank 0 cuts window 0 at attempt 2
    got = _keys(next(iter(sl)))
    assert len(got) == 2 and set(got) <= {r["__key__"] for r in _rows(0, 4)}
    sl.close()


def test_stopping_at_a_window_end_and_iterating_again(tmp_path: Path) -> None:
    """A loop that breaks right after a window's last batch (for an eval, a checkpoint) and
    iterates again goes on with the next window: nothing twice, nothing skipped."""
    commit(tmp_path, 0, 8)
    commit(tmp_path, 1, 8)
    with mmload.StreamLoader(
        tmp_path, batch_size=4, window_files=1, poll_s=0.02, max_wait_s=0.3
    ) as sl:
        it = iter(sl)
        first = [next(it), next(it)]  # window 0, whole
        assert sl.state_dict()["window"] == 1
        rest = drain(iter(sl))
    keys = [k for b in first + rest for k in _keys(b)]
    assert Counter(keys) == Counter(r["__key__"] for p in (0, 1) for r in _rows(p, 8))


def test_a_window_with_nothing_readable_is_skipped_and_counted(tmp_path: Path) -> None:
    commit(tmp_path, 0, 4)
    (tmp_path / "part-00001.parquet").write_bytes(b"not parquet at all")
    commit(tmp_path, 2, 4)
    kw: dict[str, Any] = dict(batch_size=4, window_files=1, poll_s=0.02, max_wait_s=0.3)
    with mmload.StreamLoader(tmp_path, on_error="skip", max_bad_samples=10, **kw) as sl:
        keys = [k for b in drain(sl) for k in _keys(b)]
        st = sl.stats()
    assert keys == [r["__key__"] for p in (0, 2) for r in _rows(p, 4)]
    assert st["bad_samples"] >= 1 and any("part-00001" in str(b["shard"]) for b in st["bad"])
    with mmload.StreamLoader(tmp_path, ledger=tmp_path / "_l2", **kw) as sl:  # default: raise
        it = iter(sl)
        next(it)
        with pytest.raises(mmload.ShardError):
            next(it)
