"""Run statistics and the bad-sample budget, shared by the loader's threads."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from mmload.errors import BadEntry, DecodeError, MmloadError, ShardError

PER_BATCH = 64  # per-batch values kept in stats()["per_batch"]

__all__ = ["EpochStats", "Stats"]

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
        self.batches: dict[str, deque[int]] = {}  # per-batch values of the latest batches

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

    def per_batch(self, name: str, value: int) -> None:
        """Record ``value`` for the batch just made under ``name`` (the last ``PER_BATCH``
        batches are kept; ``snapshot()["per_batch"]``)."""
        with self._lock:
            q = self.batches.setdefault(name, deque(maxlen=PER_BATCH))
            q.append(value)

    def peak(self, name: str, value: float) -> None:
        """Keep the largest ``value`` seen under counter ``name`` (e.g. another process's
        cache peak)."""
        with self._lock:
            self.counters[name] = max(self.counters.get(name, 0), value)  # type: ignore[assignment]

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

    def record_bad(self, entries: list[BadEntry]) -> None:
        """Count and list bad samples (no budget check: see :meth:`add_bad`)."""
        with self._lock:
            self.counters["bad_samples"] += len(entries)
            room = _LISTED - len(self.bad)
            self.bad.extend(entries[: max(room, 0)])

    def add_bad(self, entries: Iterable[BadEntry], errors: Iterable[MmloadError] = ()) -> None:
        """Count bad samples; raise the last error once the budget is exhausted."""
        entries = list(entries)
        if not entries:
            return
        self.record_bad(entries)
        with self._lock:
            self._epoch_bad += len(entries)
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
                "per_batch": {k: list(v) for k, v in self.batches.items()},
                "bottleneck": bottleneck(self.seconds.get("wait", 0.0), self.waits, elapsed),
            }


class EpochStats(Stats):
    """One epoch run's view of a loader's :class:`Stats`: its own bad-sample count against its
    own budget, everything else recorded in ``parent``.

    A run prepared ahead of its epoch (while the previous one is still being consumed) starts
    ``held``: what it records is kept until :meth:`adopt` (its epoch begins), so ``stats()``
    never shows a bad sample, a replacement or a timing of an epoch nobody has started, and its
    count never mixes with the running epoch's."""

    def __init__(self, parent: Stats, budget: int, *, held: bool = False) -> None:
        super().__init__(budget)
        self.parent = parent
        self._held: list[tuple[str, tuple[Any, ...]]] | None = [] if held else None

    def _forward(self, method: str, *args: Any) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append((method, args))
                return
        getattr(self.parent, method)(*args)

    def adopt(self) -> None:
        """The epoch begins: what was held goes to the parent, in order; then pass-through."""
        with self._lock:
            held, self._held = self._held, None
            for method, args in held or []:
                getattr(self.parent, method)(*args)

    def add(self, name: str, value: int = 1) -> None:
        self._forward("add", name, value)

    def time(self, name: str, seconds: float) -> None:
        self._forward("time", name, seconds)

    def peak(self, name: str, value: float) -> None:
        self._forward("peak", name, value)

    def per_batch(self, name: str, value: int) -> None:
        self._forward("per_batch", name, value)

    def wait_on(self, stage: str, seconds: float) -> None:
        self._forward("wait_on", stage, seconds)

    def add_listed(self, entries: Iterable[BadEntry]) -> None:
        self._forward("add_listed", list(entries))

    def record_bad(self, entries: list[BadEntry]) -> None:
        self._forward("record_bad", entries)

    def snapshot(self) -> dict[str, Any]:
        return self.parent.snapshot()


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
