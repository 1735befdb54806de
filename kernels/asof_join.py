"""As-of join of a batch of queries against one sorted run of a feature table.

A *run* holds rows sorted by (key code, ts), unique per (code, ts): ``ukeys`` int64 ``[G]`` its
distinct codes, ``starts`` int64 ``[G + 1]`` (the rows of ``ukeys[g]`` are
``starts[g]:starts[g + 1]``), ``ts`` int64 ``[n]``, ``values_f`` float32 ``[n, >= nf]`` and
``values_i`` int64 ``[n, >= ni]`` (their first ``nf`` / ``ni`` columns are the features; with
none, pass any ``[1, 1]`` array and 0). For query ``i`` the run's candidate is its last row ``r``
of code ``q_keys[i]`` with ``ts[r] <= q_ts[i]`` and, when ``ttl >= 0``,
``q_ts[i] - ts[r] <= ttl``: two binary searches by one thread per query.

Runs are joined one launch each, oldest first, into the same outputs: the launch with ``first``
resets query ``i`` to "not found" with the defaults; every launch writes its candidate when
query ``i`` is not found yet or the candidate is newer than ``best_ts[i]`` (or as new, when
``later_wins``). Outputs: ``out_f`` float32 ``[>= nf, B]`` and ``out_i`` int64 ``[>= ni, B]``
(one row per feature value, so a warp's stores are coalesced), ``best_ts`` int64 ``[B]``,
``found`` bool ``[B]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda

from ._device import Launchers, device_array, num_blocks

__all__ = ["asof_join", "asof_join_reference", "kernel_signatures"]

# Kernels reach threadIdx & co. through this alias: numba's stubs mistype them for mypy.
_cu: Any = cuda

_THREADS = 256

_SIGNATURE = (
    "void(int64[::1], int64[::1], int64[::1], float32[:, ::1], int64[:, ::1], int64, int64, "
    "int64[::1], int64[::1], int64, boolean, boolean, float32[::1], int64[::1], "
    "float32[:, ::1], int64[:, ::1], int64[::1], boolean[::1])"
)


def _asof_join_kernel(
    ukeys: Any,
    starts: Any,
    ts: Any,
    values_f: Any,
    values_i: Any,
    nf: Any,
    ni: Any,
    q_keys: Any,
    q_ts: Any,
    ttl: Any,
    later_wins: Any,
    first: Any,
    defaults_f: Any,
    defaults_i: Any,
    out_f: Any,
    out_i: Any,
    best_ts: Any,
    found: Any,
) -> None:
    i = _cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x
    if i >= q_keys.shape[0]:
        return
    if first:
        found[i] = False
        best_ts[i] = 0
        for c in range(nf):
            out_f[c, i] = defaults_f[c]
        for c in range(ni):
            out_i[c, i] = defaults_i[c]
    k = q_keys[i]
    t = q_ts[i]
    g_count = ukeys.shape[0]
    lo = 0
    hi = g_count
    while lo < hi:
        mid = (lo + hi) >> 1
        if ukeys[mid] < k:
            lo = mid + 1
        else:
            hi = mid
    if lo == g_count or ukeys[lo] != k:
        return
    a = starts[lo]
    hi = starts[lo + 1]
    lo = a
    while lo < hi:
        mid = (lo + hi) >> 1
        if ts[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    r = lo - 1
    if r < a:
        return
    ft = ts[r]
    if ttl >= 0 and t - ft > ttl:
        return
    if found[i] and (ft < best_ts[i] or (ft == best_ts[i] and not later_wins)):
        return
    found[i] = True
    best_ts[i] = ft
    for c in range(nf):
        out_f[c, i] = values_f[r, c]
    for c in range(ni):
        out_i[c, i] = values_i[r, c]


def kernel_signatures() -> list[tuple[str, Callable[..., None], str]]:
    """``(name, Python kernel, Numba signature)`` of the kernel the launcher compiles."""
    return [("asof_join", _asof_join_kernel, _SIGNATURE)]


@functools.cache
def _compiled() -> Any:
    return Launchers(cuda.jit(_SIGNATURE)(_asof_join_kernel))


def _check_count(name: str, value: int, limit: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
    if value > limit:
        raise ValueError(f"{name}: {value} is more than the {limit} columns of {what}")


def asof_join(
    ukeys: Any,
    starts: Any,
    ts: Any,
    values_f: Any,
    values_i: Any,
    q_keys: Any,
    q_ts: Any,
    out_f: Any,
    out_i: Any,
    best_ts: Any,
    found: Any,
    *,
    defaults_f: Any,
    defaults_i: Any,
    nf: int,
    ni: int,
    ttl: int = -1,
    later_wins: bool = True,
    first: bool = True,
    stream: Any = 0,
) -> None:
    """Join B = ``len(q_keys)`` queries against one run (see the module docstring), writing
    ``out_f``/``out_i``/``best_ts``/``found`` in place on ``stream``; does not wait.

    Arrays are device arrays (``__cuda_array_interface__``: Numba, torch CUDA, CuPy; NumPy
    under the simulator), C-contiguous; ``ttl < 0``: no ttl. A bad argument raises ValueError
    naming it."""
    uk = device_array(ukeys, "ukeys", dtype="int64", shape=(None,))
    st = device_array(starts, "starts", dtype="int64", shape=(uk.shape[0] + 1,))
    tt = device_array(ts, "ts", dtype="int64", shape=(None,))
    n = tt.shape[0]
    vf = device_array(values_f, "values_f", dtype="float32", shape=(None, None))
    vi = device_array(values_i, "values_i", dtype="int64", shape=(None, None))
    _check_count("nf", nf, vf.shape[1], "values_f")
    _check_count("ni", ni, vi.shape[1], "values_i")
    for name, v, count in (("values_f", vf, nf), ("values_i", vi, ni)):
        if count and v.shape[0] != n:
            raise ValueError(f"{name}: needs {n} rows (one per row of ts), got {v.shape[0]}")
    qk = device_array(q_keys, "q_keys", dtype="int64", shape=(None,))
    b = qk.shape[0]
    qt = device_array(q_ts, "q_ts", dtype="int64", shape=(b,))
    df = device_array(defaults_f, "defaults_f", dtype="float32", shape=(None,))
    di = device_array(defaults_i, "defaults_i", dtype="int64", shape=(None,))
    of = device_array(out_f, "out_f", dtype="float32", shape=(None, b))
    oi = device_array(out_i, "out_i", dtype="int64", shape=(None, b))
    _check_count("nf", nf, min(df.shape[0], of.shape[0]), "defaults_f / out_f")
    _check_count("ni", ni, min(di.shape[0], oi.shape[0]), "defaults_i / out_i")
    bt = device_array(best_ts, "best_ts", dtype="int64", shape=(b,))
    fd = device_array(found, "found", dtype="bool", shape=(b,))
    if b == 0:
        return
    threads = min(_THREADS, b)
    _compiled()[num_blocks(b, threads), threads, stream](
        uk,
        st,
        tt,
        vf,
        vi,
        int(nf),
        int(ni),
        qk,
        qt,
        int(ttl),
        bool(later_wins),
        bool(first),
        df,
        di,
        of,
        oi,
        bt,
        fd,
    )


def asof_join_reference(
    ukeys: np.ndarray,
    starts: np.ndarray,
    ts: np.ndarray,
    values_f: np.ndarray,
    values_i: np.ndarray,
    q_keys: np.ndarray,
    q_ts: np.ndarray,
    *,
    defaults_f: np.ndarray,
    defaults_i: np.ndarray,
    ttl: int = -1,
    later_wins: bool = True,
    prev: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of :func:`asof_join` on host arrays, with ``nf = len(defaults_f)`` and
    ``ni = len(defaults_i)``: returns new ``(out_f [nf, B], out_i [ni, B], best_ts [B],
    found [B])``, continuing from ``prev`` (the previous run's result) when given."""
    nf, ni, b = len(defaults_f), len(defaults_i), len(q_keys)
    if prev is None:
        out_f = np.repeat(np.asarray(defaults_f, np.float32)[:, None], b, axis=1)
        out_i = np.repeat(np.asarray(defaults_i, np.int64)[:, None], b, axis=1)
        best_ts, found = np.zeros(b, np.int64), np.zeros(b, bool)
    else:
        out_f, out_i, best_ts, found = (np.array(a) for a in prev)
    for i in range(b):
        g = int(np.searchsorted(ukeys, q_keys[i]))
        if g == len(ukeys) or ukeys[g] != q_keys[i]:
            continue
        lo, hi = int(starts[g]), int(starts[g + 1])
        r = lo + int(np.searchsorted(ts[lo:hi], q_ts[i], side="right")) - 1
        if r < lo or (ttl >= 0 and q_ts[i] - ts[r] > ttl):
            continue
        if found[i] and (ts[r] < best_ts[i] or (ts[r] == best_ts[i] and not later_wins)):
            continue
        found[i], best_ts[i] = True, ts[r]
        if nf:
            out_f[:, i] = values_f[r, :nf]
        if ni:
            out_i[:, i] = values_i[r, :ni]
    return out_f, out_i, best_ts, found
