"""The as-of kernel (simulator here, the GPU when there is one) vs its NumPy reference, the
reference vs the table's torch join, and the kernel's sm_90 PTX."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from numba import cuda

from mmload.features.backend import NumpyOps, TorchOps
from mmload.features.join import search_runs
from mmload.features.runs import Run, make_run, merge
from mmload.kernels._device import SIMULATOR
from mmload.kernels.asof_join import asof_join, asof_join_reference

NP = NumpyOps()
TORCH = TorchOps(torch.device("cpu"))  # the GPU table's code path, run on CPU tensors


def random_run(rng: np.random.Generator, n: int, keys: int, nf: int, ni: int) -> Run:
    codes = rng.integers(0, keys, n)
    ts = rng.integers(0, 20, n)
    floats = rng.standard_normal((n, nf)).astype(np.float32)
    ints = rng.integers(-99, 99, (n, ni))
    run, _ = make_run(NP, codes, ts, floats, ints, keep="last", cutoff=None)
    assert run is not None
    return run


def to_torch(run: Run) -> Run:
    fields = ("codes", "ts", "floats", "ints", "ukeys", "starts")
    return dataclasses.replace(run, **{f: torch.from_numpy(getattr(run, f)) for f in fields})


def host(run: Run) -> tuple[np.ndarray, ...]:
    vf = run.floats if run.floats.shape[1] else np.zeros((1, 1), np.float32)
    vi = run.ints if run.ints.shape[1] else np.zeros((1, 1), np.int64)
    return run.ukeys, run.starts, run.ts, vf, vi


def kernel_join(runs, q_keys, q_ts, defaults_f, defaults_i, ttl, later_wins):
    b, nf, ni = len(q_keys), len(defaults_f), len(defaults_i)
    outs = [
        cuda.device_array((max(nf, 1), b), np.float32),
        cuda.device_array((max(ni, 1), b), np.int64),
        cuda.device_array(b, np.int64),
        cuda.device_array(b, np.bool_),
    ]
    df = cuda.to_device(defaults_f if nf else np.zeros(1, np.float32))
    di = cuda.to_device(defaults_i if ni else np.zeros(1, np.int64))
    qk, qt = cuda.to_device(q_keys), cuda.to_device(q_ts)
    for r, run in enumerate(runs):
        arrays = [cuda.to_device(a) for a in host(run)]
        asof_join(
            *arrays,
            qk,
            qt,
            *outs,
            defaults_f=df,
            defaults_i=di,
            nf=nf,
            ni=ni,
            ttl=ttl,
            later_wins=later_wins,
            first=r == 0,
        )
    out_f, out_i, best, found = (o.copy_to_host() for o in outs)
    return out_f[:nf], out_i[:ni], best, found


def reference_join(runs, q_keys, q_ts, defaults_f, defaults_i, ttl, later_wins):
    prev = None
    for run in runs:
        prev = asof_join_reference(
            *host(run),
            q_keys,
            q_ts,
            defaults_f=defaults_f,
            defaults_i=defaults_i,
            ttl=ttl,
            later_wins=later_wins,
            prev=prev,
        )
    assert prev is not None
    return prev


@pytest.mark.parametrize(
    ("seed", "nf", "ni", "ttl", "later_wins"),
    [(0, 2, 1, -1, True), (1, 1, 0, 3, True), (2, 0, 2, -1, False), (3, 3, 1, 0, False)],
)
def test_kernel_matches_reference(seed: int, nf: int, ni: int, ttl: int, later_wins: bool) -> None:
    rng = np.random.default_rng(seed)
    runs = [random_run(rng, int(rng.integers(1, 30)), 6, nf, ni) for _ in range(3)]
    b = 40
    q_keys = rng.integers(-1, 8, b)  # codes -1, 6, 7 are in no run
    q_ts = rng.integers(-2, 24, b)
    defaults_f = np.arange(nf, dtype=np.float32) + 0.5
    defaults_i = np.arange(ni, dtype=np.int64) - 5
    got = kernel_join(runs, q_keys, q_ts, defaults_f, defaults_i, ttl, later_wins)
    want = reference_join(runs, q_keys, q_ts, defaults_f, defaults_i, ttl, later_wins)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert want[3].any() and not want[3].all()  # the draw exercises both branches


def test_kernel_with_no_queries_writes_nothing() -> None:
    run = random_run(np.random.default_rng(5), 10, 3, 1, 1)
    got = kernel_join(
        [run],
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros(1, np.float32),
        np.zeros(1, np.int64),
        -1,
        True,
    )
    assert [g.shape for g in got] == [(1, 0), (1, 0), (0,), (0,)]


def test_launcher_names_a_bad_argument() -> None:
    run = random_run(np.random.default_rng(6), 10, 3, 2, 1)
    arrays = [cuda.to_device(a) for a in host(run)]
    q = cuda.to_device(np.zeros(4, np.int64))
    outs = [
        cuda.device_array((2, 4), np.float32),
        cuda.device_array((1, 4), np.int64),
        cuda.device_array(4, np.int64),
        cuda.device_array(4, np.bool_),
    ]
    kw = {
        "defaults_f": cuda.to_device(np.zeros(2, np.float32)),
        "defaults_i": cuda.to_device(np.zeros(1, np.int64)),
        "nf": 2,
        "ni": 1,
    }
    with pytest.raises(ValueError, match="q_ts"):
        asof_join(*arrays, q, cuda.to_device(np.zeros(4, np.int32)), *outs, **kw)
    with pytest.raises(ValueError, match="nf"):
        asof_join(*arrays, q, q, *outs, **{**kw, "nf": 3})
    bad = [cuda.device_array((2, 5), np.float32), *outs[1:]]
    with pytest.raises(ValueError, match="out_f"):
        asof_join(*arrays, q, q, *bad, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_table_join(seed: int) -> None:
    """Three implementations, one semantics: the reference vs the torch join over merged and
    unmerged runs (the table joins whatever runs its LSM holds)."""
    rng = np.random.default_rng(100 + seed)
    runs = [random_run(rng, int(rng.integers(1, 200)), 20, 2, 1) for _ in range(3)]
    b = 300
    q_keys = rng.integers(-1, 22, b)
    q_ts = rng.integers(-2, 24, b)
    ttl = int(rng.integers(-1, 6))
    df, di = np.array([1.5, -2.0], np.float32), np.array([7], np.int64)
    want = reference_join(runs, q_keys, q_ts, df, di, ttl, True)
    merged, _ = merge(NP, runs[0], runs[1], keep="last", cutoff=None)
    assert merged is not None
    for ops, layout in (
        (NP, runs),
        (NP, [merged, runs[2]]),
        (TORCH, [to_torch(r) for r in runs]),
    ):
        cast = torch.from_numpy if ops is TORCH else np.asarray
        floats, ints, found = search_runs(
            ops,
            tuple(layout),
            cast(q_keys),
            cast(q_ts),
            ttl=None if ttl < 0 else ttl,
            later_wins=True,
            defaults_f=cast(df),
            defaults_i=cast(di),
        )
        np.testing.assert_array_equal(np.asarray(floats).T, want[0])
        np.testing.assert_array_equal(np.asarray(ints).T, want[1])
        np.testing.assert_array_equal(np.asarray(found), want[3])


_PTX = textwrap.dedent(
    """
    import json
    import numba.cuda

    def refuse(*args, **kwargs):
        raise AssertionError("cuda.jit called while importing the kernel module")

    jit = numba.cuda.jit
    numba.cuda.jit = refuse
    import mmload.kernels.asof_join as m
    numba.cuda.jit = jit
    out = {}
    for name, fn, sig in m.kernel_signatures():
        ptx, _ = numba.cuda.compile_ptx(fn, sig, cc=(9, 0))
        body = [l.strip() for l in ptx.splitlines() if not l.strip().startswith("//")]
        out[name] = {"sm_90": ".target sm_90" in ptx, "f64": [l for l in body if ".f64" in l]}
    print(json.dumps(out))
    """
)


def test_kernel_compiles_to_sm90_ptx() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run(
        [sys.executable, "-c", _PTX], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"asof_join"}
    assert result["asof_join"]["sm_90"]
    assert not result["asof_join"]["f64"]


@pytest.mark.skipif(not SIMULATOR, reason="on a GPU, test_gpu.py runs join_cuda for real")
@pytest.mark.parametrize("columns", ["both", "floats_only"])
def test_gpu_join_glue_runs_the_kernel_under_the_simulator(
    monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    """``gpu.join_cuda`` (argument order, the per-run ``first`` flag, dummies for a missing
    kind, output transposes) driving the real kernel in the simulator over several LSM runs,
    against the CPU join. CUDA-only plumbing (streams, device contexts) is stubbed."""
    from mmload.features import FOUND, FeatureTable
    from mmload.features import gpu as gpu_mod
    from mmload.features.join import assemble

    monkeypatch.setattr(cuda, "as_cuda_array", lambda t: t.numpy(), raising=False)
    monkeypatch.setattr(cuda, "gpus", {None: contextlib.nullcontext()}, raising=False)
    monkeypatch.setattr(gpu_mod, "_numba_stream", lambda s: 0)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda dev=None: types.SimpleNamespace(cuda_stream=0)
    )
    rng = np.random.default_rng(9)
    cpu = FeatureTable(key="k", timestamp="ts", ttl=6, duplicate="first")
    dev = FeatureTable(key="k", timestamp="ts", ttl=6, duplicate="first")
    dev._ops = TORCH
    for i in range(4):
        n = 30 - 6 * i
        data = {
            "k": rng.integers(0, 8, n),
            "ts": rng.integers(0, 20, n),
            "x": rng.random(n),
            "v": rng.random((n, 2)),
        }
        if columns == "both":
            data["c"] = rng.integers(0, 50, n)
        cpu.update(data)
        dev.update(data)
    runs = dev.snapshot().runs
    assert len(runs) > 1
    for r in runs:
        r.cache["stream"] = 0
    q_keys, q_ts = rng.integers(-1, 10, 40), rng.integers(-1, 25, 40)
    snap = dev.snapshot()
    floats, ints, found = gpu_mod.join_cuda(
        runs,
        torch.from_numpy(q_keys),
        torch.from_numpy(q_ts),
        ttl=6,
        later_wins=False,
        defaults_f=snap.defaults_f,
        defaults_i=snap.defaults_i,
    )
    assert snap.layout is not None
    got = assemble(snap.layout, floats, ints, found)
    want = cpu.join(q_keys, q_ts)
    assert list(got) == list(want) and want[FOUND].any() and not want[FOUND].all()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
