"""``FlightSource``: pulls feature updates from an Arrow Flight endpoint into a FeatureTable."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.flight as flight

from mmload.errors import ConfigError
from mmload.features.sources import Source, first_line, positive_seconds
from mmload.features.table import FeatureTable

__all__ = ["FlightSource"]

log = logging.getLogger(__name__)

TicketLike: TypeAlias = bytes | str | flight.Ticket
TicketSpec: TypeAlias = TicketLike | Callable[[int | None], TicketLike]
DescriptorSpec: TypeAlias = flight.FlightDescriptor | str | bytes | Sequence[str]


def _ticket(t: TicketLike) -> flight.Ticket:
    if isinstance(t, flight.Ticket):
        return t
    if isinstance(t, str):
        return flight.Ticket(t.encode())
    if isinstance(t, bytes):
        return flight.Ticket(t)
    raise ConfigError(f"ticket={t!r}: must be bytes, str or pyarrow.flight.Ticket")


def _descriptor(d: DescriptorSpec) -> flight.FlightDescriptor:
    if isinstance(d, flight.FlightDescriptor):
        return d
    if isinstance(d, (str, bytes)):
        return flight.FlightDescriptor.for_command(d)
    if isinstance(d, Sequence) and all(isinstance(p, str) for p in d):
        return flight.FlightDescriptor.for_path(*d)
    raise ConfigError(f"descriptor={d!r}: must be a FlightDescriptor, a command or a path list")


class FlightSource(Source):
    """Feeds ``table`` from DoGet streams of the Flight server at ``location``.

    Each poll issues one DoGet for ``ticket`` (bytes/str/Ticket, or a callable that gets the
    newest feature ts this source has ingested, None at first, and returns the ticket: an
    incremental cursor), or one per endpoint of ``get_flight_info(descriptor)`` (a
    FlightDescriptor, a command str/bytes, or a path list), on this source's client. Every record
    batch is applied as one update as it arrives, so a stream may be finite (the next poll comes
    ``poll_interval`` later) or long-lived; a call is cut after ``call_timeout`` s, which ends a
    long-lived stream normally when it delivered data and is a failure when it did not.

    A batch the table rejects is skipped, counted and listed. A failed poll (server gone,
    timeout, transport error) is counted and listed; the client is rebuilt and the poll retried
    with exponential backoff up to ``max_backoff`` s; after ``max_failures`` consecutive failures
    the source reports state "down" (logged once) and keeps retrying; a success makes it "up".
    """

    kind = "flight"

    def __init__(
        self,
        location: str | flight.Location,
        table: FeatureTable,
        *,
        ticket: TicketSpec | None = None,
        descriptor: DescriptorSpec | None = None,
        poll_interval: float = 1.0,
        max_failures: int = 3,
        call_timeout: float = 30.0,
        max_backoff: float = 30.0,
        name: str | None = None,
        start: bool = True,
    ) -> None:
        if (ticket is None) == (descriptor is None):
            raise ConfigError(
                f"ticket={ticket!r}, descriptor={descriptor!r}: give exactly one of them"
            )
        if ticket is not None and not callable(ticket):
            _ticket(ticket)
        self._descriptor = _descriptor(descriptor) if descriptor is not None else None
        self._ticket_spec = ticket
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
            raise ConfigError(f"max_failures={max_failures!r}: must be an int >= 1")
        self.location = location
        self.max_failures = max_failures
        self._options = flight.FlightCallOptions(
            timeout=positive_seconds("call_timeout", call_timeout)
        )
        self.max_backoff = positive_seconds("max_backoff", max_backoff)
        self._client: flight.FlightClient | None = None
        self._reader: flight.FlightStreamReader | None = None
        self._consecutive = 0
        self._batches = 0
        self._received = 0
        self._polled_ok = False
        super().__init__(
            table, name=name or str(location), poll_interval=poll_interval, start=start
        )

    def _tickets(self, client: flight.FlightClient) -> list[flight.Ticket]:
        if self._descriptor is not None:
            info = client.get_flight_info(self._descriptor, self._options)
            return [ep.ticket for ep in info.endpoints]
        spec = self._ticket_spec
        if callable(spec) and not isinstance(spec, (bytes, str, flight.Ticket)):
            return [_ticket(spec(self._log.snapshot()["newest_feature_ts"]))]
        assert spec is not None
        return [_ticket(spec)]

    def _stream(self, client: flight.FlightClient, ticket: flight.Ticket) -> None:
        reader = client.do_get(ticket, self._options)
        self._reader = reader
        try:
            while not self._stop.is_set():
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return
                if chunk.data is None:  # a metadata-only message
                    continue
                self._received += 1
                self._batches += 1
                self._apply(chunk.data, f"batch {self._batches}")
        finally:
            self._reader = None

    def _poll(self) -> bool:
        self._received = 0
        try:
            if self._client is None:
                self._client = flight.FlightClient(self.location)
            for t in self._tickets(self._client):
                self._stream(self._client, t)
        except (flight.FlightError, pa.ArrowException, OSError) as e:
            if self._stop.is_set():
                return False  # cancelled by close()
            if isinstance(e, flight.FlightTimedOutError) and self._received:
                self._ok()  # a long-lived stream reached call_timeout after delivering data
                return False
            self._failed(e)
            return False
        self._ok()
        return False

    def _ok(self) -> None:
        if self._consecutive >= self.max_failures:
            log.info("feature source %r is up again", self.name)
        self._consecutive = 0
        self._polled_ok = True

    def _failed(self, e: BaseException) -> None:
        self._consecutive += 1
        reason = first_line(e)
        self._failure(reason)
        if self._client is not None:
            # gRPC channels back off reconnecting for seconds: start afresh next poll
            self._client.close()
            self._client = None
        if self._consecutive == self.max_failures:
            log.error(
                "feature source %r is down after %d consecutive failures: %s",
                self.name,
                self._consecutive,
                reason,
            )
        else:
            log.warning("feature source %r poll failed: %s", self.name, reason)

    def _interval(self) -> float:
        if self._consecutive == 0:
            return self.poll_interval
        return min(self.poll_interval * 2.0 ** (self._consecutive - 1), self.max_backoff)

    def _interrupt(self) -> None:
        reader = self._reader
        if reader is not None:
            reader.cancel()

    def _cleanup(self) -> None:
        if self._client is not None and not self._thread.is_alive():
            self._client.close()
            self._client = None

    def _state(self) -> str:
        if self._consecutive >= self.max_failures:
            return "down"
        if self._consecutive > 0:
            return "retrying"
        return "up" if self._polled_ok else "starting"

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "location": str(self.location),
            "batches": self._batches,
            "consecutive_failures": self._consecutive,
        }
