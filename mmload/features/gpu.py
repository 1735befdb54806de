"""The GPU side of a FeatureTable: the only module that imports cuDF, and the join launches.

Ingest: cuDF sorts each update batch by (key code, ts, arrival) on the device
(``DataFrame.argsort``); merging, duplicates and retention are the shared torch code of
``runs.py``. Join: the fused Numba kernel of ``mmload.kernels.asof_join``, one launch per run
(oldest first) on the caller's current torch stream, writing fresh output tensors; nothing waits
for the GPU. cuDF, CuPy and ``numba.cuda`` are imported on first use, never by ``import mmload``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from mmload.errors import MissingDependencyError
from mmload.features.runs import Run

__all__ = ["cudf_sort_perm", "join_cuda", "require_cudf"]

_streams: dict[int, Any] = {}  # torch stream handle -> numba external stream
_dummies: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def require_cudf() -> ModuleType:
    """The cudf module, or MissingDependencyError naming the ``gpu`` extra."""
    try:
        import cudf
    except ImportError as e:
        raise MissingDependencyError("cudf", "gpu", "FeatureTable(device='cuda')") from e
    return cudf


def cudf_sort_perm(codes: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """int64 [n] permutation (on the device) sorting by (code, ts), ties in arrival order."""
    cudf = require_cudf()
    import cupy

    dev = codes.device
    seq = torch.arange(codes.shape[0], device=dev)
    # cuDF and CuPy run on their own stream: let the producers finish, then the sort.
    torch.cuda.synchronize(dev)
    with cupy.cuda.Device(dev.index):
        frame = cudf.DataFrame(
            {"k": cupy.asarray(codes), "t": cupy.asarray(ts), "s": cupy.asarray(seq)}
        )
        perm = cupy.asarray(frame.argsort(by=["k", "t", "s"]))
        cupy.cuda.get_current_stream().synchronize()
    return torch.as_tensor(perm, device=dev).to(torch.int64)


def _dummy(dev: torch.device, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    key = (dev, dtype, ndim)
    t = _dummies.get(key)
    if t is None:
        t = torch.zeros((1,) * ndim, dtype=dtype, device=dev)
        _dummies[key] = t
    return t


def _run_args(run: Run) -> tuple[Any, Any, Any, Any, Any]:
    args = run.cache.get("kernel_args")
    if args is None:
        from numba import cuda

        dev = run.ts.device
        vf = run.floats if run.floats.shape[1] else _dummy(dev, torch.float32, 2)
        vi = run.ints if run.ints.shape[1] else _dummy(dev, torch.int64, 2)
        args = tuple(cuda.as_cuda_array(t) for t in (run.ukeys, run.starts, run.ts, vf, vi))
        run.cache["kernel_args"] = args
    return args


def _numba_stream(stream: torch.cuda.Stream) -> Any:
    ptr = int(stream.cuda_stream)
    ns = _streams.get(ptr)
    if ns is None:
        from numba import cuda

        ns = cuda.external_stream(ptr)
        _streams[ptr] = ns
    return ns


def join_cuda(
    runs: tuple[Run, ...],
    q_codes: torch.Tensor,
    q_ts: torch.Tensor,
    *,
    ttl: int | None,
    later_wins: bool,
    defaults_f: torch.Tensor,
    defaults_i: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``join.search_runs``: floats [B, n_float] and ints [B, n_int] (transposed views of
    [n, B] kernel outputs), found bool [B]; all on the queries' CUDA device."""
    from numba import cuda

    from mmload.kernels.asof_join import asof_join

    dev = q_codes.device
    b = int(q_codes.shape[0])
    nf, ni = int(defaults_f.shape[0]), int(defaults_i.shape[0])
    out_f = torch.empty((max(nf, 1), b), dtype=torch.float32, device=dev)
    out_i = torch.empty((max(ni, 1), b), dtype=torch.int64, device=dev)
    best_ts = torch.empty(b, dtype=torch.int64, device=dev)
    found = torch.empty(b, dtype=torch.bool, device=dev)
    if not runs or b == 0:
        found.zero_()
        out_f[:nf] = defaults_f[:, None]
        out_i[:ni] = defaults_i[:, None]
        return out_f[:nf].T, out_i[:ni].T, found
    tstream = torch.cuda.current_stream(dev)
    with cuda.gpus[dev.index]:
        stream = _numba_stream(tstream)  # created in dev's context, like the launches
        # Wrap each tensor for Numba once per join, not once per run launch.
        qk, qt, of, oi, bt, fd, df, di = (
            cuda.as_cuda_array(t)
            for t in (
                q_codes,
                q_ts,
                out_f,
                out_i,
                best_ts,
                found,
                defaults_f if nf else _dummy(dev, torch.float32, 1),
                defaults_i if ni else _dummy(dev, torch.int64, 1),
            )
        )
        for r, run in enumerate(runs):
            asof_join(
                *_run_args(run),
                qk,
                qt,
                of,
                oi,
                bt,
                fd,
                defaults_f=df,
                defaults_i=di,
                nf=nf,
                ni=ni,
                ttl=-1 if ttl is None else ttl,
                later_wins=later_wins,
                first=r == 0,
                stream=stream,
            )
            if run.cache.get("stream") != tstream.cuda_stream:
                # The run was built on another stream: keep its memory from being reused by that
                # stream's allocator before this launch has read it.
                for t in (run.ukeys, run.starts, run.ts, run.floats, run.ints):
                    t.record_stream(tstream)
    return out_f[:nf].T, out_i[:ni].T, found
