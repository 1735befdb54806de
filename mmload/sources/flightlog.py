"""An Arrow Flight *log*: an append-only table served over Flight, read by row offset, so that a
window of a stream can be read again, by every rank and after a restart.

The protocol (what a producer's Flight service implements; :class:`FlightLogServer` is a
complete one, for tests and small producers):

- ``get_flight_info(FlightDescriptor.for_path(name))``: ``total_records`` is the number of rows
  committed to log ``name`` so far (it only grows);
- ``do_get(Ticket(b"<name>:<start>:<end>"))``: rows ``start`` to ``end`` (exclusive) of the
  log, the same rows every time they are asked for.

``StreamLoader("grpc://host:port/name", ledger=...)`` reads such a log: rank 0 cuts windows as
row ranges ``[start, end)`` (recorded in the ledger, like the windows of a growing directory),
and each rank fetches a window's rows into a local Arrow IPC file that an ordinary ``Loader``
reads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from mmload.errors import ConfigError, ShardError

__all__ = ["FlightLogClient", "FlightLogServer", "is_flight_url", "split_flight_url"]

_SCHEMES = ("grpc://", "grpc+tcp://", "grpc+tls://")
_RETRIES = (0.1, 0.3, 1.0)  # seconds before each retry of an unavailable service


def is_flight_url(url: str) -> bool:
    return url.startswith(_SCHEMES)


def split_flight_url(url: str) -> tuple[str, str]:
    """``grpc://host:port/name`` -> (``grpc://host:port``, ``name``)."""
    scheme, rest = url.split("://", 1)
    host, _, name = rest.partition("/")
    if not host or not name or "/" in name or ":" in name:
        raise ConfigError(f"Flight log URL {url!r}: expected grpc://host:port/<log name>")
    return f"{scheme}://{host}", name


class FlightLogClient:
    """Reads log ``name`` of a Flight log service (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self.location, self.name = split_flight_url(url)
        self._options = flight.FlightCallOptions(timeout=timeout)
        self._client: flight.FlightClient | None = None

    def _conn(self) -> flight.FlightClient:
        if self._client is None:
            self._client = flight.FlightClient(self.location)
        return self._client

    def _call(self, what: str, fn: Any) -> Any:
        """``fn(client)``, retried with a fresh connection when the service is unavailable
        (a restarting service, or gRPC's back-off on an address that failed before)."""
        for delay in _RETRIES:
            try:
                return fn(self._conn())
            except flight.FlightUnavailableError:
                self.close()
                time.sleep(delay)
            except (flight.FlightError, OSError) as e:
                self.close()
                raise ShardError(f"{what}: {e}", shard=self.url) from None
        try:
            return fn(self._conn())
        except (flight.FlightError, OSError) as e:
            self.close()
            raise ShardError(f"{what}: {e}", shard=self.url) from None

    def length(self) -> int:
        """Rows committed to the log so far."""
        desc = flight.FlightDescriptor.for_path(self.name)
        info = self._call(
            "Flight log unreachable", lambda c: c.get_flight_info(desc, self._options)
        )
        n = int(info.total_records)
        if n < 0:
            raise ShardError(f"Flight log reports {n} rows", shard=self.url)
        return n

    def read(self, start: int, end: int) -> pa.Table:
        """Rows ``start`` to ``end`` (exclusive); a ShardError if the service returns another
        number of rows (the log is not append-only, or was cut)."""
        ticket = flight.Ticket(f"{self.name}:{start}:{end}".encode())
        table = self._call(
            f"Flight log rows {start}:{end}",
            lambda c: c.do_get(ticket, self._options).read_all(),
        )
        if table.num_rows != end - start:
            raise ShardError(
                f"Flight log returned {table.num_rows} rows for {start}:{end} (not an append-only "
                "log?)",
                shard=self.url,
            )
        return table

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class FlightLogServer(flight.FlightServerBase):
    """A Flight log service holding its logs in memory: ``append(name, table)`` commits rows.

    ``FlightLogServer("grpc://127.0.0.1:0")`` picks a free port (``.port``); ``serve_in_thread``
    starts it; ``shutdown()`` stops it."""

    def __init__(self, location: str = "grpc://127.0.0.1:0", **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
        self._logs: dict[str, list[pa.RecordBatch]] = {}
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def append(self, name: str, table: pa.Table) -> int:
        """Commit ``table``'s rows to log ``name``; returns the log's length after."""
        with self._lock:
            log = self._logs.setdefault(name, [])
            if log and not table.schema.equals(log[0].schema):
                raise ConfigError(f"log {name!r}: schema {table.schema} differs from the log's")
            log.extend(table.combine_chunks().to_batches())
            self._rows[name] = self._rows.get(name, 0) + table.num_rows
            return self._rows[name]

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> Any:
        name = b"/".join(descriptor.path).decode()
        with self._lock:
            batches = list(self._logs.get(name, []))
            n = self._rows.get(name, 0)
        schema = batches[0].schema if batches else pa.schema([])
        endpoint = flight.FlightEndpoint(f"{name}:0:{n}".encode(), [])
        return flight.FlightInfo(schema, descriptor, [endpoint], n, -1)

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        try:
            name, a, b = ticket.ticket.decode().rsplit(":", 2)
            start, end = int(a), int(b)
        except ValueError:
            raise flight.FlightServerError(f"bad ticket {ticket.ticket!r}") from None
        with self._lock:
            batches = list(self._logs.get(name, []))
            n = self._rows.get(name, 0)
        if not 0 <= start <= end <= n:
            raise flight.FlightServerError(f"rows {start}:{end} outside log {name!r} of {n}")
        table = pa.Table.from_batches(batches) if batches else pa.table({})
        return flight.RecordBatchStream(table.slice(start, end - start))

    def serve_in_thread(self) -> FlightLogServer:
        self._thread = threading.Thread(target=self.serve, name="mmload-flight-log", daemon=True)
        self._thread.start()
        return self
