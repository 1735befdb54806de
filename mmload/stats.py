"""Run statistics and the bad-sample budget, shared by the loader's threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from mmload.errors import BadEntry, DecodeError, MmloadError, ShardError

__all__ = ["Stats"]

_LISTED = 1000  # bad entries kept in full; the count goes on beyond


class Stats:
    """Counters, timings and the list of bad samples; thread-safe.

    ``add_bad`` raises once more than ``budget`` bad samples have been seen in the current epoch
    (``start_epoch`` sets the budget and resets the epoch's count; totals go on).
    """

    def __init__(self, budget: int = 0) -> None:
        self.budget = budget
        self._epoch_bad = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.counters: dict[str, int] = {
            "batches": 0,
            "samples": 0,
            "samples_padded": 0,
            "samples_dropped": 0,
            "samples_replaced": 0,
            "bad_samples": 0,
        }
        self.seconds: dict[str, float] = {"read": 0.0, "decode": 0.0, "wait": 0.0}
        # Per stage, how long its consumer waited for its items (``wait_on``).
        self.waits: dict[str, float] = {}
        self.bad: list[BadEntry] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def start_epoch(self, budget: int) -> None:
        with self._lock:
            self.budget = budget
            self._epoch_bad = 0

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + value

    def time(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wait_on(self, stage: str, seconds: float) -> None:
        """The consumer of ``stage`` waited ``seconds`` for its next item."""
        with self._lock:
            self.waits[stage] = self.waits.get(stage, 0.0) + seconds

    def add_listed(self, entries: Iterable[BadEntry]) -> None:
        """Record bad entries found before the epoch (indexing); they were checked already."""
        entries = list(entries)
        with self._lock:
            self.counters["bad_samples"] += len(entries)
            self.bad.extend(entries[: max(_LISTED - len(self.bad), 0)])

    def add_bad(self, entries: Iterable[BadEntry], errors: Iterable[MmloadError] = ()) -> None:
        """Count bad samples; raise the last error once the budget is exhausted."""
        entries = list(entries)
        if not entries:
            return
        with self._lock:
            self.counters["bad_samples"] += len(entries)
            self._epoch_bad += len(entries)
            room = _LISTED - len(self.bad)
            self.bad.extend(entries[: max(room, 0)])
            total = self._epoch_bad
        if total > self.budget:
            last = entries[-1]
            cls = DecodeError if any(isinstance(e, DecodeError) for e in errors) else ShardError
            raise cls(
                f"bad-sample budget exceeded: {total} bad samples this epoch > {self.budget} "
                "allowed (this process's share of max_bad_samples); "
                f"last: {last.reason}",
                shard=last.shard,
                key=last.key,
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.perf_counter() - self._t0
            return {
                **self.counters,
                "bad": [b.as_dict() for b in self.bad],
                "seconds": {**self.seconds, "elapsed": elapsed},
                "samples_per_second": self.counters["samples"] / elapsed if elapsed > 0 else 0.0,
                "stage_wait": dict(self.waits),
                "bottleneck": bottleneck(self.seconds.get("wait", 0.0), self.waits, elapsed),
            }


# Stages from upstream to downstream (``workers``: batches from worker processes).
STAGE_ORDER = ("workers", "read", "decode", "join", "copy")


def bottleneck(consumer_wait: float, waits: dict[str, float], elapsed: float) -> str | None:
    """The stage that starves the consumer: None while the consumer waited under 1% of the
    time; else the most upstream stage whose own consumer waited at least half as long as the
    trainer did (a slow stage makes every stage after it wait too, and nothing before it)."""
    if elapsed <= 0 or consumer_wait < 0.01 * elapsed:
        return None
    for name in STAGE_ORDER:
        if waits.get(name, 0.0) >= 0.5 * consumer_wait:
            return name
    return max(waits, key=lambda k: waits[k]) if waits else None
