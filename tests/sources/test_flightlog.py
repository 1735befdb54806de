"""The Arrow Flight log protocol (``mmload.sources.flightlog``) against real Flight servers on
loopback: URLs, lengths and row ranges, the reference server's checks, and what the client does
when a service is unavailable, slow, or not append-only."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import mmload.sources.flightlog as flightlog
from mmload.errors import ConfigError, ShardError
from mmload.sources.flightlog import (
    FlightLogClient,
    FlightLogServer,
    is_flight_url,
    split_flight_url,
)


def rows(start: int, n: int) -> pa.Table:
    return pa.table({"x": pa.array(range(start, start + n), pa.int64())})


@pytest.fixture
def server() -> Iterator[FlightLogServer]:
    srv = FlightLogServer().serve_in_thread()
    yield srv
    srv.shutdown()


def url(srv: FlightLogServer, name: str = "events") -> str:
    return f"grpc://127.0.0.1:{srv.port}/{name}"


def test_flight_urls() -> None:
    for good in ("grpc://h:1/log", "grpc+tcp://h:1/log", "grpc+tls://h:1/log"):
        assert is_flight_url(good)
    for other in ("http://h:1/log", "s3://b/log", "grpc:/h/log", "/data/grpc://x", "GRPC://h/x"):
        assert not is_flight_url(other)
    assert split_flight_url("grpc://h:1/log") == ("grpc://h:1", "log")
    assert split_flight_url("grpc+tls://example.com:443/clicks.v2") == (
        "grpc+tls://example.com:443",
        "clicks.v2",
    )
    bad_urls = (
        "grpc://h:1",
        "grpc://h:1/",
        "grpc:///log",
        "grpc://h:1/a/b",
        "grpc://h:1/a:b",
        "grpc://h:1/a://b",  # a second "://" is in the log name, not a scheme
        "grpc://h://x/log",
    )
    for bad in bad_urls:
        with pytest.raises(ConfigError) as info:
            split_flight_url(bad)
        assert str(info.value) == (f"Flight log URL {bad!r}: expected grpc://host:port/<log name>")


def test_the_server_serves_committed_rows_by_offset(server: FlightLogServer) -> None:
    assert server.append("events", rows(0, 4)) == 4
    assert server.append("events", rows(4, 3).slice(0, 3)) == 7
    assert server.append("other", rows(100, 2)) == 2
    chunked = pa.concat_tables([rows(7, 2), rows(9, 3)])  # two chunks: one log, 12 rows
    assert server.append("events", chunked) == 12
    client = FlightLogClient(url(server), timeout=10)
    assert (client.location, client.name) == (f"grpc://127.0.0.1:{server.port}", "events")
    assert client.length() == 12
    assert client.read(2, 9).column("x").to_pylist() == list(range(2, 9))
    assert client.read(2, 9).equals(client.read(2, 9))  # the same rows every time
    assert client.read(0, 12).column("x").to_pylist() == list(range(12))
    assert client.read(12, 12).num_rows == 0
    assert client.read(0, 0).num_rows == 0
    assert FlightLogClient(url(server, "other")).read(0, 2).column("x").to_pylist() == [100, 101]
    # a log nobody wrote yet is empty, not an error
    later = FlightLogClient(url(server, "later"))
    later.close()  # closing a client that never connected is a no-op
    assert later.length() == 0 and later.read(0, 0).num_rows == 0
    with pytest.raises(ShardError, match="rows 0:1 outside log 'later' of 0"):
        later.read(0, 1)
    info = flight.connect(f"grpc://127.0.0.1:{server.port}").get_flight_info(
        flight.FlightDescriptor.for_path("events")
    )
    assert info.total_records == 12 and info.schema.equals(rows(0, 1).schema)
    assert [e.ticket.ticket for e in info.endpoints] == [b"events:0:12"]
    assert info.total_bytes == -1  # unknown
    # the reference server names a log by its descriptor's path, joined with "/"
    server.append("a/b", rows(0, 2))
    raw = flight.connect(f"grpc://127.0.0.1:{server.port}")
    assert raw.get_flight_info(flight.FlightDescriptor.for_path("a", "b")).total_records == 2
    client.close()
    client.close()  # idempotent
    assert client.length() == 12  # reconnects after a close


def test_the_server_refuses_bad_requests(server: FlightLogServer) -> None:
    server.append("events", rows(0, 5))
    with pytest.raises(ConfigError, match="log 'events': schema x: string differs"):
        server.append("events", pa.table({"x": ["a"]}))
    assert server.append("events", rows(5, 1)) == 6  # the log is unchanged by the refusal
    client = FlightLogClient(url(server))
    for start, end in ((4, 7), (3, 2), (-1, 2)):
        with pytest.raises(ShardError) as info:
            client.read(start, end)
        msg = str(info.value)
        assert f"Flight log rows {start}:{end}" in msg and url(server) in msg
        assert f"rows {start}:{end} outside log 'events' of 6" in msg
    raw = flight.connect(f"grpc://127.0.0.1:{server.port}")
    for ticket in (b"events:1", b"events:a:2", b"nocolons"):
        with pytest.raises(flight.FlightServerError, match="bad ticket"):
            raw.do_get(flight.Ticket(ticket)).read_all()
    # a log name may hold a colon in a raw ticket: the offsets are the last two fields
    server.append("a:b", rows(0, 3))
    assert raw.do_get(flight.Ticket(b"a:b:1:3")).read_all().column("x").to_pylist() == [1, 2]


class Flaky(FlightLogServer):
    """Answers ``get_flight_info`` with the errors queued in ``errors`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Exception] = []
        self.calls = 0

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return super().get_flight_info(context, descriptor)


def test_an_unavailable_service_is_retried_then_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    class Clock:
        @staticmethod
        def sleep(s: float) -> None:
            slept.append(s)

    monkeypatch.setattr(flightlog, "time", Clock)
    srv = Flaky().serve_in_thread()
    try:
        srv.append("events", rows(0, 3))
        client = FlightLogClient(url(srv))
        # restarting: unavailable twice, then it answers
        srv.errors = [flight.FlightUnavailableError("restarting")] * 2
        assert client.length() == 3
        assert (srv.calls, slept) == (3, [0.1, 0.3])
        # unavailable on every try: three retries (0.1, 0.3, 1.0 s apart), then the error
        srv.calls, slept[:] = 0, []
        srv.errors = [flight.FlightUnavailableError("down for good")] * 4
        with pytest.raises(ShardError) as info:
            client.length()
        assert (srv.calls, slept) == (4, [0.1, 0.3, 1.0])
        assert str(info.value).startswith("Flight log unreachable: ")
        assert "down for good" in str(info.value) and info.value.shard == url(srv)
        assert client.length() == 3  # and usable again once the service is back
        # another error is not retried
        srv.calls, slept[:] = 0, []
        srv.errors = [flight.FlightServerError("broken")]
        with pytest.raises(ShardError, match=r"Flight log unreachable: .*broken"):
            client.length()
        assert (srv.calls, slept) == (1, [])
        assert client.length() == 3
    finally:
        srv.shutdown()


class Odd(FlightLogServer):
    """A service that is not a Flight log: a negative length, or fewer rows than asked for."""

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        info = super().get_flight_info(context, descriptor)
        return flight.FlightInfo(info.schema, descriptor, [], -5, -1)

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        name, a, b = ticket.ticket.decode().rsplit(":", 2)
        return super().do_get(context, flight.Ticket(f"{name}:{a}:{int(b) - 1}".encode()))


def test_a_service_that_is_not_an_append_only_log_is_a_clear_error() -> None:
    srv = Odd().serve_in_thread()
    try:
        srv.append("events", rows(0, 10))
        client = FlightLogClient(url(srv))
        with pytest.raises(ShardError) as info:
            client.length()
        assert str(info.value).startswith("Flight log reports -5 rows")
        assert info.value.shard == url(srv)
        with pytest.raises(ShardError) as info:
            client.read(2, 6)
        assert str(info.value).startswith(
            "Flight log returned 3 rows for 2:6 (not an append-only log?)"
        )
        assert info.value.shard == url(srv)
    finally:
        srv.shutdown()


class Slow(FlightLogServer):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        self.release.wait(30)
        return super().get_flight_info(context, descriptor)

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        self.release.wait(30)
        return super().do_get(context, ticket)


def test_a_call_that_outlasts_the_timeout_is_a_clear_error() -> None:
    srv = Slow().serve_in_thread()
    try:
        srv.append("events", rows(0, 4))
        client = FlightLogClient(url(srv), timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(ShardError, match="Flight log rows 0:4: "):
            client.read(0, 4)
        with pytest.raises(ShardError, match="Flight log unreachable: "):
            client.length()
        assert time.monotonic() - t0 < 25  # the deadline ended it, not the server's release
    finally:
        srv.release.set()
        srv.shutdown()


def test_serve_in_thread_runs_a_named_daemon_thread() -> None:
    srv = FlightLogServer("grpc://127.0.0.1:0")
    assert srv.serve_in_thread() is srv
    try:
        threads = [t for t in threading.enumerate() if t.name == "mmload-flight-log"]
        assert threads and all(t.daemon for t in threads)
        srv.append("events", rows(0, 1))
        assert FlightLogClient(url(srv)).length() == 1
    finally:
        srv.shutdown()


def test_the_server_listens_where_it_is_told_and_takes_flight_server_options() -> None:
    import socket

    calls: list[str] = []

    class Recorder(flight.ServerMiddlewareFactory):
        def start_call(self, info: Any, headers: Any) -> None:
            calls.append(str(info.method))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = FlightLogServer(f"grpc://127.0.0.1:{port}", middleware={"rec": Recorder()})
    srv.serve_in_thread()
    try:
        assert srv.port == port
        srv.append("events", rows(0, 2))
        assert FlightLogClient(f"grpc://127.0.0.1:{port}/events").length() == 2
        assert calls and "GET_FLIGHT_INFO" in calls[-1]
    finally:
        srv.shutdown()


def test_calls_have_a_deadline_of_thirty_seconds_by_default(
    flight_call_options: list[dict[str, Any]],
) -> None:
    FlightLogClient("grpc://h:1/log")
    FlightLogClient("grpc://h:1/log", timeout=2.5)
    assert flight_call_options == [{"timeout": 30.0}, {"timeout": 2.5}]
