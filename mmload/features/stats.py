"""Counters of applied and failed feature updates, shared by a table and its sources."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["UpdateLog"]

LISTED = 100  # failure reasons kept (the newest); the count goes on beyond


class UpdateLog:
    """Thread-safe: rows ingested, updates applied and failed, the newest feature ts, and the
    last ``LISTED`` failures as ``{"origin", "reason", "time"}`` (time: Unix seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows_ingested = 0
        self.updates_applied = 0
        self.update_errors = 0
        self.newest_feature_ts: int | None = None
        self._errors: deque[dict[str, Any]] = deque(maxlen=LISTED)

    def applied(self, rows: int, newest_ts: int | None) -> None:
        with self._lock:
            self.rows_ingested += rows
            self.updates_applied += 1
            if newest_ts is not None and (
                self.newest_feature_ts is None or newest_ts > self.newest_feature_ts
            ):
                self.newest_feature_ts = newest_ts

    def failed(self, origin: str, reason: str) -> None:
        with self._lock:
            self.update_errors += 1
            self._errors.append({"origin": origin, "reason": reason, "time": time.time()})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows_ingested": self.rows_ingested,
                "updates_applied": self.updates_applied,
                "update_errors": self.update_errors,
                "errors": list(self._errors),
                "newest_feature_ts": self.newest_feature_ts,
            }
