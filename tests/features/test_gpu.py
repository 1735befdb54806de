"""The GPU table (cuDF ingest, Numba as-of kernel) against the CPU table, on a real GPU.

Every test here needs CUDA and cuDF; they skip themselves on a machine without a GPU (the
simulator tests in test_asof_kernel.py and the torch-backend property tests cover the logic).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmload.features import FOUND, FeatureTable
from mmload.kernels.asof_join import asof_join, asof_join_reference

from .featuredata import check_join, oracle, random_update

pytestmark = pytest.mark.gpu


def both(**kwargs: object) -> tuple[FeatureTable, FeatureTable]:
    cpu = FeatureTable(key="k", timestamp="ts", **kwargs)  # type: ignore[arg-type]
    gpu = FeatureTable(key="k", timestamp="ts", device="cuda", **kwargs)  # type: ignore[arg-type]
    return cpu, gpu


def assert_same(cpu_out: dict[str, torch.Tensor], gpu_out: dict[str, torch.Tensor]) -> None:
    assert cpu_out and list(gpu_out) == list(cpu_out)  # a join returns at least one column
    for name, v in gpu_out.items():
        assert v.device.type == "cuda" and v.is_contiguous(), name
        assert v.dtype == cpu_out[name].dtype and v.shape == cpu_out[name].shape, name
        torch.testing.assert_close(v.cpu(), cpu_out[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("seed", range(12))
def test_gpu_join_equals_cpu_join_and_merge_asof(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = [f"s{i}" for i in range(9)] if seed % 2 else list(range(9))
    ttl = None if seed % 3 else int(rng.integers(0, 10))
    duplicate = "first" if seed % 4 == 1 else "last"
    retention = 15 if seed % 5 == 2 else None
    cpu, gpu = both(ttl=ttl, duplicate=duplicate, retention=retention)
    updates, next_id = [], 0
    for _ in range(int(rng.integers(2, 9))):
        n = int(rng.integers(1, 300))
        u = random_update(rng, next_id, n, keys, 40)
        next_id += n
        cpu.update(u)
        gpu.update(u)
        updates.append(u)
        assert len(gpu.snapshot().runs) == len(cpu.snapshot().runs)
        pool = [*keys, "nobody" if seed % 2 else 99]
        q_keys = [pool[j] for j in rng.integers(0, len(pool), 500)]
        q_ts = rng.integers(-2, 50, 500)
        out = gpu.join(q_keys, q_ts)
        assert_same(cpu.join(q_keys, q_ts), out)
        if retention is None:
            check_join(out, oracle(updates, q_keys, q_ts, ttl=ttl, duplicate=duplicate))
    gpu.compact()
    cpu.compact()
    assert_same(cpu.join(q_keys, q_ts), gpu.join(q_keys, q_ts))


def test_gpu_large_table_device_queries_and_empty_cases() -> None:
    rng = np.random.default_rng(1)
    n, keys = 200_000, 20_000
    table = pa.table(
        {
            "k": rng.integers(0, keys, n),
            "ts": rng.integers(0, 10**9, n),
            "x": rng.random(n, dtype=np.float32),
            "v": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 4)), 4),
            "c": rng.integers(0, 100, n),
        }
    )
    cpu, gpu = both()
    for part in table.to_batches(max_chunksize=25_000):
        cpu.update(part)
        gpu.update(part)
    qk = rng.integers(0, int(keys * 1.1), 65_536)
    qt = rng.integers(0, 10**9, 65_536)
    want = cpu.join(qk, qt)
    assert_same(want, gpu.join(qk, qt))
    assert_same(want, gpu.join(torch.from_numpy(qk).cuda(), torch.from_numpy(qt).cuda()))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # a reader on another stream than the writer
        got = gpu.join(qk, qt)
    side.synchronize()
    assert_same(want, got)
    empty = gpu.join(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty["v"].shape == (0, 4) and empty[FOUND].device.type == "cuda"
    schema = pa.schema([("k", pa.int64()), ("ts", pa.int64()), ("x", pa.float32())])
    fresh = FeatureTable(key="k", timestamp="ts", columns=schema, device="cuda", defaults=3)
    out = fresh.join([1, 2], [5, 5])
    assert out["x"].tolist() == [3.0, 3.0] and not out[FOUND].any()


def test_gpu_update_while_join_never_returns_future_values() -> None:
    table = FeatureTable(key="k", timestamp="ts", device="cuda")
    keys = np.arange(256)
    table.update({"k": keys, "ts": np.zeros(256, np.int64), "value": np.zeros(256, np.int64)})
    stop, errors = threading.Event(), []

    def produce() -> None:  # each step waits for a join since the last: they interleave
        joins = table.stats()["joins"]
        for s in range(1, 200):
            deadline = time.monotonic() + 60
            while table.stats()["joins"] <= joins and time.monotonic() < deadline:
                time.sleep(0.0005)
            joins = table.stats()["joins"]
            ts = np.full(256, 10 * s)
            table.update({"k": keys, "ts": ts, "value": ts})
        stop.set()

    producer = threading.Thread(target=produce)
    producer.start()
    rng = np.random.default_rng(0)
    rounds = 0
    while not stop.is_set():
        rounds += 1
        q_ts = rng.integers(0, 2100, 4096)
        out = table.join(rng.integers(0, 256, 4096), q_ts)
        value = out["value"].cpu().numpy()
        if not (value <= q_ts).all():
            errors.append("future value")
        latest = table.join(keys, np.full(256, 10**9))["value"].cpu().numpy()
        if not (latest == latest[0]).all():
            errors.append("torn snapshot")
    producer.join()
    assert not errors, errors[:3]
    assert rounds >= 100  # the loop ran while the producer updated (it cannot pass empty)


def test_kernel_on_torch_tensors_matches_reference() -> None:
    rng = np.random.default_rng(3)
    ts = np.tile(np.array([1, 5, 9, 13]), 50)
    vals_f = rng.standard_normal((200, 3)).astype(np.float32)
    vals_i = rng.integers(0, 9, (200, 2))
    starts = np.arange(0, 201, 4)
    ukeys = np.arange(50)
    qk, qt = rng.integers(-1, 52, 1000), rng.integers(0, 16, 1000)
    df, di = np.zeros(3, np.float32), np.full(2, -1)
    want = asof_join_reference(
        ukeys, starts, ts, vals_f, vals_i, qk, qt, defaults_f=df, defaults_i=di, ttl=6
    )
    cuda = [torch.from_numpy(a).cuda() for a in (ukeys, starts, ts, vals_f, vals_i, qk, qt)]
    outs = [
        torch.empty((3, 1000), device="cuda"),
        torch.empty((2, 1000), dtype=torch.int64, device="cuda"),
        torch.empty(1000, dtype=torch.int64, device="cuda"),
        torch.empty(1000, dtype=torch.bool, device="cuda"),
    ]
    asof_join(
        *cuda,
        *outs,
        defaults_f=torch.from_numpy(df).cuda(),
        defaults_i=torch.from_numpy(di).cuda(),
        nf=3,
        ni=2,
        ttl=6,
    )
    torch.cuda.synchronize()
    for g, w in zip(outs, want, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), w)
