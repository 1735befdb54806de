"""Phase 3: the as-of join of a batch of queries against a snapshot's runs (NumPy or torch).

For each query (code, t) a run's candidate is its last row of that code with ``ts <= t``; with a
``ttl`` the candidate must also have ``t - ts <= ttl``. Across runs the newest candidate wins; on a
tie the newer run wins for ``keep="last"``, the older one for ``keep="first"``. That is
``pandas.merge_asof(direction="backward", allow_exact_matches=True, tolerance=ttl)`` over all rows
in arrival order. The CPU runs :func:`search_runs` with NumPy; the GPU runs the fused Numba kernel
(``mmload.kernels.asof_join``) instead (``search_runs`` with torch ops is its pure-torch twin).
Both return the same gathered matrices, which :func:`assemble` turns into the batch's columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmload.features.backend import Array, NumpyOps, Ops
from mmload.features.runs import Run, upper_bound
from mmload.features.schema import FOUND, Layout

__all__ = ["assemble", "search_runs", "search_runs_sorted"]


def search_runs(
    ops: Ops,
    runs: tuple[Run, ...],
    q_codes: Array,
    q_ts: Array,
    *,
    ttl: int | None,
    later_wins: bool,
    defaults_f: Array,
    defaults_i: Array,
) -> tuple[Array, Array, Array]:
    """Joined rows: floats float32 [B, n_float], ints int64 [B, n_int], found bool [B], arrays of
    ``ops``'s device; rows not found hold the defaults."""
    b = q_codes.shape[0]
    found = ops.mask(b, False)
    best_ts = ops.full(b, 0)
    best_row = ops.full(b, 0)
    best_run = ops.full(b, -1)
    for r, run in enumerate(runs):
        pos, lo = upper_bound(ops, run, q_codes, q_ts)
        ok = pos > lo
        row = ops.maximum(pos - 1, 0)
        fts = run.ts[row]
        if ttl is not None:
            ok &= (q_ts - fts) <= ttl
        newer = fts >= best_ts if later_wins else fts > best_ts
        win = ok & (~found | newer)
        if len(runs) == 1:
            return _gather(ops, run, row, win, defaults_f, defaults_i)
        best_run = ops.where(win, r, best_run)
        best_row = ops.where(win, row, best_row)
        best_ts = ops.where(win, fts, best_ts)
        found |= win
    floats = ops.repeat_rows(defaults_f, b)
    ints = ops.repeat_rows(defaults_i, b)
    for r, run in enumerate(runs):
        take = ops.nonzero(best_run == r)
        floats[take] = run.floats[best_row[take]]
        ints[take] = run.ints[best_row[take]]
    return floats, ints, found


def search_runs_sorted(
    ops: NumpyOps, runs: tuple[Run, ...], q_codes: np.ndarray, q_ts: np.ndarray, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`search_runs` on the host with the queries sorted by key first, so the binary
    searches and gathers walk the runs in order (about twice as fast on a table that does not
    fit the caches); results come back in the callers' order."""
    order = np.argsort(q_codes, kind="stable")
    res = search_runs(ops, runs, q_codes[order], q_ts[order], **kwargs)
    out = tuple(np.empty_like(r) for r in res)
    for o, r in zip(out, res, strict=True):
        o[order] = r
    return out[0], out[1], out[2]


def _gather(
    ops: Ops, run: Run, row: Array, found: Array, defaults_f: Array, defaults_i: Array
) -> tuple[Array, Array, Array]:
    floats = run.floats[row]
    ints = run.ints[row]
    miss = ops.nonzero(~found)
    floats[miss] = defaults_f
    ints[miss] = defaults_i
    return floats, ints, found


def assemble(
    layout: Layout, floats: torch.Tensor, ints: torch.Tensor, found: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The batch columns, sorted by name, then ``FOUND``: scalars [B] (float32 or int64),
    vectors [B, D], each contiguous; ``floats``/``ints`` are [B, n] (possibly strided views)."""
    out: dict[str, torch.Tensor] = {}
    for c in layout.columns:
        src = floats if c.kind == "float" else ints
        v = src[:, c.offset] if c.width == 0 else src[:, c.offset : c.offset + c.width]
        out[c.name] = v.contiguous()
    out[FOUND] = found
    return out
