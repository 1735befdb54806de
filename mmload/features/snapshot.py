"""What a join reads: the immutable :class:`Snapshot` of a table, and its settings as ints.

A writer builds a new Snapshot and publishes it with one attribute assignment; a reader takes one
reference and uses nothing else, so it sees a whole update or none of it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import numpy as np

from mmload.errors import ConfigError
from mmload.features.backend import Array
from mmload.features.keys import KeyCodec
from mmload.features.lists import ListStore
from mmload.features.runs import Run
from mmload.features.schema import Layout

__all__ = ["Duration", "Snapshot", "check_duration", "duration", "fail"]

Duration = int | datetime.timedelta | np.timedelta64 | None


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What one join reads: runs (oldest first), layout, key codec, defaults (device arrays)."""

    runs: tuple[Run, ...]
    version: int
    rows: int
    newest_ts: int | None
    layout: Layout | None
    codec: KeyCodec | None
    defaults_f: Array | None
    defaults_i: Array | None
    ttl: int | None
    retention: int | None
    lists: ListStore = field(default_factory=ListStore)  # the rows of variable-length list columns


def fail(field: str, value: object, why: str) -> ConfigError:
    """A ConfigError naming the field and the value."""
    return ConfigError(f"{field}={value!r}: {why}")


def check_duration(field: str, value: object) -> None:
    """Validate a ttl/retention setting before the timestamp unit is known."""
    if value is None or isinstance(value, (datetime.timedelta, np.timedelta64)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise fail(field, value, "must be None, an int >= 0 in timestamp units, or a timedelta")


def duration(field: str, value: Duration, unit: str | None) -> int | None:
    """A ttl/retention as int64 ticks of the table's timestamp unit (None: unlimited)."""
    if value is None:
        return None
    if isinstance(value, (datetime.timedelta, np.timedelta64)):
        if unit is None:
            raise fail(field, value, "a timedelta needs an Arrow timestamp column; give an int")
        ticks = int(np.timedelta64(value).astype(f"timedelta64[{unit}]").astype(np.int64))
        if ticks < 0:
            raise fail(field, value, "must be >= 0")
        return ticks
    return int(value)
