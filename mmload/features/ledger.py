"""``LedgerSource``: feature part files applied in the order of a write-once ledger, so that
every rank and every restart builds the same sequence of table versions.

A ``DirectorySource`` applies files as each process happens to see them: two ranks, or a run and
its restart, can join a batch against different feature states. Here rank 0 cuts the committed
feature files into *feature windows* in a ledger (:mod:`mmload.sources.growing`, the same
mechanism as the sample windows) and every process applies the windows in ledger order, one
update per window. **Version ``v``** of the table is its state after the first ``v`` feature
windows: the same rows on every rank, in every run. The source keeps the snapshot of each
version still needed (``pin``), so a batch can be joined against version ``v`` however far the
table has moved on (:meth:`at`), and records the **watermark** of each version: the newest
feature ts of its files, less ``lateness`` (a producer that emits features in time order has
nothing older to send). The table must be fed by this source alone.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mmload.errors import ConfigError, JoinError
from mmload.features.directory import read_part_file
from mmload.features.snapshot import Snapshot
from mmload.features.sources import Source, first_line
from mmload.features.table import FeatureTable
from mmload.sources.growing import Ledger, Sequencer

__all__ = ["LedgerSource"]

_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc", ".jsonl", ".ndjson")


class LedgerSource(Source):
    """Feeds ``table`` from the feature part files of ``path``, in ledger order (see above).

    ``ledger``: the feature ledger (default ``<path>/_mmload/ledger``; every rank must see the
    same). ``sequencer``: whether this process cuts feature windows (default: rank 0, from
    torchrun's ``RANK``). ``lateness``: how far (in ts units) features may arrive behind the
    newest one seen. ``keep``: snapshots kept besides the pinned ones."""

    kind = "ledger"

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: FeatureTable,
        *,
        ledger: str | os.PathLike[str] | None = None,
        sequencer: bool | None = None,
        lateness: int = 0,
        keep: int = 4,
        poll_interval: float = 0.5,
        name: str | None = None,
        start: bool = True,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise ConfigError(f"path={self.path!r}: not a directory")
        if isinstance(lateness, bool) or not isinstance(lateness, int) or lateness < 0:
            raise ConfigError(f"lateness={lateness!r}: must be an int >= 0 (ts units)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep={keep!r}: must be an int >= 1")
        where = (
            os.fspath(ledger)
            if ledger is not None
            else os.path.join(self.path, "_mmload", "ledger")
        )
        self.ledger = Ledger(where, self.path)
        if sequencer is None:
            sequencer = int(os.environ.get("RANK", "0")) == 0
        self._sequencer = Sequencer(self.path, self.ledger, _SUFFIXES) if sequencer else None
        self.lateness = lateness
        self.keep = keep
        self._cond = threading.Condition()
        self._applied = 0  # feature windows applied: the table's feature version
        self._newest: int | None = None
        # version -> (snapshot, watermark); version 0 is the table as it starts
        self._snaps: dict[int, tuple[Snapshot, int | None]] = {0: (table.snapshot(), None)}
        self._pin = 0
        self._files_read = 0
        super().__init__(table, name=name or self.path, poll_interval=poll_interval, start=start)

    # -- the thread ---------------------------------------------------------------------------

    def _poll(self) -> bool:
        if self._sequencer is not None:
            self._sequencer.cut()
        win = self.ledger.window(self._applied)
        if win is None:
            return False
        parts: list[pa.Table] = []
        for f in win.files:
            try:
                parts.append(read_part_file(os.path.join(self.path, f.path)))
                self._files_read += 1
            except (pa.ArrowException, OSError) as e:  # the same on every rank: skipped alike
                self._skip(f.path, f"unreadable part file: {first_line(e)}")
        if parts:
            try:
                data = pa.concat_tables(parts, promote_options="default")
            except pa.ArrowException as e:
                self._skip(f"window {win.index}", f"part files do not concatenate: {first_line(e)}")
            else:
                if self._apply(data, f"window {win.index}"):
                    ts = data.column(self.table.timestamp)
                    if len(ts):
                        newest = int(pc.max(ts.cast(pa.int64())).as_py())
                        self._newest = newest if self._newest is None else max(self._newest, newest)
        wm = None if self._newest is None else self._newest - self.lateness
        if wm is not None:
            self.table.advance_watermark(wm)
        with self._cond:
            self._applied += 1
            self._snaps[self._applied] = (self.table.snapshot(), wm)
            self._trim()
            self._cond.notify_all()
        return True  # maybe more windows waiting

    def _trim(self) -> None:
        low = min(self._pin, self._applied - self.keep)
        for v in [v for v in self._snaps if v < low]:
            del self._snaps[v]

    # -- versions -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Feature windows applied so far (the table's feature version)."""
        return self._applied

    @property
    def watermark(self) -> int | None:
        """The watermark of the current version."""
        with self._cond:
            return self._snaps[self._applied][1] if self._applied in self._snaps else None

    def current(self) -> tuple[int, int | None]:
        """(version, its watermark), read together."""
        with self._cond:
            got = self._snaps.get(self._applied)
            return self._applied, None if got is None else got[1]

    def pin(self, version: int) -> None:
        """Keep the snapshots of ``version`` and later (earlier ones may go)."""
        with self._cond:
            self._pin = version
            self._trim()

    def can_reach(self, version: int) -> bool:
        """Whether ``at(version)`` can still answer (kept, or not applied yet)."""
        with self._cond:
            return version > self._applied or version in self._snaps

    def at(self, version: int, timeout: float) -> tuple[Snapshot, int | None]:
        """The table's snapshot at ``version`` and its watermark, once applied (waiting up to
        ``timeout`` s); JoinError when it does not come or is no longer kept."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._applied < version:
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JoinError(
                        f"feature source {self.name!r}: version {version} not reached within "
                        f"{timeout:.1f} s (applied {self._applied}; ledger "
                        f"{self.ledger.directory!r})"
                    )
                self._cond.wait(min(left, 0.1))
            got = self._snaps.get(version)
        if got is None:
            raise JoinError(
                f"feature source {self.name!r}: version {version} is no longer kept (kept: "
                f"{sorted(self._snaps)}); to go back to an older state, start a new "
                "LedgerSource (and table): it applies the ledger again from the start"
            )
        return got

    def wait_for_watermark(self, ts: int, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until the watermark reaches ``ts``; whether it did."""
        deadline = time.monotonic() + timeout
        while True:
            wm = self.watermark
            if wm is not None and wm >= ts:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(left, 0.1))

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self._applied,
            "watermark": self.watermark,
            "files_read": self._files_read,
            "snapshots_kept": len(self._snaps),
        }
