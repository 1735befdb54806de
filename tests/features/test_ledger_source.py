"""LedgerSource on its own: validation and defaults, who cuts the feature windows, versions and
their watermarks, kept and trimmed snapshots, and bad part files inside a window. The test cuts
the windows itself (as rank 0 would) where it needs them one at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from mmload.errors import ConfigError, JoinError
from mmload.features import FeatureTable
from mmload.features.ledger import _SUFFIXES as SUFFIXES  # rank 0 cuts what the source reads
from mmload.features.ledger import LedgerSource
from mmload.sources.growing import Sequencer

SCHEMA = pa.schema([("user", pa.int64()), ("ts", pa.int64()), ("v", pa.float64())])


def features(ts: list[int], v: float) -> pa.Table:
    """Feature v of user 1 at each of ``ts``."""
    return pa.table({"user": [1] * len(ts), "ts": ts, "v": [v] * len(ts)}, schema=SCHEMA)


def commit(directory: Path, name: str, table: pa.Table | bytes) -> None:
    hidden = directory / f".{name}.inprogress"
    if isinstance(table, bytes):
        hidden.write_bytes(table)
    elif name.endswith((".feather", ".arrow", ".ipc")):
        with ipc.new_file(hidden, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, hidden)
    os.rename(hidden, directory / name)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def new_table() -> FeatureTable:
    return FeatureTable(key="user", timestamp="ts", columns=SCHEMA)


def value(src: LedgerSource, snap: object = None, ts: int = 10**6) -> float | None:
    """Feature v of user 1 as of ``ts``, in ``snap`` (None: the table now); None if none."""
    got = src.table.join([1], [ts], snapshot=snap)
    return float(got["v"][0]) if bool(got["__features_found__"][0]) else None


def test_validation_and_defaults(tmp_path: Path) -> None:
    t = new_table()
    with pytest.raises(ConfigError) as info:
        LedgerSource(tmp_path / "nope", t)
    assert str(info.value) == f"path={str(tmp_path / 'nope')!r}: not a directory"
    for bad in (-1, True, 1.5, "0"):
        with pytest.raises(ConfigError) as info:
            LedgerSource(tmp_path, t, lateness=bad, start=False)  # type: ignore[arg-type]
        assert str(info.value) == f"lateness={bad!r}: must be an int >= 0 (ts units)"
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ConfigError) as info:
            LedgerSource(tmp_path, t, keep=bad, start=False)  # type: ignore[arg-type]
        assert str(info.value) == f"keep={bad!r}: must be an int >= 1"
    src = LedgerSource(tmp_path, t, start=False)
    assert (src.lateness, src.keep, src.poll_interval) == (0, 4, 0.5)
    assert src.ledger.directory == str(tmp_path / "_mmload" / "ledger")
    assert src.name == str(tmp_path) == src.stats()["path"]
    s = src.stats()
    assert (s["kind"], s["version"], s["watermark"], s["files_read"]) == ("ledger", 0, None, 0)
    assert (s["snapshots_kept"], s["alive"], s["polls"]) == (1, False, 0)
    assert src.current() == (0, None) and src.version == 0 and src.watermark is None
    src.close()
    edge = LedgerSource(
        tmp_path, new_table(), lateness=0, keep=1, ledger=tmp_path / "elsewhere", name="f",
        start=False,
    )  # fmt: skip
    assert (edge.lateness, edge.keep, edge.name) == (0, 1, "f")
    assert edge.ledger.directory == str(tmp_path / "elsewhere")
    edge.close()


@pytest.mark.parametrize(("rank", "cuts"), [(None, True), ("0", True), ("1", False), ("3", False)])
def test_rank_zero_cuts_the_windows_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str | None, cuts: bool
) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    commit(tmp_path, "f-0.parquet", features([5], 1.0))
    with LedgerSource(tmp_path, new_table(), poll_interval=0.01) as src:
        if cuts:
            wait_for(lambda: src.version == 1)
        else:
            wait_for(lambda: src.stats()["polls"] >= 5)  # polls, and nobody cuts a window
            assert src.version == 0 and src.ledger.window(0) is None


def test_every_feature_file_format_is_taken(tmp_path: Path) -> None:
    commit(tmp_path, "a.feather", features([1], 1.0))
    commit(tmp_path, "b.ndjson", b'{"user": 1, "ts": 2, "v": 2.0}\n')
    commit(tmp_path, "c.ipc", features([3], 3.0))
    commit(tmp_path, "d.txt", b"not a feature file")
    with LedgerSource(tmp_path, new_table(), sequencer=True, poll_interval=0.01) as src:
        wait_for(lambda: src.version == 1)
        win = src.ledger.window(0)
        s = src.stats()
    assert win is not None and sorted(f.path for f in win.files) == [
        "a.feather",
        "b.ndjson",
        "c.ipc",
    ]
    assert (s["files_read"], s["update_errors"], s["watermark"]) == (3, 0, 3)
    assert value(src) == 3.0


def test_versions_watermarks_and_kept_snapshots(tmp_path: Path) -> None:
    src = LedgerSource(
        tmp_path, new_table(), sequencer=False, lateness=5, keep=2, poll_interval=0.01
    )
    rank0 = Sequencer(str(tmp_path), src.ledger, SUFFIXES)
    try:
        steps = [  # (file, its ts, its value): windows 1..4
            ("f-1.parquet", [10, 20], 1.0),
            ("f-2.parquet", [40, 30], 2.0),
            ("f-3.parquet", [12], 3.0),  # late: the watermark does not go back
            ("f-4.parquet", [], 4.0),  # no rows
        ]
        for i, (name, ts, v) in enumerate(steps, start=1):
            commit(tmp_path, name, features(ts, v))
            assert rank0.cut() is not None
            wait_for(lambda i=i: src.version == i)
        assert src.stats()["files_read"] == 4
        assert [src.at(v, 1.0)[1] for v in range(5)] == [None, 15, 35, 35, 35]
        assert src.current() == (4, 35) and src.watermark == 35
        assert src.wait_for_watermark(35, 0.0)
        t0 = time.monotonic()
        assert not src.wait_for_watermark(36, 0.3)
        assert time.monotonic() - t0 >= 0.3  # it waited its whole timeout
        assert [value(src, src.at(v, 1.0)[0], ts=25) for v in range(5)] == [
            None,
            1.0,
            1.0,
            1.0,
            1.0,
        ]
        assert [value(src, src.at(v, 1.0)[0], ts=45) for v in range(5)] == [
            None,
            1.0,
            2.0,
            2.0,
            2.0,
        ]
        # nothing is pinned beyond version 0: every snapshot is kept
        assert src.stats()["snapshots_kept"] == 5 and src.can_reach(0)
        # pin 3: versions before min(pin, current - keep) = min(3, 4 - 2) = 2 may go
        src.pin(3)
        assert src.stats()["snapshots_kept"] == 3
        assert not src.can_reach(1) and src.can_reach(2) and src.can_reach(9)
        with pytest.raises(JoinError) as info:
            src.at(1, 1.0)
        assert str(info.value) == (
            f"feature source {str(tmp_path)!r}: version 1 is no longer kept (kept: [2, 3, 4]); "
            "to go back to an older state, start a new LedgerSource (and table): it applies the "
            "ledger again from the start"
        )
        t0 = time.monotonic()
        with pytest.raises(JoinError) as info:
            src.at(6, 0.3)
        assert time.monotonic() - t0 >= 0.3
        assert str(info.value) == (
            f"feature source {str(tmp_path)!r}: version 6 not reached within 0.3 s (applied 4; "
            f"ledger {src.ledger.directory!r})"
        )
        # a version still to come is waited for
        commit(tmp_path, "f-5.parquet", features([50], 5.0))
        assert rank0.cut() is not None
        snap, wm = src.at(5, 30.0)
        assert wm == 45 and value(src, snap) == 5.0
        assert src.wait_for_watermark(45, 30.0)
        # version 5 trims below min(3, 5 - 2) = 3
        assert src.stats()["snapshots_kept"] == 3 and not src.can_reach(2)
        src.pin(0)  # pinning lower brings nothing back, and trims nothing more
        assert src.stats()["snapshots_kept"] == 3 and src.can_reach(3)
    finally:
        src.close()


def test_bad_part_files_inside_a_window_are_skipped_alike(tmp_path: Path) -> None:
    src = LedgerSource(tmp_path, new_table(), sequencer=False, poll_interval=0.01)
    rank0 = Sequencer(str(tmp_path), src.ledger, SUFFIXES)
    try:
        commit(tmp_path, "0.parquet", b"not Parquet at all")  # a first window with no rows
        rank0.cut()
        wait_for(lambda: src.version == 1)
        assert src.current() == (1, None) and src.stats()["alive"]
        commit(tmp_path, "a.parquet", features([10], 1.0))
        commit(tmp_path, "b.parquet", b"PAR1 but truncated")
        rank0.cut()
        wait_for(lambda: src.version == 2)
        s = src.stats()
        assert (s["files_read"], s["update_errors"], s["updates_applied"]) == (1, 2, 1)
        assert [e["origin"] for e in s["errors"]] == ["0.parquet", "b.parquet"]
        assert s["errors"][1]["reason"].startswith("unreadable part file: ArrowInvalid: ")
        assert value(src) == 1.0 and src.watermark == 10
        # two files whose columns cannot be put together: the whole window is skipped
        commit(tmp_path, "c.parquet", features([20], 2.0))
        commit(tmp_path, "d.parquet", pa.table({"user": [1], "ts": ["late"], "v": [9.0]}))
        rank0.cut()
        wait_for(lambda: src.version == 3)
        s = src.stats()
        assert (s["files_read"], s["update_errors"], s["updates_applied"]) == (3, 3, 1)
        assert s["errors"][2]["origin"] == "window 2"
        assert s["errors"][2]["reason"].startswith("part files do not concatenate: Arrow")
        assert value(src) == 1.0 and src.watermark == 10  # nothing of it applied
        # a window the table rejects (wrong schema) moves the version, not the watermark
        commit(tmp_path, "e.parquet", pa.table({"user": [1], "ts": [30]}))
        rank0.cut()
        wait_for(lambda: src.version == 4)
        s = src.stats()
        assert s["errors"][3]["origin"] == "window 3" and src.watermark == 10
        # columns a JSON-lines file leaves all null are promoted to the others' types
        commit(tmp_path, "f.parquet", features([40], 4.0))
        commit(tmp_path, "g.ndjson", b'{"user": 2, "ts": 41, "v": null}\n')
        rank0.cut()
        wait_for(lambda: src.version == 5)
        assert src.stats()["update_errors"] == 4 and src.watermark == 41
        assert value(src) == 4.0
    finally:
        src.close()


def test_a_backlog_of_windows_is_applied_without_waiting_between_them(tmp_path: Path) -> None:
    src = LedgerSource(tmp_path, new_table(), sequencer=False, poll_interval=30.0, start=False)
    rank0 = Sequencer(str(tmp_path), src.ledger, SUFFIXES)
    for i in range(3):
        commit(tmp_path, f"f-{i}.parquet", features([i], float(i)))
        rank0.cut()
    src.start()
    try:
        wait_for(lambda: src.version == 3, timeout=20)  # not one window every 30 s
        assert value(src) == 2.0 and src.watermark == 2
    finally:
        src.close()
