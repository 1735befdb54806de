"""The base of the live feature sources: one background thread that feeds a FeatureTable.

The thread repeats a bounded unit of work (``_poll``: a few files, or one Flight stream) and then
waits ``_interval()`` seconds or until ``close()`` sets the stop event. A bad update is counted,
listed in ``stats()`` and logged, and the thread goes on. An unexpected exception (a bug) ends the
thread: it is logged with its traceback, shown by ``stats()`` (state "failed") and re-raised by
``close()`` and ``check()`` as a JoinError; a source never dies silently. (Direct
``FeatureTable.update`` calls are the third source; they need no thread.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

from mmload.errors import ConfigError, JoinError
from mmload.features.stats import LISTED, UpdateLog
from mmload.features.table import FeatureTable

__all__ = ["Source"]

log = logging.getLogger(__name__)


def positive_seconds(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{field}={value!r}: must be a number > 0 (seconds)")
    return float(value)


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (Flight errors carry long multi-line debug contexts)."""
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class Source:
    """A daemon thread that feeds ``table``; a context manager; ``close()`` is idempotent."""

    kind = "source"

    def __init__(
        self, table: FeatureTable, *, name: str, poll_interval: float, start: bool = True
    ) -> None:
        if not isinstance(table, FeatureTable):
            raise ConfigError(f"table={table!r}: must be a FeatureTable")
        self.table = table
        self.name = name
        self.poll_interval = positive_seconds("poll_interval", poll_interval)
        self._log = UpdateLog()
        self._failures: deque[dict[str, Any]] = deque(maxlen=LISTED)
        self._failure_count = 0
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._polls = 0
        self._thread = threading.Thread(
            target=self._main, name=f"mmload-{self.kind}-{name}", daemon=True
        )
        table._attach(self)
        if start:
            self.start()

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (done by the constructor unless ``start=False``)."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                more = self._poll()
                self._polls += 1
                if not more:
                    self._stop.wait(self._interval())
        except BaseException as e:  # the thread must not die silently: keep it for close()
            self._fatal = e
            log.exception("feature source %r stopped by an unexpected error", self.name)

    def _poll(self) -> bool:
        """One bounded unit of work; True when more is waiting (poll again without a pause)."""
        raise NotImplementedError

    def _interval(self) -> float:
        return self.poll_interval

    def _apply(self, data: Any, origin: str) -> bool:
        """Feed ``data`` to the table; a bad update is counted, listed, logged and skipped."""
        try:
            n, newest = self.table._update(data, f"{self.name}: {origin}")
        except JoinError as e:
            self._log.failed(origin, str(e))
            log.warning("feature source %r skipped %s: %s", self.name, origin, e)
            return False
        self._log.applied(n, newest)
        return True

    def _skip(self, origin: str, reason: str) -> None:
        """Count and list an update that could not even be read (a corrupt file)."""
        self._log.failed(origin, reason)
        log.warning("feature source %r skipped %s: %s", self.name, origin, reason)

    def _failure(self, reason: str) -> None:
        """Count and list a failed poll (the source is unreachable, not a bad update)."""
        self._failure_count += 1
        self._failures.append({"reason": reason, "time": time.time()})

    # -- lifecycle ----------------------------------------------------------------------------

    def _interrupt(self) -> None:
        """Wake the thread out of a blocking call (called by ``close``)."""

    def _cleanup(self) -> None:
        """Release resources once the thread has stopped (called by ``close``)."""

    def check(self) -> None:
        """Raise JoinError if the thread was stopped by an unexpected error."""
        if self._fatal is not None:
            raise JoinError(
                f"feature source {self.name!r} failed: {first_line(self._fatal)}"
            ) from self._fatal

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (waiting up to ``timeout`` s); re-raise its fatal error, once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._interrupt()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("feature source %r did not stop within %.1f s", self.name, timeout)
        self._cleanup()
        self.check()

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except JoinError as e:  # do not mask the exception that ended the with-block
            log.error("feature source %r: %s (while handling %r)", self.name, e, exc)

    # -- stats --------------------------------------------------------------------------------

    def _state(self) -> str:
        return "running"

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def stats(self) -> dict[str, Any]:
        """State ("running"/"up"/"down"/... , "failed", "closed"), updates applied and failed
        (with reasons), failed polls, and feature lag (newest sample ts seen by the table's joins
        - newest feature ts from this source)."""
        logged = self._log.snapshot()
        if self._fatal is not None:
            state = "failed"
        elif self._closed:
            state = "closed"
        else:
            state = self._state()
        sample = self.table.newest_sample_ts
        newest = logged["newest_feature_ts"]
        return {
            "name": self.name,
            "kind": self.kind,
            "state": state,
            "alive": self._thread.is_alive(),
            "polls": self._polls,
            **logged,
            "failed_polls": self._failure_count,
            "failures": list(self._failures),
            "feature_lag": None if sample is None or newest is None else sample - newest,
            "last_error": None if self._fatal is None else first_line(self._fatal),
            **self._extra_stats(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, state={self.stats()['state']!r})"
