"""The live feature sources' base class, driven by a scripted subclass: validation, the thread's
lifecycle, failure lists and error messages (what DirectorySource and FlightSource inherit)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pytest

from mmload.errors import ConfigError, JoinError
from mmload.features import FeatureTable, Source
from mmload.features.sources import first_line
from mmload.features.stats import LISTED

Step = Callable[["Scripted"], bool]


class Scripted(Source):
    """Each poll runs the next queued step (its result: more waiting?); no step: an idle poll."""

    kind = "scripted"

    def __init__(self, table: FeatureTable, steps: Sequence[Step] = (), **kw: Any) -> None:
        self.steps: queue.Queue[Step] = queue.Queue()
        for step in steps:
            self.steps.put(step)
        kw.setdefault("name", "feed")
        kw.setdefault("poll_interval", 0.01)
        super().__init__(table, **kw)

    def _poll(self) -> bool:
        try:
            step = self.steps.get_nowait()
        except queue.Empty:
            return False
        return step(self)


def table() -> FeatureTable:
    return FeatureTable(key="user", timestamp="ts")


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_poll_interval_must_be_a_positive_number_of_seconds() -> None:
    for bad in (0, -1, -0.5, True, False, "1", None, float("nan")):
        with pytest.raises(ConfigError, match=r"poll_interval=.*must be a number > 0 \(seconds\)"):
            Scripted(table(), poll_interval=bad, start=False)
    for good, want in ((2, 2.0), (0.25, 0.25), (1e-6, 1e-6)):
        src = Scripted(table(), poll_interval=good, start=False)
        assert src.poll_interval == want and type(src.poll_interval) is float
    with pytest.raises(ConfigError, match=r"table=.*must be a FeatureTable"):
        Scripted({"user": []}, start=False)  # type: ignore[arg-type]


def test_first_line_keeps_type_and_first_line_within_the_limit() -> None:
    assert first_line(ValueError("  bad thing\nsecond line\nthird  ")) == "ValueError: bad thing"
    assert first_line(KeyError()) == "KeyError: "
    assert first_line(OSError("   \n  ")) == "OSError: "
    # the default limit is 300 characters, "..." included
    fits = RuntimeError("x" * (300 - len("RuntimeError: ")))
    assert first_line(fits) == f"RuntimeError: {'x' * 286}"
    over = RuntimeError("x" * 287 + "tail")
    cut = first_line(over)
    assert len(cut) == 300 and cut == f"RuntimeError: {'x' * 283}..."
    assert first_line(ValueError("abcdefgh"), limit=12) == "ValueErro..."
    assert first_line(ValueError("abc"), limit=10) == "ValueEr..."
    assert first_line(ValueError("a"), limit=13) == "ValueError: a"


def test_the_thread_starts_by_default_as_a_named_daemon_and_stops_for_good() -> None:
    src = Scripted(table(), name="clicks")
    try:
        wait_for(lambda: src.stats()["polls"] >= 1)
        threads = [t for t in threading.enumerate() if t.name == "mmload-scripted-clicks"]
        assert len(threads) == 1 and threads[0].daemon  # never blocks interpreter exit
        assert src.stats()["state"] == "running" and src.stats()["alive"]
        src.start()  # a second start is a no-op
    finally:
        src.close()
    assert not src.stats()["alive"] and src.stats()["state"] == "closed"
    src.start()  # after close: still a no-op (a thread cannot run twice)
    assert not src.stats()["alive"] and src.stats()["state"] == "closed"

    held = Scripted(table(), start=False)
    assert held.stats()["polls"] == 0 and not held.stats()["alive"]
    assert held.stats()["state"] == "running"  # not closed, not failed: ready to start
    held.start()
    wait_for(lambda: held.stats()["polls"] >= 1)
    held.close()


def test_failed_polls_are_all_counted_and_the_newest_listed() -> None:
    def fail_many(src: Scripted) -> bool:
        for i in range(LISTED + 5):
            src._failure(f"unreachable #{i}")
        return False

    src = Scripted(table(), [fail_many])
    try:
        wait_for(lambda: src.stats()["failed_polls"] == LISTED + 5)
        s = src.stats()
    finally:
        src.close()
    reasons = [f["reason"] for f in s["failures"]]
    assert reasons == [f"unreachable #{i}" for i in range(5, LISTED + 5)]
    assert all(abs(f["time"] - time.time()) < 600 for f in s["failures"])


def test_updates_are_applied_or_skipped_listed_under_the_source_and_origin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mmload.features")
    good = pa.table({"user": ["a", "b"], "ts": pa.array([5, 9], pa.int64()), "v": [1.0, 2.0]})
    bad = pa.table({"user": ["a"], "ts": pa.array([7], pa.int64())})  # no "v": wrong schema
    results: list[bool] = []

    def apply(data: pa.Table, origin: str) -> Step:
        return lambda src: results.append(src._apply(data, origin)) or False

    t = table()
    src = Scripted(t, [apply(good, "batch-1"), apply(bad, "batch-2")])
    try:
        wait_for(lambda: len(results) == 2)
        s = src.stats()
    finally:
        src.close()
    assert results == [True, False]
    assert (s["rows_ingested"], s["updates_applied"], s["update_errors"]) == (2, 1, 1)
    assert s["newest_feature_ts"] == 9
    assert [e["origin"] for e in s["errors"]] == ["batch-2"]
    assert "missing column" in s["errors"][0]["reason"]
    # the table lists it under "<source name>: <origin>"
    assert [e["origin"] for e in t.stats()["errors"]] == ["feed: batch-2"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("feature source 'feed' skipped batch-2: ") and "missing column" in msg
    # feature lag: newest sample ts seen by the table's joins - newest feature ts from the source
    assert s["feature_lag"] is None
    t.join(["a"], [109])
    assert src.stats()["feature_lag"] == 100


def test_unreadable_updates_are_skipped_listed_and_logged_and_stats_describe_the_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mmload.features")

    def skip(src: Scripted) -> bool:
        src._skip("part-3", "unreadable part file: ArrowInvalid: not Arrow")
        return False

    src = Scripted(table(), [skip], name="clicks")
    try:
        wait_for(lambda: src.stats()["update_errors"] == 1)
        s = src.stats()
        assert repr(src) == "Scripted(name='clicks', state='running')"
    finally:
        src.close()
    assert repr(src) == "Scripted(name='clicks', state='closed')"
    assert (s["name"], s["kind"], s["state"], s["last_error"]) == (
        "clicks",
        "scripted",
        "running",
        None,
    )
    assert (s["failed_polls"], s["failures"], s["updates_applied"]) == (0, [], 0)
    assert [(e["origin"], e["reason"]) for e in s["errors"]] == [
        ("part-3", "unreadable part file: ArrowInvalid: not Arrow")
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "feature source 'clicks' skipped part-3: unreadable part file: ArrowInvalid: not Arrow"
    ]


def test_close_gives_up_on_a_stuck_thread_after_its_timeout_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import inspect

    assert inspect.signature(Source.close).parameters["timeout"].default == 10.0
    caplog.set_level(logging.WARNING, logger="mmload.features")
    release, entered = threading.Event(), threading.Event()

    def stuck(src: Scripted) -> bool:  # a blocking call that _interrupt cannot wake
        entered.set()
        release.wait(60)
        return False

    src = Scripted(table(), [stuck], name="slow")
    try:
        assert entered.wait(30)
        src.close(timeout=0.2)
        assert src.stats()["alive"] and src.stats()["state"] == "closed"
        assert [r.getMessage() for r in caplog.records] == [
            "feature source 'slow' did not stop within 0.2 s"
        ]
    finally:
        release.set()
    wait_for(lambda: not src.stats()["alive"])  # it stops once the call returns


def test_an_unexpected_error_ends_the_thread_logged_and_reraised_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="mmload.features")

    def bug(src: Scripted) -> bool:
        raise ZeroDivisionError("division by zero\n  with a debug context")

    src = Scripted(table(), [bug], name="clicks")
    wait_for(lambda: not src.stats()["alive"])
    s = src.stats()
    assert (s["state"], s["last_error"]) == ("failed", "ZeroDivisionError: division by zero")
    (rec,) = [r for r in caplog.records if "stopped by an unexpected error" in r.getMessage()]
    assert rec.getMessage() == "feature source 'clicks' stopped by an unexpected error"
    assert rec.exc_info is not None and rec.exc_info[0] is ZeroDivisionError  # with traceback
    with pytest.raises(JoinError, match="feature source 'clicks' failed: ZeroDivisionError"):
        src.check()
    with pytest.raises(JoinError) as info:
        src.close()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    src.close()  # reported once
    assert src.stats()["state"] == "failed"  # failed wins over closed


def test_the_with_block_closes_and_does_not_mask_its_own_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="mmload.features")

    def bug(src: Scripted) -> bool:
        raise RuntimeError("bug in the source")

    with Scripted(table()) as src:
        wait_for(lambda: src.stats()["polls"] >= 1)
    assert src.stats()["state"] == "closed" and not src.stats()["alive"]

    # the source failed and the block raised too: the block's exception is what propagates
    def failing_block() -> None:
        with Scripted(table(), [bug]) as src:
            wait_for(lambda: src.stats()["state"] == "failed")
            raise KeyError("the block's own")

    with pytest.raises(KeyError, match="the block's own"):
        failing_block()
    msgs = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("feature source 'feed': feature source 'feed' failed: RuntimeError")
        and "while handling KeyError" in m
        for m in msgs
    ), msgs

    # the source failed and the block did not: its error comes out of the with
    with pytest.raises(JoinError, match="bug in the source"), Scripted(table(), [bug]) as src:
        wait_for(lambda: src.stats()["state"] == "failed")


def test_close_wakes_a_sleeping_thread_and_hooks_run_in_order() -> None:
    calls: list[str] = []

    class Hooked(Scripted):
        def _interrupt(self) -> None:
            calls.append(f"interrupt alive={self._thread.is_alive()}")

        def _cleanup(self) -> None:
            calls.append(f"cleanup alive={self._thread.is_alive()}")

    src = Hooked(table(), poll_interval=3600.0)  # asleep for an hour after its first poll
    wait_for(lambda: src.stats()["polls"] >= 1)
    src.close(timeout=60)
    assert calls == ["interrupt alive=True", "cleanup alive=False"]
    assert src.stats()["polls"] == 1

    never = Hooked(table(), start=False)
    calls.clear()
    never.close()  # never started: nothing to join, the hooks still run
    assert calls == ["interrupt alive=False", "cleanup alive=False"]


def test_the_package_resolves_its_names_lazily() -> None:
    import importlib

    import mmload.features as features

    assert dir(features) == sorted(features.__all__)
    where = {
        "FOUND": "mmload.features.schema",
        "DirectorySource": "mmload.features.directory",
        "FeatureTable": "mmload.features.table",
        "FlightSource": "mmload.features.flight",
        "Snapshot": "mmload.features.snapshot",
        "Source": "mmload.features.sources",
    }
    assert sorted(where) == sorted(features.__all__)
    for name, module in where.items():
        value = getattr(features, name)
        assert value is getattr(importlib.import_module(module), name)
        assert vars(features)[name] is value  # resolved once, then a plain attribute
    with pytest.raises(AttributeError, match=r"module 'mmload\.features' has no attribute 'Nope'"):
        features.Nope  # noqa: B018
