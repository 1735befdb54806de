"""Benchmark of the as-of feature join: mmload vs pyarrow hash join and ``join_asof``.

Workload: a feature log of ``--rows`` rows (``--keys`` int64 keys x rows/keys versions, in time
order; features: two float32 scalars, one int64 scalar, one float32[8] vector) and batches of
``--queries`` (key, ts) samples, ~9% of them with unknown keys, at random times. Measured in one
run, on the same data:

* mmload ``FeatureTable.join`` (CPU: torch/NumPy binary searches over sorted runs);
* pyarrow ``Table.join`` (hash join on the key against the latest row per key, built once and
  not timed: the usual shortcut, which ignores sample time);
* pyarrow ``Table.join_asof`` (backward, by key: the point-in-time join, CPU only);
* ingest: one bulk update of the whole log, then ``--updates`` updates of ``--update-rows``
  newer rows each (the LSM merges they trigger included).

Rows/s = queries (or rows ingested) per second; ratios are mmload / baseline. With
``--device cuda`` it also measures the GPU table (cuDF ingest + the Numba as-of kernel) with
host (NumPy) and device-resident queries, and the pure-torch join on the same GPU runs, against
the targets (join >= 500M rows/s, ingest >= 1M rows/s). ``--rows`` keeps it small for a smoke run.

    python benchmarks/join_bench.py [--rows 10000000] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, timed

from mmload.features import FOUND, FeatureTable
from mmload.features.backend import TorchOps
from mmload.features.join import search_runs

JOIN_TARGET = 500e6
INGEST_TARGET = 1e6
STEP = 1_000_000  # ts units between two versions of a key


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="rows in the feature log")
    p.add_argument("--keys", type=int, default=None, help="distinct keys (default rows / 10)")
    p.add_argument("--queries", type=int, default=65_536, help="queries per join batch")
    p.add_argument("--update-rows", type=int, default=100_000)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also save the report as JSON here")
    return p.parse_args(argv)


def feature_log(rng: np.random.Generator, rows: int, keys: int, t0: int) -> pa.Table:
    """``rows`` rows in time order: each round every key gets a version at a random time."""
    versions = -(-rows // keys)
    k = np.tile(np.arange(keys, dtype=np.int64), versions)[:rows]
    rnd = np.repeat(np.arange(versions, dtype=np.int64), keys)[:rows]
    ts = t0 + rnd * STEP + rng.integers(0, STEP, rows)
    order = np.argsort(ts, kind="stable")
    k, ts = k[order], ts[order]
    vec = rng.standard_normal((rows, 8), dtype=np.float32)
    return pa.table(
        {
            "key": k,
            "ts": ts,
            "ctr": rng.random(rows, dtype=np.float32),
            "score": rng.standard_normal(rows, dtype=np.float32),
            "count": rng.integers(0, 1000, rows),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 8),
        }
    )


def queries(rng: np.random.Generator, n: int, keys: int, ts_max: int) -> tuple[np.ndarray, ...]:
    return rng.integers(0, int(keys * 1.1), n), rng.integers(0, ts_max + STEP, n)


def ingest(table: FeatureTable, log: pa.Table, updates: list[pa.Table]) -> dict[str, float]:
    t0 = time.perf_counter()
    table.update(log)
    bulk = log.num_rows / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for u in updates:
        table.update(u)
    if table.device.type == "cuda":
        torch.cuda.synchronize(table.device)
    rows = sum(u.num_rows for u in updates)
    return {"bulk": bulk, "stream": rows / (time.perf_counter() - t0) if rows else 0.0}


def pyarrow_baselines(log: pa.Table, qk: np.ndarray, qt: np.ndarray, repeat: int) -> dict:
    """Rows/s of Table.join (latest row per key) and Table.join_asof, plus join_asof's
    ``ctr`` and found mask for a correctness check."""
    log = log.drop_columns(["emb"])  # Acero joins cannot carry fixed_size_list columns
    by_key = log.group_by("key").aggregate([("ts", "max")]).rename_columns(["key", "ts"])
    latest = by_key.join(log, keys=["key", "ts"], join_type="inner")
    left = pa.table({"key": qk, "ts": qt})

    def hash_join() -> int:
        left.join(latest, keys="key", join_type="left outer")
        return len(qk)

    hash_rate = timed(hash_join, repeat=repeat)
    right = log.sort_by("ts")
    order = np.argsort(qt, kind="stable")
    left_sorted = pa.table({"key": qk[order], "ts": qt[order], "q": order})

    def asof() -> pa.Table:
        return left_sorted.join_asof(right, on="ts", by="key", tolerance=-(2**62))

    result: dict[str, Any] = {}

    def run_asof() -> int:
        result["t"] = asof()
        return len(qk)

    asof_rate = timed(run_asof, repeat=max(1, repeat - 1))
    out = result["t"].sort_by("q")
    ctr = out["ctr"].to_numpy(zero_copy_only=False)
    return {"hash": hash_rate, "asof": asof_rate, "ctr": ctr, "found": ~np.isnan(ctr)}


def gpu_part(
    args: argparse.Namespace,
    log: pa.Table,
    updates: list[pa.Table],
    report: Report,
    qk: np.ndarray,
    qt: np.ndarray,
    cpu_out: dict[str, torch.Tensor],
) -> None:
    table = FeatureTable(key="key", timestamp="ts", device="cuda")
    rates = ingest(table, log, updates)
    for kind, rate in rates.items():
        report.add(
            method=f"mmload ingest ({kind})",
            device="cuda",
            rows_per_s=rate,
            target=INGEST_TARGET,
            meets=rate >= INGEST_TARGET,
        )
    out = table.join(qk, qt)
    same = all(torch.equal(out[k].cpu(), cpu_out[k]) for k in cpu_out)
    dk = torch.from_numpy(qk).cuda()
    dt = torch.from_numpy(qt).cuda()
    snap = table.snapshot()
    kw = {
        "ttl": None,
        "later_wins": True,
        "defaults_f": snap.defaults_f,
        "defaults_i": snap.defaults_i,
    }

    def gpu_rate(fn: Any, iters: int = 50) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return iters * len(qk) / (time.perf_counter() - t0)

    for name, fn in (
        ("mmload join, kernel, host queries", lambda: table.join(qk, qt)),
        ("mmload join, kernel, device queries", lambda: table.join(dk, dt)),
        (
            "torch searchsorted join, device queries",
            lambda: search_runs(TorchOps(dk.device), snap.runs, dk, dt, **kw),
        ),
    ):
        rate = gpu_rate(fn)
        report.add(
            method=name,
            device="cuda",
            rows_per_s=rate,
            target=JOIN_TARGET,
            meets=rate >= JOIN_TARGET,
            runs=len(snap.runs),
            equal_to_cpu=same,
        )
    big = 1 << 20
    bk = torch.randint(0, int(args.keys * 1.1), (big,), device="cuda")
    bt = torch.randint(0, int(qt.max()), (big,), device="cuda")
    rate = gpu_rate(lambda: table.join(bk, bt), iters=10) * big / len(qk)
    report.add(
        method=f"mmload join, kernel, {big} device queries",
        device="cuda",
        rows_per_s=rate,
        target=JOIN_TARGET,
        meets=rate >= JOIN_TARGET,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.keys = args.keys or max(1, args.rows // 10)
    rng = np.random.default_rng(args.seed)
    log = feature_log(rng, args.rows, args.keys, 0)
    ts_max = int(log["ts"].to_numpy().max())
    updates = [
        feature_log(rng, args.update_rows, args.keys, ts_max + (i + 1) * STEP)
        for i in range(args.updates)
    ]
    qk, qt = queries(rng, args.queries, args.keys, ts_max)
    report = Report(
        "as-of feature join",
        {
            "rows": args.rows,
            "keys": args.keys,
            "queries": args.queries,
            "features": "ctr f32, score f32, count i64, emb f32[8]",
            "updates": f"{args.updates} x {args.update_rows} rows",
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
        },
    )
    table = FeatureTable(key="key", timestamp="ts")
    rates = ingest(table, log, [])  # the joins run against the log alone
    report.add(method="mmload ingest (bulk)", device="cpu", rows_per_s=rates["bulk"])
    out = table.join(qk, qt)
    base = pyarrow_baselines(log, qk, qt, args.repeat)
    found = out[FOUND].numpy()
    agree = bool(
        (found == base["found"]).all()
        and np.array_equal(out["ctr"].numpy()[found], base["ctr"][found])
    )

    def mmload_join() -> int:
        table.join(qk, qt)
        return len(qk)

    mm = timed(mmload_join, repeat=args.repeat)
    for name, r in (
        ("pyarrow Table.join (latest per key)", base["hash"]),
        ("pyarrow Table.join_asof", base["asof"]),
    ):
        report.add(method=name, device="cpu", rows_per_s=r["median"])
    report.add(
        method="mmload FeatureTable.join",
        device="cpu",
        rows_per_s=mm["median"],
        vs_hash_join=mm["median"] / base["hash"]["median"],
        vs_join_asof=mm["median"] / base["asof"]["median"],
        equal_to_join_asof=agree,
        runs=len(table.snapshot().runs),
    )
    streaming = FeatureTable(key="key", timestamp="ts")
    streaming.update(log)
    rates = ingest(streaming, log.slice(0, 0), updates)
    report.add(
        method="mmload ingest (stream)",
        device="cpu",
        rows_per_s=rates["stream"],
        runs=len(streaming.snapshot().runs),
    )
    if args.device == "cuda":
        gpu_part(args, log, updates, report, qk, qt, out)
    report.notes.append("rows/s: median of --repeat runs (join_asof: repeat - 1)")
    report.notes.append(
        "pyarrow baselines join the 3 scalar features (no emb: Acero joins "
        "cannot carry fixed_size_list); mmload joins all 4"
    )
    report.print(
        [
            "method",
            "device",
            "rows_per_s",
            "vs_hash_join",
            "vs_join_asof",
            "equal_to_join_asof",
            "equal_to_cpu",
            "runs",
            "target",
            "meets",
        ]
    )
    report.save(args.json)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
