"""FlightSource against a real pyarrow.flight server on loopback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from mmload.errors import ConfigError
from mmload.features import FeatureTable, FlightSource

POLL = 0.05


def batch(start: int, n: int, key: str = "user") -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            key: [f"u{i % 4}" for i in range(start, start + n)],
            "ts": pa.array(range(start, start + n), pa.int64()),
            "score": pa.array([float(i) for i in range(start, start + n)]),
        }
    )


class FeatureServer(flight.FlightServerBase):
    """Serves ticket b"all" (every batch so far), b"since:<ts>" (rows newer than ts), b"bad"
    (rows of the wrong schema), b"hang" (one batch, then nothing until released), b"break" (one
    batch, then an error) and b"silent" (nothing until released); any descriptor has endpoints
    b"bad" and b"all", and descriptor path ["hang"] answers once released."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(f"grpc://127.0.0.1:{port}")
        self.batches: list[pa.RecordBatch] = [batch(0, 8)]
        self.tickets: list[bytes] = []
        self.descriptors: list[flight.FlightDescriptor] = []
        self.release = threading.Event()

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        t = ticket.ticket
        self.tickets.append(t)
        schema = self.batches[0].schema
        if t == b"all":
            return flight.RecordBatchStream(pa.Table.from_batches(self.batches))
        if t.startswith(b"since:"):
            since = int(t.split(b":")[1])
            table = pa.Table.from_batches(self.batches)
            return flight.RecordBatchStream(table.filter(pa.compute.greater(table["ts"], since)))
        if t == b"bad":  # a stream of another schema (one stream has one schema)
            return flight.RecordBatchStream(pa.Table.from_batches([batch(100, 2, key="account")]))
        if t == b"hang":

            def slow() -> Iterator[pa.RecordBatch]:
                yield batch(30, 1)
                self.release.wait(120)

            return flight.GeneratorStream(schema, slow())
        if t == b"break":

            def broken() -> Iterator[pa.RecordBatch]:
                yield batch(40, 1)
                raise flight.FlightServerError("the stream broke")

            return flight.GeneratorStream(schema, broken())
        if t == b"silent":

            def silent() -> Iterator[pa.RecordBatch]:
                self.release.wait(120)
                yield batch(50, 1)

            return flight.GeneratorStream(schema, silent())
        raise flight.FlightServerError(f"unknown ticket {t!r}")

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        self.descriptors.append(descriptor)
        if descriptor.path == [b"hang"]:
            self.release.wait(20)
        endpoints = [flight.FlightEndpoint(t, []) for t in (b"bad", b"all")]
        return flight.FlightInfo(self.batches[0].schema, descriptor, endpoints, -1, -1)


@pytest.fixture
def server() -> Iterator[FeatureServer]:
    s = FeatureServer()
    yield s
    s.release.set()
    s.shutdown()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_ticket_stream_is_ingested(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with FlightSource(
        f"grpc://127.0.0.1:{server.port}", table, ticket=b"all", poll_interval=POLL
    ) as src:
        wait_for(lambda: table.stats()["rows"] == 8)
        server.batches.append(batch(8, 4))
        wait_for(lambda: table.stats()["rows"] == 12)
        s = src.stats()
        assert s["state"] == "up" and s["update_errors"] == 0 and s["failed_polls"] == 0
        table.join(["u0"], [100])
        assert src.stats()["feature_lag"] == 100 - 11
    assert table.join(["u3", "u1"], [100, 4])["score"].tolist() == [11.0, 1.0]
    assert [x["state"] for x in table.stats()["sources"]] == ["closed"]
    assert src._client is None  # close() closed the client's channel


def test_cursor_ticket_pulls_only_new_rows(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    seen: list[int | None] = []

    def ticket(newest: int | None) -> bytes:
        seen.append(newest)
        return b"since:" + str(-1 if newest is None else newest).encode()

    with FlightSource(
        f"grpc://127.0.0.1:{server.port}", table, ticket=ticket, poll_interval=POLL
    ) as src:
        wait_for(lambda: table.stats()["rows"] == 8)
        server.batches.append(batch(8, 3))
        wait_for(lambda: table.stats()["rows"] == 11)
        wait_for(lambda: len(seen) >= 6)
        assert src.stats()["rows_ingested"] == 11  # each row pulled once
    assert seen[0] is None and 7 in seen and seen[-1] == 10


def test_descriptor_endpoints_and_a_bad_batch_is_skipped(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with FlightSource(
        f"grpc://127.0.0.1:{server.port}", table, descriptor=["features"], poll_interval=POLL
    ) as src:
        wait_for(lambda: src.stats()["update_errors"] >= 2 and table.stats()["rows"] == 8)
        s = src.stats()
        assert s["state"] == "up" and s["alive"] and s["failed_polls"] == 0
        assert "key column 'user' is missing" in s["errors"][0]["reason"]
        assert s["errors"][0]["origin"] == "batch 1"  # the first batch of the first endpoint
    end = src.stats()  # the thread has stopped: each batch it received was applied or skipped
    assert end["batches"] == end["update_errors"] + end["updates_applied"]
    assert table.stats()["update_errors"] == end["update_errors"]
    assert table.join(["u3"], [100])["score"].tolist() == [7.0]  # the endpoint after the bad one


def test_server_that_disappears_is_reported_down_then_up(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    port = server.port
    src = FlightSource(
        f"grpc://127.0.0.1:{port}",
        table,
        ticket=b"all",
        poll_interval=POLL,
        max_failures=3,
        max_backoff=0.2,
        call_timeout=5,
    )
    wait_for(lambda: table.stats()["rows"] == 8)
    before = table.join(["u0", "u1"], [100, 100])
    server.shutdown()
    wait_for(lambda: src.stats()["state"] == "down")
    s = src.stats()
    assert s["alive"] and s["failed_polls"] >= 3 and s["consecutive_failures"] >= 3
    assert s["failures"][0]["reason"].startswith("FlightUnavailableError")
    assert s["update_errors"] == 0  # an unreachable server is not a bad update
    after = table.join(["u0", "u1"], [100, 100])
    assert all(after[k].equal(before[k]) for k in before)
    revived = FeatureServer(port)
    try:
        revived.batches.append(batch(8, 2))
        wait_for(lambda: src.stats()["state"] == "up" and table.stats()["rows"] == 10)
    finally:
        src.close()
        revived.shutdown()
    assert src.stats()["state"] == "closed"


def test_close_interrupts_a_long_lived_stream(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    src = FlightSource(f"grpc://127.0.0.1:{server.port}", table, ticket="hang", poll_interval=POLL)
    wait_for(lambda: table.stats()["rows"] == 1)
    src.close(timeout=20)
    # Interrupted, not waited out: the stream does not end for 120 s, so a close that only
    # waited would give up after its 20 s and leave the thread alive.
    assert not src.stats()["alive"]
    assert src.stats()["failed_polls"] == 0


def test_validation() -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with pytest.raises(ConfigError, match="exactly one"):
        FlightSource("grpc://127.0.0.1:1", table, start=False)
    with pytest.raises(ConfigError, match="exactly one"):
        FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", descriptor=["x"], start=False)
    with pytest.raises(ConfigError, match="ticket="):
        FlightSource("grpc://127.0.0.1:1", table, ticket=3, start=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_failures="):
        FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", max_failures=0, start=False)
    with pytest.raises(ConfigError, match="call_timeout="):
        FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", call_timeout=-1, start=False)
    src = FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", start=False)
    assert src.stats()["state"] == "starting"
    src.close()
    src.close()


def test_defaults(flight_call_options: list[dict[str, Any]]) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    src = FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", start=False)
    assert (src.poll_interval, src.max_failures, src.max_backoff) == (1.0, 3, 30.0)
    assert flight_call_options == [{"timeout": 30.0}]  # call_timeout
    assert src.name == "grpc://127.0.0.1:1" == src.stats()["location"]
    assert src.stats()["kind"] == "flight"
    assert (src.stats()["alive"], src.stats()["polls"], src.stats()["batches"]) == (False, 0, 0)
    src.close()


def test_max_failures_and_max_backoff_validation() -> None:
    table = FeatureTable(key="user", timestamp="ts")
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ConfigError, match=r"max_failures=.*must be an int >= 1"):
            FlightSource("grpc://h:1", table, ticket=b"x", max_failures=bad, start=False)  # type: ignore[arg-type]
    one = FlightSource("grpc://h:1", table, ticket=b"x", max_failures=1, start=False)
    assert one.max_failures == 1
    one.close()
    for bad in (0, -2.5, False, "30"):
        with pytest.raises(ConfigError, match=r"max_backoff=.*must be a number > 0"):
            FlightSource("grpc://h:1", table, ticket=b"x", max_backoff=bad, start=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("descriptor", "want"),
    [
        ("features-v2", (flight.DescriptorType.CMD, b"features-v2", None)),
        (b"\x00cmd", (flight.DescriptorType.CMD, b"\x00cmd", None)),
        (["db", "features"], (flight.DescriptorType.PATH, b"", [b"db", b"features"])),
        (
            flight.FlightDescriptor.for_path("given"),
            (flight.DescriptorType.PATH, b"", [b"given"]),
        ),
    ],
)
def test_what_a_descriptor_asks_the_server_for(
    server: FeatureServer, descriptor: Any, want: tuple[Any, bytes, Any]
) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with FlightSource(
        f"grpc://127.0.0.1:{server.port}", table, descriptor=descriptor, poll_interval=POLL
    ):
        wait_for(lambda: table.stats()["rows"] == 8)
    d = server.descriptors[0]
    assert (d.descriptor_type, d.command or b"", d.path) == want


def test_a_descriptor_of_another_type_is_a_config_error() -> None:
    table = FeatureTable(key="user", timestamp="ts")
    for bad in ([1, 2], ["a", 2], 3):
        with pytest.raises(ConfigError) as info:
            FlightSource("grpc://h:1", table, descriptor=bad, start=False)
        assert str(info.value) == (
            f"descriptor={bad!r}: must be a FlightDescriptor, a command or a path list"
        )


def test_a_slow_flight_info_call_is_cut_by_call_timeout(server: FeatureServer) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    with FlightSource(
        f"grpc://127.0.0.1:{server.port}",
        table,
        descriptor=["hang"],
        call_timeout=0.3,
        max_failures=1,
        poll_interval=30,
    ) as src:
        wait_for(lambda: src.stats()["state"] == "down", timeout=15)
        reason = src.stats()["failures"][0]["reason"]
        server.release.set()
    assert reason.startswith("FlightTimedOutError: "), reason


def test_a_long_lived_stream_cut_by_call_timeout_after_data_ends_normally(
    server: FeatureServer,
) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    url = f"grpc://127.0.0.1:{server.port}"
    with FlightSource(url, table, ticket=b"hang", call_timeout=0.3, poll_interval=30) as src:
        wait_for(lambda: src.stats()["polls"] >= 1)
        s = src.stats()
        assert (s["state"], s["failed_polls"], s["rows_ingested"]) == ("up", 0, 1)
        time.sleep(1.0)  # then the poll interval, not another poll at once
        assert src.stats()["polls"] == 1


@pytest.mark.parametrize(
    ("ticket", "rows", "error"),
    [(b"break", 1, "FlightServerError: "), (b"silent", 0, "FlightTimedOutError: ")],
)
def test_a_broken_or_silent_stream_is_a_failed_poll(
    server: FeatureServer, ticket: bytes, rows: int, error: str
) -> None:
    table = FeatureTable(key="user", timestamp="ts")
    url = f"grpc://127.0.0.1:{server.port}"
    with FlightSource(
        url, table, ticket=ticket, call_timeout=0.3, poll_interval=30, max_failures=1
    ) as src:
        wait_for(lambda: src.stats()["failed_polls"] == 1)
        s = src.stats()
    assert (s["state"], s["rows_ingested"]) == ("down", rows)
    assert s["failures"][0]["reason"].startswith(error), s["failures"]


class Steps(threading.Event):
    """A source's stop event whose waits (the poll intervals) are recorded and let through one at
    a time by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.allowed = 0
        self.cv = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self.cv:
            self.waits.append(timeout)
            self.cv.wait_for(lambda: self.allowed >= len(self.waits) or self.is_set(), 60)
        return self.is_set()

    def let(self) -> None:
        with self.cv:
            self.allowed += 1
            self.cv.notify_all()

    def set(self) -> None:
        super().set()
        with self.cv:
            self.cv.notify_all()


def test_failed_polls_back_off_go_down_once_and_come_back_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mmload.features.flight")
    server = FeatureServer()
    port = server.port
    table = FeatureTable(key="user", timestamp="ts")
    src = FlightSource(
        f"grpc://127.0.0.1:{port}",
        table,
        ticket=b"all",
        name="feed",
        poll_interval=1.0,
        max_backoff=5.0,
        max_failures=4,
        start=False,
    )
    steps = Steps()
    src._stop = steps
    src.start()
    revived: FeatureServer | None = None
    try:
        wait_for(lambda: len(steps.waits) == 1)
        assert src.stats()["state"] == "up" and table.stats()["rows"] == 8
        server.shutdown()
        states = []
        for k in range(2, 6):  # failures 1..4
            steps.let()
            wait_for(lambda k=k: len(steps.waits) == k)
            states.append(src.stats()["state"])
        # 1 s, doubling after each consecutive failure, at most max_backoff
        assert steps.waits == [1.0, 1.0, 2.0, 4.0, 5.0]
        assert states == ["retrying", "retrying", "retrying", "down"]
        assert src.stats()["consecutive_failures"] == 4
        revived = FeatureServer(port)
        steps.let()
        wait_for(lambda: len(steps.waits) == 6)
        assert steps.waits[-1] == 1.0 and src.stats()["state"] == "up"
        assert src.stats()["consecutive_failures"] == 0
    finally:
        src.close()
        server.shutdown()
        if revived is not None:
            revived.release.set()
            revived.shutdown()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 5, msgs
    assert all(
        m.startswith("feature source 'feed' poll failed: FlightUnavailableError: ")
        for m in msgs[:3]
    ), msgs
    assert msgs[3].startswith(
        "feature source 'feed' is down after 4 consecutive failures: FlightUnavailableError: "
    )
    assert msgs[4] == "feature source 'feed' is up again"


def test_metadata_only_messages_are_passed_over() -> None:
    """A Flight stream may carry messages with application metadata and no batch (pyarrow's
    server cannot send one on DoGet, so a client stands in)."""

    class Chunk:
        def __init__(self, data: pa.RecordBatch | None) -> None:
            self.data, self.app_metadata = data, b"m"

    class Reader:
        def __init__(self) -> None:
            self.chunks = [Chunk(None), Chunk(batch(0, 2)), Chunk(None), Chunk(batch(2, 2))]

        def read_chunk(self) -> Chunk:
            if not self.chunks:
                raise StopIteration
            return self.chunks.pop(0)

    class Client:
        def do_get(self, ticket: flight.Ticket, options: Any) -> Reader:
            return Reader()

    table = FeatureTable(key="user", timestamp="ts")
    src = FlightSource("grpc://127.0.0.1:1", table, ticket=b"x", start=False)
    src._stream(Client(), flight.Ticket(b"x"))  # type: ignore[arg-type]
    s = src.stats()
    assert (s["batches"], s["rows_ingested"], s["updates_applied"]) == (2, 4, 2)
    src.close()
