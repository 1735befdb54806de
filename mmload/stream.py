"""Batches from a growing source, window after window: online training on files a stream
processor keeps committing (:mod:`mmload.sources.growing`).

Each window is a fixed set of committed files, read as one epoch of a :class:`~mmload.Loader`
over those files (epoch number = window index, so a shuffled window has an order of its own):
every contract of the fixed data set holds per window. Exactly once: each committed file is in
exactly one window, each window is read once. Equal steps: every rank gets the same number of
batches from a window (its last global batch padded, counted in ``stats()``), so ranks enter
and leave each window at the same step. Exact resume: ``state_dict()`` is the window index and
the Loader's cursor inside it; windows are in the ledger, so a restart reads the same files in
the same order and files committed meanwhile go to later windows.

A rank that needs the next window and finds none waits, polling every ``poll_s``; after
``max_wait_s`` without one it raises :class:`~mmload.errors.StreamIdle` (the loader stays
usable: iterate again to keep waiting). Rank 0 cuts windows (it is the ledger's only writer)
and decides when a wait ends: it leaves an idle marker in the ledger, and the other ranks raise
``StreamIdle`` on seeing it, so all ranks raise at the same step and none goes on alone into a
collective the others never reach. A rank whose rank 0 sends nothing for ``2 * max_wait_s +
30`` s raises on its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa

from mmload.config import FeatureJoin
from mmload.distributed.world import resolve_world
from mmload.errors import ConfigError, ShardError, StreamIdle
from mmload.features.ledger import LedgerSource
from mmload.features.watermark import PinnedTable
from mmload.loader import Loader
from mmload.sources.flightlog import FlightLogClient, is_flight_url
from mmload.sources.growing import DEFAULT_SUFFIXES, IdleMarkers, Ledger, Sequencer, Window

__all__ = ["StreamLoader"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
# How much longer than rank 0 the other ranks wait for its decision before deciding alone.
_GRACE_S = 30.0
# Counters summed over windows in stats(); the rest is the current window's.
_SUMMED = (
    "samples",
    "batches",
    "samples_padded",
    "samples_dropped",
    "samples_replaced",
    "bad_samples",
    "joins_before_watermark",
)


class StreamLoader:
    """Iterates batches from a directory that keeps growing; resumable; a context manager.

    ``source``: the directory a stream processor commits part files to (Parquet or tar, see
    :mod:`mmload.sources.growing` for what counts as committed). ``ledger``: where the windows
    are recorded (default ``<source>/_mmload/ledger``; every rank must see the same one).
    ``window_files``: at most this many files per window (None: all new ones at each cut).
    Every other keyword (``batch_size``, ``shuffle``, ``seed``, ``fields``, ``features``,
    ``device``, ``on_error``, ...) is :class:`~mmload.Loader`'s, applied to each window.

    Iteration never ends by itself: it yields the batches of window after window, waiting for
    new files in between; ``StreamIdle`` after ``max_wait_s`` without a new window.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        batch_size: int,
        ledger: str | os.PathLike[str] | None = None,
        window_files: int | None = None,
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
        poll_s: float = 1.0,
        max_wait_s: float = 300.0,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        feature_source: LedgerSource | None = None,
        **loader_kwargs: Any,
    ) -> None:
        root = os.fspath(source)
        self._flight: FlightLogClient | None = None
        if is_flight_url(root):
            if ledger is None:
                raise ConfigError(
                    f"StreamLoader over the Flight log {root!r} needs ledger= (a directory every "
                    "rank sees)"
                )
            self._flight = FlightLogClient(root)
        elif "://" in root:
            if ledger is None:
                raise ConfigError(
                    f"StreamLoader over the object-store prefix {root!r} needs ledger= (a "
                    "directory every rank sees)"
                )
            import fsspec

            try:
                fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as e:
                raise ConfigError(
                    f"StreamLoader source {root!r}: not a directory, an fsspec URL this "
                    f"process can open, or an Arrow Flight log (grpc://host:port/name): {e}"
                ) from None
        elif not os.path.isdir(root):
            raise ConfigError(f"StreamLoader source {root!r} is not a directory")
        if not poll_s > 0:
            raise ConfigError(f"poll_s={poll_s!r}: must be > 0")
        if not max_wait_s >= 0:
            raise ConfigError(f"max_wait_s={max_wait_s!r}: must be >= 0")
        if window_files is not None and (
            isinstance(window_files, bool) or not isinstance(window_files, int) or window_files < 1
        ):
            raise ConfigError(f"window_files={window_files!r}: must be an int >= 1 or None")
        for k in ("epoch", "partitions"):
            if k in loader_kwargs:
                raise ConfigError(f"StreamLoader sets {k} per window: do not pass {k}=")
        features = loader_kwargs.get("features")
        if feature_source is not None and (
            not isinstance(features, FeatureJoin) or features.table is not feature_source.table
        ):
            raise ConfigError(
                "feature_source= needs features=mmload.FeatureJoin(table, ...) over the table "
                "that source feeds"
            )
        self._features: FeatureJoin | None = features
        self._feature_source = feature_source
        self.root = root if "://" in root else os.path.abspath(root)
        self.world = resolve_world(rank, world_size)
        where = (
            os.fspath(ledger)
            if ledger is not None
            else os.path.join(self.root, "_mmload", "ledger")
        )
        self.ledger = Ledger(where, self.root)
        self._cuts = self.world.rank == 0  # rank 0 cuts windows and decides when waits end
        self._sequencer = (
            Sequencer(self.root, self.ledger, suffixes, window_files)
            if self._cuts and self._flight is None
            else None
        )
        self._window_rows = window_files  # for a Flight log: rows per window at most
        self._spill = tempfile.mkdtemp(prefix="mmload-stream-") if self._flight else None
        self.batch_size = batch_size
        self.seed = seed
        self.poll_s = float(poll_s)
        self.max_wait_s = float(max_wait_s)
        self._kwargs = loader_kwargs
        self._window = 0  # the window being read (or next to read)
        self._inner: dict[str, int] | None = None  # a cursor inside it, from load_state_dict
        self._loader: Loader | None = None  # the open window's loader (None: not open)
        self._loader_window = -1  # which window that is
        self._batch_window: int | None = None  # the window of the batch yielded last
        self._active: Iterator[dict[str, Any]] | None = None
        self._totals: dict[str, int] = dict.fromkeys(_SUMMED, 0)
        self._bad: list[Any] = []
        self._waited_s = 0.0
        self._attempts: dict[int, int] = {}  # per window, waits begun (ranks begin in step)
        session = os.environ.get("TORCHELASTIC_RUN_ID")
        if session in (None, "", "none"):  # plain torchrun without a rendezvous id: "none"
            session = None
        else:
            session += "-" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._idle = IdleMarkers(self.ledger, session, since=time.time() - 30.0)
        self._closed = False

    # -- windows ------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """The window being read, or the next one once a window is finished."""
        return self._window

    @property
    def batch_window(self) -> int | None:
        """The window the batch yielded last came from (None before the first batch).
        Unlike :attr:`window`, it does not move on when that batch was its window's last."""
        return self._batch_window

    @property
    def batch_feature_version(self) -> int | None:
        """The feature version the batch yielded last was joined against (None without a
        ``feature_source``, or before the first batch): the same on every rank at each step."""
        if self._batch_window is None:
            return None
        win = self.ledger.window(self._batch_window)
        if win is None or "feature_version" not in win.meta:
            return None
        return int(win.meta["feature_version"])

    def _wait_for(self, w: int) -> Window:
        """Window ``w``: read from the ledger, cut by rank 0 when due; ``StreamIdle`` after
        ``max_wait_s`` without it, on every rank at the same attempt (rank 0 decides)."""
        k = self._attempts[w] = self._attempts.get(w, -1) + 1
        t0 = time.monotonic()
        # Rank 0 decides; the others follow its marker, and decide alone only if it sends
        # nothing for a while longer (rank 0 gone).
        limit = self.max_wait_s
        if not self._cuts:  # rank 0 may also wait for the features before it cuts
            fj = self._features
            extra = fj.max_wait_s if fj is not None and fj.late == "wait" else 0.0
            limit = 2 * self.max_wait_s + extra + _GRACE_S
        while True:
            if self._cuts:
                win = self.ledger.window(w)
                if win is None and self.ledger.count() == w:
                    win = self._cut()
                if win is not None:
                    self._waited_s += time.monotonic() - t0
                    return win
            else:
                # The marker is checked after the window too: rank 0 may give up on this
                # attempt, then cut the window at the next one, between our two looks.
                marked = self._idle.marked(w, k)
                win = None if marked else self.ledger.window(w)
                if win is not None and not self._idle.marked(w, k):
                    self._waited_s += time.monotonic() - t0
                    return win
                if marked or win is not None:
                    waited = time.monotonic() - t0
                    self._waited_s += waited
                    raise StreamIdle(
                        f"rank 0 found no new committed file for window {w} of {self.root!r} "
                        f"(ledger {self.ledger.directory!r}); iterate again to keep waiting",
                        window=w,
                        waited_s=waited,
                    )
            waited = time.monotonic() - t0
            if waited < limit:
                time.sleep(min(self.poll_s, max(0.0, limit - waited)))
                continue
            if self._cuts:
                self._idle.mark(w, k)
                who = "no new committed file"
            else:
                who = "rank 0 cut no window and sent no idle signal"
            self._waited_s += waited
            raise StreamIdle(
                f"{who} for {waited:.1f} s: waiting for window {w} of {self.root!r} "
                f"(ledger {self.ledger.directory!r}); iterate again to keep waiting",
                window=w,
                waited_s=waited,
            )

    def _cut(self) -> Window | None:
        """Rank 0: the next window from the files committed since the last one, with the
        feature version every rank will join it against (after waiting, under
        ``late="wait"``, for the features' watermark to pass its newest sample)."""
        meta: dict[str, Any] = {}
        if self._flight is not None:
            n = self._flight.length()
            last = self.ledger.window(self.ledger.count() - 1) if self.ledger.count() else None
            start = int(last.meta["rows"][1]) if last is not None else 0
            if n < start:
                raise ShardError(
                    f"Flight log has {n} rows, fewer than the {start} already read (not an "
                    "append-only log, or another log under this name?)",
                    shard=self.root,
                )
            if n == start:
                return None
            end = n if self._window_rows is None else min(n, start + self._window_rows)
            meta["rows"] = [start, end]
            files: list[Any] = []
        else:
            assert self._sequencer is not None
            files = self._sequencer.pending()
            if not files:
                return None
        fs, fj = self._feature_source, self._features
        if fs is not None and fj is not None:
            fs.check()
            if fj.late == "wait" and files:
                paths = [_join(self.root, f.path) for f in files]
                newest = newest_ts(paths, fj.timestamp)
                if newest is not None:
                    fs.wait_for_watermark(newest, fj.max_wait_s)
            version, watermark = fs.current()
            meta.update(feature_version=version, feature_watermark=watermark)
        if self._flight is not None:
            return self.ledger.append([], meta)
        assert self._sequencer is not None
        return self._sequencer.cut(files, meta)

    def _spill_window(self, win: Window) -> str:
        """A Flight window's rows, fetched into a local Arrow IPC file (this rank's own)."""
        assert self._flight is not None
        assert self._spill is not None
        start, end = (int(x) for x in win.meta["rows"])
        table = self._flight.read(start, end)
        key = self._kwargs.get("key_column", "__key__")
        if key is not None and key not in table.column_names:  # unique across windows
            table = table.append_column(key, pa.array([str(i) for i in range(start, end)]))
        path = os.path.join(self._spill, f"window-{win.index:09d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return path

    def _window_features(self, win: Window) -> FeatureJoin | None:
        """The FeatureJoin of window ``win``: the table as of the window's feature version."""
        fs, fj = self._feature_source, self._features
        if fs is None or fj is None:
            return fj
        if "feature_version" not in win.meta:
            raise ConfigError(
                f"window {win.index} of ledger {self.ledger.directory!r} was cut without a "
                "feature version (by a StreamLoader without feature_source=)"
            )
        version = int(win.meta["feature_version"])
        fs.pin(version)
        snap, _ = fs.at(version, timeout=max(fj.max_wait_s, 60.0))
        wm = win.meta.get("feature_watermark")
        return replace(fj, table=PinnedTable(fs.table, snap, None if wm is None else int(wm)))

    def _open(self, win: Window) -> Loader | None:
        """Window ``win``'s Loader; None for a window with nothing readable in it under
        ``on_error="skip"`` (counted and listed: every rank reads the same ledger, so all skip
        it alike; with the default ``"raise"`` its error is raised, and again on each try)."""
        if self._flight is not None:  # its rows fetched first: a fetch error is never skipped
            paths = [self._spill_window(win)]
        else:
            paths = [_join(self.root, f.path) for f in win.files]
        try:
            return self._open_loader(win, paths)
        except ShardError as e:
            if self._kwargs.get("on_error") != "skip":
                raise
            log.warning("StreamLoader: window %d has nothing readable, skipped: %s", win.index, e)
            self._totals["bad_samples"] += 1
            self._bad.append({"shard": e.shard, "key": None, "reason": f"window {win.index}: {e}"})
            return None

    def _open_loader(self, win: Window, paths: list[str]) -> Loader:
        kwargs = dict(self._kwargs)
        if self._features is not None:
            kwargs["features"] = self._window_features(win)
        ld = Loader(
            paths,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=win.index,
            rank=self.world.rank,
            world_size=self.world.world_size,
            **kwargs,
        )
        ld._epochs_ahead = False  # its next epoch never comes (nor with worker processes)
        if self._inner is not None:
            ld.load_state_dict({**self._inner, "epoch": win.index})
            self._inner = None
        return ld

    def _finish(self) -> None:
        ld, self._loader = self._loader, None
        self._loader_window = -1
        if ld is None:
            return
        st = ld.stats()
        for k in _SUMMED:
            v = st.get(k)
            if isinstance(v, int):
                self._totals[k] += v
        self._bad += st.get("bad", [])
        ld.close()
        if self._spill is not None:
            for name in os.listdir(self._spill):  # the finished window's rows
                os.unlink(os.path.join(self._spill, name))

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise ConfigError("this StreamLoader is closed")
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
        self._active = self._iterate()
        return self._active

    def _iterate(self) -> Iterator[dict[str, Any]]:
        while True:
            w = self._window
            if self._loader is not None and self._loader_window != w:
                self._finish()  # the previous window's last batch was taken: it is done
            if self._loader is None:
                win = self._wait_for(w)
                self._loader, self._loader_window = self._open(win), w
            ld = self._loader
            if ld is not None and ld.epoch == w:
                for batch in ld:  # the rest of window w (the Loader's epoch w)
                    if ld.epoch != w:  # taking its last batch finished the window
                        self._window = w + 1
                    self._batch_window = w
                    yield batch
            self._window = w + 1  # also a window that gave this rank no batch at all
            self._finish()

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The resume cursor: the window and the position inside it (a few ints)."""
        head = {"stream_version": _STATE_VERSION, "window": self._window}
        win = self.ledger.window(self._window)
        if win is not None and "feature_version" in win.meta:
            head["feature_version"] = int(win.meta["feature_version"])  # what it joins against
        ld = self._loader
        if ld is not None and self._loader_window == self._window and ld.epoch == self._window:
            inner = ld.state_dict()
            inner.pop("epoch")
            return {**head, **inner}
        if self._inner is not None:
            return {**head, **self._inner}
        return {**head, "samples_consumed": 0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where ``state`` was taken: the rest of its window, then the windows after."""
        st = dict(state)
        if st.pop("stream_version", None) != _STATE_VERSION:
            raise ConfigError(f"not a StreamLoader state_dict (stream_version {_STATE_VERSION})")
        w = st.pop("window", None)
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"state_dict window={w!r}: must be an int >= 0")
        if w > self.ledger.count():
            raise ConfigError(
                f"state_dict is at window {w}, but ledger {self.ledger.directory!r} has only "
                f"{self.ledger.count()} windows: the ledger of that run is needed to resume"
            )
        fv = st.pop("feature_version", None)
        win = self.ledger.window(w)
        fs = self._feature_source
        if fs is not None and win is not None and "feature_version" in win.meta:
            need = int(win.meta["feature_version"])
            if not fs.can_reach(need):
                raise ConfigError(
                    f"window {w} joins feature version {need}, which this process's "
                    "LedgerSource no longer keeps (it has moved past it): to go back to an "
                    "older state, start a new LedgerSource and table, which apply the ledger "
                    "again from the start"
                )
            fs.pin(need)
        if fv is not None and (win is None or win.meta.get("feature_version") != fv):
            raise ConfigError(
                f"state_dict joined window {w} against feature version {fv}, the ledger says "
                f"{None if win is None else win.meta.get('feature_version')}: another ledger?"
            )
        self._stop_reading()
        self._window = w
        self._inner = st if st.get("samples_consumed", 0) else None

    # -- stats and lifetime -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters summed over the windows read, the current window's own statistics, and
        where the stream stands (windows cut, seconds spent waiting for new files)."""
        cur = self._loader.stats() if self._loader is not None else {}
        out = dict(cur)
        for k in _SUMMED:
            v = cur.get(k, 0)
            out[k] = self._totals[k] + (v if isinstance(v, int) else 0)
        out["bad"] = self._bad + list(cur.get("bad", []))
        out["per_batch"] = cur.get("per_batch", {})  # the current window's latest batches
        out["window"] = self._window
        out["windows_cut"] = self.ledger.count()
        out["stream_wait_seconds"] = round(self._waited_s, 3)
        return out

    def _stop_reading(self) -> None:
        """Close the iteration and the open window's loader (its counts are not folded in)."""
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None
        if self._loader is not None:
            self._loader.close()
            self._loader, self._loader_window = None, -1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
        if self._flight is not None:
            self._flight.close()

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if "://" in root else os.path.join(root, rel)


def newest_ts(paths: Sequence[str], column: str) -> int | None:
    """The newest value of ``column`` in these files: from the row-group statistics of Parquet
    files (no data read), by reading the column of JSON-lines files; None when a file is of
    another kind or has no such integer column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    newest: int | None = None
    for p in paths:
        try:
            if p.endswith((".jsonl", ".ndjson")):
                col = pajson.read_json(p).column(column)
                if not pa.types.is_integer(col.type):
                    return None
                m = pc.max(col).as_py()
                if m is not None:
                    newest = m if newest is None else max(newest, m)
                continue
            if not p.endswith(".parquet"):
                return None
            meta = pq.ParquetFile(p).metadata
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if column not in names:
            return None
        i = names.index(column)
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(i).statistics
            if st is None or not st.has_min_max or not isinstance(st.max, int):
                return None
            newest = st.max if newest is None else max(newest, st.max)
    return newest
