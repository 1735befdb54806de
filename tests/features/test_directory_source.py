"""DirectorySource: Flink FileSink part files, committed by rename, read exactly once."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from mmload.errors import ConfigError, JoinError
from mmload.features import DirectorySource, FeatureTable

POLL = 0.05


def rows(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "user": [f"u{i % 3}" for i in range(start, start + n)],
            "ts": pa.array(range(start, start + n), pa.int64()),
            "score": pa.array([float(i) for i in range(start, start + n)]),
        }
    )


def commit(directory: Path, name: str, table: pa.Table, fmt: str = "parquet") -> Path:
    """Write like Flink's FileSink: an in-progress hidden file, then an atomic rename."""
    hidden = directory / f".{name}.inprogress.0b1c"
    if fmt == "parquet":
        pq.write_table(table, hidden)
    elif fmt == "ipc-file":
        with ipc.new_file(hidden, table.schema) as w:
            w.write_table(table)
    else:
        with ipc.new_stream(hidden, table.schema) as w:
            w.write_table(table)
    final = directory / name
    os.rename(hidden, final)
    return final


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_committed_files_are_read_once_and_hidden_never(tmp_path: Path) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    commit(tmp_path, "part-0-0.parquet", rows(0, 5))  # present before the source starts
    (tmp_path / ".part-0-1.inprogress.77").write_bytes(b"PAR1 half written")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / "_part-0-2.tmp").write_bytes(b"garbage")
    with DirectorySource(tmp_path, table, poll_interval=POLL) as src:
        wait_for(lambda: table.stats()["rows"] == 5)
        p0 = src.stats()["polls"]
        commit(tmp_path, "part-0-1", rows(5, 3), fmt="ipc-file")  # no suffix: Flink's default
        wait_for(lambda: table.stats()["rows"] == 8, timeout=60)
        # picked up by the next poll (or the one after, if a poll was under way): counted in
        # polls, not seconds, so a loaded machine does not fail it
        assert src.stats()["polls"] - p0 <= 2
        commit(tmp_path, "part-0-2.arrows", rows(8, 2), fmt="ipc-stream")
        wait_for(lambda: table.stats()["rows"] == 10)
        polls = src.stats()["polls"]
        wait_for(lambda: src.stats()["polls"] >= polls + 5)  # several more polls: no re-reads
        s = src.stats()
        assert (s["files_read"], s["updates_applied"], s["rows_ingested"]) == (3, 3, 10)
        assert s["update_errors"] == 0 and s["state"] == "running" and s["alive"]
        assert table.stats()["updates_applied"] == 3
        assert table.join(["u0", "u1"], [100, 100])["score"].tolist() == [9.0, 7.0]
    assert src.stats()["state"] == "closed" and not src.stats()["alive"]


def test_corrupt_and_mismatched_files_are_skipped_and_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    caplog.set_level(logging.WARNING, logger="mmload.features")
    with DirectorySource(tmp_path, table, poll_interval=POLL) as src:
        commit(tmp_path, "part-1.parquet", rows(0, 4))
        wait_for(lambda: table.stats()["rows"] == 4)
        before = table.join(["u0", "u1", "u2"], [50, 50, 50])
        good = pq.write_table(rows(0, 100), tmp_path / ".x") or (tmp_path / ".x").read_bytes()
        (tmp_path / ".t").write_bytes(good[: len(good) // 2])  # a truncated Parquet file
        os.rename(tmp_path / ".t", tmp_path / "part-2.parquet")
        (tmp_path / ".r").write_bytes(os.urandom(300))
        os.rename(tmp_path / ".r", tmp_path / "part-3.parquet")
        (tmp_path / ".e").write_bytes(b"")
        os.rename(tmp_path / ".e", tmp_path / "part-4")
        commit(tmp_path, "part-5.parquet", rows(0, 2).drop_columns(["score"]))  # wrong schema
        wait_for(lambda: src.stats()["update_errors"] == 4)
        after = table.join(["u0", "u1", "u2"], [50, 50, 50])
        assert all(after[k].equal(before[k]) for k in before)  # nothing joined changed
        commit(tmp_path, "part-6.parquet", rows(4, 2))  # the thread kept going
        wait_for(lambda: table.stats()["rows"] == 6)
        s = src.stats()
        assert s["alive"] and s["state"] == "running" and s["updates_applied"] == 2
        reasons = {e["origin"]: e["reason"] for e in s["errors"]}
        assert set(reasons) == {"part-2.parquet", "part-3.parquet", "part-4", "part-5.parquet"}
        assert reasons["part-4"].startswith("unreadable part file")
        assert "missing column" in reasons["part-5.parquet"]
        assert table.stats()["update_errors"] == 1  # the unreadable ones never reached it
        assert any("part-3.parquet" in r.getMessage() for r in caplog.records)
        wait_for(lambda: src.stats()["polls"] >= s["polls"] + 3)
        assert src.stats()["update_errors"] == 4  # a bad file is not retried


def test_json_lines_part_files_are_read_by_their_suffix(tmp_path: Path) -> None:
    """Flink's row-format FileSink writes JSON lines: a ``.jsonl`` or ``.ndjson`` part file is
    parsed as JSON; the same bytes under another name are not (they are tried as Arrow IPC and
    skipped as unreadable)."""

    def lines(start: int, n: int) -> bytes:
        return "".join(
            f'{{"user": "u{i % 3}", "ts": {i}, "score": {i}.5}}\n' for i in range(start, start + n)
        ).encode()

    table = FeatureTable(key="user", timestamp="ts")
    for name, data in [
        ("part-0.jsonl", lines(0, 3)),
        ("part-1.ndjson", lines(3, 2)),
        ("part-2.json", lines(5, 4)),
    ]:
        (tmp_path / f".{name}.inprogress").write_bytes(data)
        os.rename(tmp_path / f".{name}.inprogress", tmp_path / name)
    with DirectorySource(tmp_path, table, poll_interval=POLL) as src:
        wait_for(lambda: src.stats()["files_read"] + src.stats()["update_errors"] == 3)
        s = src.stats()
    assert (s["files_read"], s["rows_ingested"], s["update_errors"]) == (2, 5, 1)
    assert [e["origin"] for e in s["errors"]] == ["part-2.json"]
    assert s["errors"][0]["reason"].startswith("unreadable part file: ArrowInvalid: ")
    got = table.join(["u0", "u1", "u2"], [100, 100, 100])["score"].tolist()
    assert got == [3.5, 4.5, 2.5]  # u0: ts 0, 3; u1: ts 1, 4; u2: ts 2


def test_backlog_is_read_in_bounded_polls_oldest_first(tmp_path: Path) -> None:
    table = FeatureTable(key="user", timestamp="ts", duplicate="last")
    for i in range(7):
        path = commit(
            tmp_path,
            f"part-{6 - i}.parquet",
            rows(0, 1).set_column(2, "score", pa.array([float(i)])),
        )
        os.utime(path, ns=(i * 10**9, i * 10**9))  # mtime order 0..6, reverse name order
    with DirectorySource(tmp_path, table, poll_interval=10.0, max_files_per_poll=2) as src:
        wait_for(lambda: src.stats()["polls"] >= 4)  # no 10 s pause while a backlog waits
        assert (src.stats()["polls"], src.stats()["files_read"]) == (4, 7)
    # all rows share (u0, ts 0): the file written last (by mtime) wins
    assert table.join(["u0"], [0])["score"].tolist() == [6.0]

    # a backlog of exactly two polls' files: the second poll reads the last ones and the source
    # then waits its interval (no third, empty poll at once)
    other = tmp_path / "exact"
    other.mkdir()
    for i in range(4):
        commit(other, f"part-{i}.parquet", rows(i, 1))
    table = FeatureTable(key="user", timestamp="ts")
    with DirectorySource(other, table, poll_interval=30.0, max_files_per_poll=2) as src:
        wait_for(lambda: src.stats()["polls"] >= 2)
        time.sleep(0.3)  # an immediate third poll would be counted by now
        assert (src.stats()["polls"], src.stats()["files_read"]) == (2, 4)


def test_removed_files_are_forgotten_and_a_new_file_of_that_name_is_read(tmp_path: Path) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with DirectorySource(tmp_path, table, poll_interval=POLL) as src:
        path = commit(tmp_path, "part-0.parquet", rows(0, 1))
        wait_for(lambda: src.stats()["files_read"] == 1)
        path.unlink()
        wait_for(lambda: src.stats()["files_seen"] == 0)
        commit(tmp_path, "part-0.parquet", rows(1, 1))
        wait_for(lambda: src.stats()["files_read"] == 2)
    assert table.stats()["rows"] == 2


def test_close_is_idempotent_and_validation(tmp_path: Path) -> None:
    other = FeatureTable(key="user", timestamp="ts")
    src = DirectorySource(tmp_path, other, start=False)
    # the documented defaults; the name defaults to the path
    assert (src.poll_interval, src.max_files_per_poll) == (1.0, 64)
    assert src.name == str(tmp_path) == src.stats()["path"]
    assert (src.stats()["name"], src.stats()["polls"], src.stats()["alive"]) == (
        str(tmp_path),
        0,
        False,
    )
    src.close()
    one = DirectorySource(tmp_path, other, max_files_per_poll=1, name="feed", start=False)
    assert (one.name, one.max_files_per_poll) == ("feed", 1)
    one.close()
    table = FeatureTable(key="user", timestamp="ts")
    src = DirectorySource(tmp_path, table, poll_interval=POLL)
    src.close()
    src.close()
    assert src.stats()["state"] == "closed"
    assert [s["state"] for s in table.stats()["sources"]] == ["closed"]
    with pytest.raises(ConfigError, match="path="):
        DirectorySource(tmp_path / "nope", table)
    with pytest.raises(ConfigError, match="poll_interval="):
        DirectorySource(tmp_path, table, poll_interval=0)
    for bad in (0, True, 2.0, "2"):
        with pytest.raises(ConfigError, match="max_files_per_poll="):
            DirectorySource(tmp_path, table, max_files_per_poll=bad)  # type: ignore[arg-type]


def test_an_unreadable_directory_is_a_counted_failed_poll_not_a_busy_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mmload.features")
    gone = tmp_path / "feed"
    gone.mkdir()
    table = FeatureTable(key="user", timestamp="ts")
    src = DirectorySource(gone, table, poll_interval=30.0, start=False)
    gone.rmdir()  # removed after the source was made (an unmounted volume, a deleted prefix)
    src.start()
    try:
        wait_for(lambda: src.stats()["failed_polls"] >= 1)
        time.sleep(0.3)  # a failed poll is followed by the interval, not by another poll at once
        s = src.stats()
        assert (s["failed_polls"], s["polls"], s["state"], s["alive"]) == (1, 1, "running", True)
        assert s["failures"][0]["reason"].startswith("FileNotFoundError: ")
        assert str(gone) in s["failures"][0]["reason"]
        msgs = [r.getMessage() for r in caplog.records]
        assert any(
            m.startswith(f"feature source {str(gone)!r} cannot list its directory: ")
            and "No such file or directory" in m
            for m in msgs
        ), msgs
    finally:
        src.close()


def test_a_file_removed_while_listing_does_not_hide_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmload.features.directory as directory

    class Vanished:
        name = "part-0.parquet"

        def is_file(self) -> bool:
            raise FileNotFoundError(self.name)

    real = os.scandir

    def scandir(path: str) -> list[object]:
        return [Vanished(), *real(path)]  # listed, then removed before its stat

    monkeypatch.setattr(directory.os, "scandir", scandir)
    commit(tmp_path, "part-1.parquet", rows(0, 3))
    table = FeatureTable(key="user", timestamp="ts")
    with DirectorySource(tmp_path, table, poll_interval=POLL) as src:
        wait_for(lambda: src.stats()["files_read"] == 1)
        s = src.stats()
    assert (s["rows_ingested"], s["update_errors"], s["files_seen"]) == (3, 0, 1)


def test_an_unexpected_error_is_reported_and_reraised_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmload.features.directory as directory

    def broken(path: str) -> pa.Table:
        raise RuntimeError(f"bug while reading {os.path.basename(path)}")

    monkeypatch.setattr(directory, "read_part_file", broken)
    table = FeatureTable(key="user", timestamp="ts")
    src = DirectorySource(tmp_path, table, poll_interval=POLL)
    commit(tmp_path, "part-0.parquet", rows(0, 1))
    wait_for(lambda: src.stats()["state"] == "failed" and not src.stats()["alive"])
    s = table.stats()["sources"][0]
    assert "RuntimeError: bug while reading part-0.parquet" in s["last_error"]
    with pytest.raises(JoinError, match="bug while reading") as info:
        src.check()
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(JoinError, match="failed"):
        src.close()
    src.close()  # idempotent: reported once
