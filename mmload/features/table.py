"""``FeatureTable``: a live, versioned table of timestamped features with an as-of join.

Readers never lock: every join reads one immutable :class:`Snapshot` (a tuple of sorted runs plus
the layout), which writers replace by a single attribute assignment after the new runs are fully
built (on a GPU, after the writer's stream has finished them). Writers (``update``, ``compact``,
the live sources) are serialized by one lock; a failed update raises before anything is published.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch

from mmload.device import parse_device
from mmload.errors import ConfigError, JoinError
from mmload.features.backend import Array, NumpyOps, Ops, TorchOps
from mmload.features.join import assemble, search_runs, search_runs_sorted
from mmload.features.keys import KeyCodec, query_timestamps
from mmload.features.lists import ListStore
from mmload.features.runs import Keep, Run, add_run, compact, make_run
from mmload.features.schema import FOUND, Layout, Rows, infer_layout, normalize, to_arrow
from mmload.features.snapshot import Duration, Snapshot, check_duration, duration, fail
from mmload.features.stats import UpdateLog

if TYPE_CHECKING:
    from mmload.features.sources import Source

__all__ = ["FeatureTable"]

Number = int | float


class FeatureTable:
    """Keyed, timestamped feature columns, updated live and joined as of each sample's time.

    ``key``: the key column (integer, or string: dictionary-encoded to int64 codes held by the
    table). ``timestamp``: integers, or an Arrow timestamp compared as int64 in its own unit (join
    timestamps use that unit). ``columns``: the feature columns (default: all others, and updates
    with extra columns are rejected), or a ``pyarrow.Schema`` of the whole table (then joins work
    before the first update; declare vectors as ``fixed_size_list``). Features are numeric scalars
    (float -> float32, int/bool -> int64) or fixed-length numeric vectors.

    ``ttl``: a match must be at most this old (sample ts - feature ts <= ttl). ``retention``:
    compaction keeps, per key, every row newer than (newest feature ts - retention) plus the newest
    row at or before it; older history is dropped (joins at earlier times see less). Both are ints
    in timestamp units or timedeltas. ``defaults``: the value of a feature that is not found (a
    number for all columns or a mapping by column; 0 by default). ``duplicate``: for rows with the
    same (key, ts), ``"last"`` (default) keeps the one that arrived last (later row of an update,
    later update), ``"first"`` the one that arrived first. ``device``: "cpu" (NumPy) or "cuda[:N]"
    (cuDF ingest and a Numba join kernel; needs ``pip install "mmload[gpu]"``); ``join`` returns
    tensors on it.
    """

    def __init__(
        self,
        *,
        key: str,
        timestamp: str,
        columns: Sequence[str] | pa.Schema | None = None,
        device: str | torch.device = "cpu",
        ttl: Duration = None,
        retention: Duration = None,
        defaults: Number | Mapping[str, Number] | None = None,
        duplicate: Literal["last", "first"] = "last",
    ) -> None:
        for field, name in (("key", key), ("timestamp", timestamp)):
            if not isinstance(name, str) or not name:
                raise fail(field, name, "must be a non-empty column name")
        if key == timestamp:
            raise fail("timestamp", timestamp, "must differ from key")
        if duplicate not in ("last", "first"):
            raise fail("duplicate", duplicate, "must be 'last' or 'first'")
        check_duration("ttl", ttl)
        check_duration("retention", retention)
        if (
            defaults is not None
            and not isinstance(defaults, Mapping)
            and (isinstance(defaults, bool) or not isinstance(defaults, (int, float)))
        ):
            raise fail("defaults", defaults, "must be a number or a mapping column -> number")
        schema = columns if isinstance(columns, pa.Schema) else None
        names: list[str] | None = None
        if columns is not None and schema is None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise fail("columns", columns, "must be a list of column names or a Schema")
            names = list(columns)
            bad = [c for c in names if c in (key, timestamp, FOUND)]
            if bad or len(set(names)) != len(names):
                raise fail("columns", columns, "need unique names other than key/timestamp")
        self._ops: Ops = NumpyOps()
        if str(device).startswith("cuda"):
            from mmload.features.gpu import cudf_sort_perm, require_cudf

            require_cudf()  # before the device check: a missing extra is the first thing to fix
            self.device = parse_device(device)
            self._ops = TorchOps(self.device, sort_perm=cudf_sort_perm)
        else:
            self.device = parse_device(device)
        self.key, self.timestamp = key, timestamp
        self._names = names
        self._ttl, self._retention, self._defaults = ttl, retention, defaults
        self._keep: Keep = duplicate
        self._lock = threading.Lock()
        self._stat_lock = threading.Lock()
        self._log = UpdateLog()
        self._sources: list[Source] = []
        self._watermark: int | None = None
        self._merges = self._dropped = self._joins = self._rows_joined = 0
        self._newest_sample: int | None = None
        self._snap = Snapshot((), 0, 0, None, None, None, None, None, None, None)
        if schema is not None:
            try:
                layout = infer_layout(schema, key=key, timestamp=timestamp, columns=None)
            except JoinError as e:
                raise fail("columns", schema, str(e)) from None
            if FOUND in layout.names:
                raise fail("columns", schema, f"{FOUND!r} is reserved")
            self._snap = self._with_layout(layout)

    # -- layout -------------------------------------------------------------------------------

    def _with_layout(self, layout: Layout) -> Snapshot:
        """The empty snapshot for ``layout``; raises ConfigError for mismatched settings."""
        d = self._defaults
        known = set(layout.names)
        if isinstance(d, Mapping):
            unknown = sorted(set(d) - known)
            if unknown:
                raise fail("defaults", dict(d), f"names unknown column(s) {unknown}")
        df, di = np.zeros(layout.n_float, np.float32), np.zeros(layout.n_int, np.int64)
        for c in layout.columns:
            if c.jagged:  # not found: row id -1, an empty list
                if isinstance(d, Mapping) and c.name in d:
                    raise fail(f"defaults[{c.name!r}]", d[c.name], "a list column's default is []")
                di[c.offset] = -1
                continue
            v = d.get(c.name, 0) if isinstance(d, Mapping) else (0 if d is None else d)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                raise fail(f"defaults[{c.name!r}]", v, "must be a number")
            if c.kind == "int" and not float(v).is_integer():
                raise fail(f"defaults[{c.name!r}]", v, "column holds int64; need an integer")
            target = df if c.kind == "float" else di
            target[c.offset : c.offset + c.span] = v
        return Snapshot(
            runs=(),
            version=self._snap.version,
            rows=0,
            newest_ts=None,
            layout=layout,
            codec=KeyCodec(layout.key_kind),
            defaults_f=self._ops.asarray(df),
            defaults_i=self._ops.asarray(di),
            ttl=duration("ttl", self._ttl, layout.ts_unit),
            retention=duration("retention", self._retention, layout.ts_unit),
        )

    @property
    def column_names(self) -> tuple[str, ...]:
        """Feature column names, sorted (the order of ``join``'s output); empty until known."""
        layout = self._snap.layout
        if layout is not None:
            return layout.names
        return tuple(sorted(self._names)) if self._names is not None else ()

    @property
    def layout(self) -> Layout | None:
        return self._snap.layout

    def snapshot(self) -> Snapshot:
        """The current immutable snapshot (what a join started now would read)."""
        return self._snap

    # -- writers ------------------------------------------------------------------------------

    def update(self, data: Any, *, origin: str = "update") -> int:
        """Append rows (pyarrow Table/RecordBatch, pandas DataFrame or dict of columns) in any
        order; returns the number of rows received. Raises JoinError on bad input, leaving the
        table unchanged; the failure is also counted and listed in ``stats()``."""
        return self._update(data, origin)[0]

    def _update(self, data: Any, origin: str) -> tuple[int, int | None]:
        """``update``, also returning the newest ts of the rows (None when empty)."""
        try:
            table = to_arrow(data)
            with self._lock:
                snap = self._snap
                if snap.layout is None:
                    layout = infer_layout(
                        table.schema,
                        key=self.key,
                        timestamp=self.timestamp,
                        columns=self._names,
                        sample=table,
                    )
                    if FOUND in layout.names:
                        raise JoinError(f"feature column name {FOUND!r} is reserved")
                    rows = normalize(table, layout)
                    try:
                        snap = self._with_layout(layout)
                    except ConfigError as e:
                        raise JoinError(f"the first update fixes the schema, and then {e}") from e
                else:
                    rows = normalize(table, snap.layout)
                if len(rows) or snap is not self._snap:
                    self._snap = self._apply(snap, rows)
        except JoinError as e:
            self._log.failed(origin, str(e))
            raise
        newest = int(rows.ts.max()) if len(rows) else None
        self._log.applied(len(rows), newest)
        return len(rows), newest

    def _apply(self, snap: Snapshot, rows: Rows) -> Snapshot:
        if not len(rows):
            return snap
        assert snap.codec is not None  # set together with the layout
        codes = snap.codec.encode_rows(rows.keys)
        newest = int(rows.ts.max())
        if snap.newest_ts is not None:
            newest = max(newest, snap.newest_ts)
        cutoff = self._cutoff(snap, newest)
        ops = self._ops
        ints, lists = rows.ints, snap.lists
        if rows.lists:  # list columns: their slot's row numbers become store row ids
            assert snap.layout is not None
            ints = ints.copy()
            for c in snap.layout.columns:
                if c.jagged:
                    ints[:, c.offset] += lists.next_id
            lists = lists.add(len(rows), rows.lists)
        run, dropped = make_run(
            ops,
            ops.asarray(codes),
            ops.asarray(rows.ts),
            ops.asarray(rows.floats),
            ops.asarray(ints),
            keep=self._keep,
            cutoff=cutoff,
        )
        runs, merges = snap.runs, 0
        if run is not None:
            runs, merges, d = add_run(ops, runs, run, keep=self._keep, cutoff=cutoff)
            dropped += d
        return self._publish(snap, runs, newest, merges, dropped, lists)

    @staticmethod
    def _cutoff(snap: Snapshot, newest: int) -> int | None:
        return None if snap.retention is None else newest - snap.retention

    def _publish(
        self,
        snap: Snapshot,
        runs: tuple[Run, ...],
        newest: int | None,
        merges: int,
        dropped: int,
        lists: ListStore | None = None,
    ) -> Snapshot:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            stream.synchronize()  # readers on other streams must see finished runs
            for r in runs:
                r.cache.setdefault("stream", stream.cuda_stream)
        with self._stat_lock:
            self._merges += merges
            self._dropped += dropped
        lists = snap.lists if lists is None else lists
        if dropped and lists.chunks:  # release the list rows no row refers to any more
            lists = lists.keep(self._list_ids(snap.layout, runs))
        return Snapshot(
            runs=runs,
            version=snap.version + 1,
            rows=sum(r.n for r in runs),
            newest_ts=newest,
            layout=snap.layout,
            codec=snap.codec,
            defaults_f=snap.defaults_f,
            defaults_i=snap.defaults_i,
            ttl=snap.ttl,
            retention=snap.retention,
            lists=lists,
        )

    def _list_ids(self, layout: Layout | None, runs: tuple[Run, ...]) -> np.ndarray:
        """The list row ids the runs refer to (host int64)."""
        slots = [c.offset for c in layout.columns if c.jagged] if layout is not None else []
        parts = [np.empty(0, np.int64)]
        for r in runs:
            for o in slots:
                col = r.ints[:, o]
                parts.append(col.cpu().numpy() if isinstance(col, torch.Tensor) else col)
        return np.concatenate(parts)

    def compact(self) -> None:
        """Merge all runs into one now, dropping what the retention window does not need."""
        with self._lock:
            snap = self._snap
            if len(snap.runs) == 0 or snap.newest_ts is None:
                return
            run, dropped = compact(
                self._ops, snap.runs, keep=self._keep, cutoff=self._cutoff(snap, snap.newest_ts)
            )
            runs = (run,) if run is not None else ()
            self._snap = self._publish(snap, runs, snap.newest_ts, len(snap.runs) - 1, dropped)

    # -- readers ------------------------------------------------------------------------------

    @property
    def watermark(self) -> int | None:
        """The feature time up to which the table is complete (no row with an older or equal
        ts will still arrive), as its sources or ``advance_watermark`` declared; None: unknown."""
        return self._watermark

    def advance_watermark(self, ts: int) -> None:
        """Declare the table complete up to feature time ``ts`` (it never moves back)."""
        with self._stat_lock:
            if self._watermark is None or ts > self._watermark:
                self._watermark = int(ts)

    def join(
        self, keys: Any, timestamps: Any, *, snapshot: Snapshot | None = None
    ) -> dict[str, Any]:
        """As-of join of B queries: for each (key, ts) the newest row with feature ts <= ts
        (and within ``ttl``). Returns one tensor per feature column on ``self.device``, sorted by
        name: scalars [B] (float32 or int64), vectors [B, D], variable-length list columns as a
        :class:`~mmload.jagged.Jagged` (an empty row where not found); then ``"__features_found__"``
        (bool [B]); rows not found hold the defaults. ``keys``: list of str/int, int64 NumPy
        array, pyarrow array or int tensor; ``timestamps``: int64 [B] (or datetime64).
        ``snapshot``: join against that earlier state of the table (``snapshot()``) instead of
        the current one."""
        snap = self._snap if snapshot is None else snapshot
        layout, codec = snap.layout, snap.codec
        if layout is None or codec is None or snap.defaults_f is None or snap.defaults_i is None:
            raise JoinError(
                "join before any feature update: the table has no schema yet (pass "
                "columns=pyarrow.schema([...]) to join before the first update)"
            )
        q_codes = self._on_device(codec.encode_query(keys))
        q_ts = query_timestamps(timestamps, int(q_codes.shape[0]), layout.ts_unit)
        newest = int(q_ts.max()) if q_ts.shape[0] else None
        q_ts = self._on_device(q_ts)
        kwargs: dict[str, Any] = {
            "ttl": snap.ttl,
            "later_wins": self._keep == "last",
            "defaults_f": snap.defaults_f,
            "defaults_i": snap.defaults_i,
        }
        floats: Array
        ints: Array
        found: Array
        if self.device.type == "cuda":
            from mmload.features.gpu import join_cuda

            floats, ints, found = join_cuda(snap.runs, q_codes, q_ts, **kwargs)
        elif isinstance(self._ops, NumpyOps):
            floats, ints, found = search_runs_sorted(self._ops, snap.runs, q_codes, q_ts, **kwargs)
        else:
            floats, ints, found = search_runs(self._ops, snap.runs, q_codes, q_ts, **kwargs)
        with self._stat_lock:
            self._joins += 1
            self._rows_joined += int(q_codes.shape[0])
            if newest is not None and (self._newest_sample is None or newest > self._newest_sample):
                self._newest_sample = newest
        to_torch = self._ops.to_torch
        out: dict[str, Any] = assemble(layout, to_torch(floats), to_torch(ints), to_torch(found))
        for c in layout.columns:
            if c.elem is not None:  # row ids -> the rows, as a Jagged on the table's device
                ids = out[c.name].cpu().numpy()
                dtype = torch.float32 if c.elem == "float" else torch.int64
                j = snap.lists.gather(c.name, ids, dtype)
                out[c.name] = j if self.device.type == "cpu" else j.to(self.device)
        return out

    def _on_device(self, a: np.ndarray | torch.Tensor) -> Array:
        """Query arrays as the backend's arrays: NumPy on the CPU, tensors on the GPU."""
        if isinstance(self._ops, NumpyOps):
            return a.cpu().numpy() if isinstance(a, torch.Tensor) else a
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a if a.flags.writeable else a.copy())
        return a.to(self.device, non_blocking=True)

    # -- sources and stats --------------------------------------------------------------------

    def _attach(self, source: Source) -> None:
        with self._stat_lock:
            self._sources.append(source)

    @property
    def newest_sample_ts(self) -> int | None:
        return self._newest_sample

    def stats(self) -> dict[str, Any]:
        """Cheap counters (no device sync): rows, runs, updates, errors, joins, feature lag
        (newest sample ts seen by join - newest feature ts), and each attached source's stats."""
        snap = self._snap
        log = self._log.snapshot()
        with self._stat_lock:
            sources = list(self._sources)
            out: dict[str, Any] = {
                "device": str(self.device),
                "version": snap.version,
                "rows": snap.rows,
                "runs": len(snap.runs),
                "string_keys": len(snap.codec) if snap.codec is not None else 0,
                **log,
                "newest_feature_ts": snap.newest_ts,
                "newest_sample_ts": self._newest_sample,
                "rows_dropped": self._dropped,
                "merges": self._merges,
                "joins": self._joins,
                "rows_joined": self._rows_joined,
            }
        lag = None
        if out["newest_sample_ts"] is not None and snap.newest_ts is not None:
            lag = out["newest_sample_ts"] - snap.newest_ts
        out["feature_lag"] = lag
        out["sources"] = [s.stats() for s in sources]
        return out

    def __repr__(self) -> str:
        snap = self._snap
        return (
            f"FeatureTable(key={self.key!r}, timestamp={self.timestamp!r}, "
            f"columns={list(self.column_names)}, device={str(self.device)!r}, rows={snap.rows}, "
            f"runs={len(snap.runs)})"
        )
