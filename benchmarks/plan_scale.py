"""The plan at scale: 10 million shards x 1,000 samples, rank 1,023 of 1,024, worker 7 of 8,
resumed mid-epoch — time and memory to the first batch's sample ids and this worker's shard
needs, against the plan of the commit before the partitioned order (same process).

    python benchmarks/plan_scale.py [--shards 10000000 --per-shard 1000]

Memory is the peak of what the plan allocates (tracemalloc, which NumPy reports to), on top of
the per-shard sample counts it is given (the manifest's column, 8 bytes a shard).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

BASELINE_COMMIT = "a30e67f"  # main before the partitioned order (issue 8)


class _Chunks:
    """What ``remote_needs`` reads of a Dataset: the chunk table and which shards are remote."""

    def __init__(self, counts: np.ndarray) -> None:
        self.chunk_start = np.concatenate([[0], np.cumsum(counts)])
        self.chunk_shard = None  # one chunk per shard: the chunk is the shard
        self.remote = np.ones(1, dtype=bool)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunk = np.searchsorted(self.chunk_start, ids, side="right") - 1
        return chunk, chunk, ids - self.chunk_start[chunk]


class _AllRemote:
    def __getitem__(self, idx: Any) -> Any:
        return np.ones(np.shape(idx), dtype=bool)


def new_plan(counts: np.ndarray, rank: int, world: int, worker: int, workers: int) -> dict:
    from mmload.config import ShuffleConfig
    from mmload.pipeline import default_partitions, remote_needs
    from mmload.plan import EpochOrder, Schedule, World

    ds = _Chunks(counts)  # the Dataset's chunk table: built when the manifest is read
    ds.remote = _AllRemote()  # type: ignore[assignment]
    t0 = time.perf_counter()
    P = default_partitions(len(counts), world)
    order = EpochOrder(counts, seed=1, epoch=3, shuffle=ShuffleConfig(), partitions=P)
    n = order.num_samples
    batch = 256
    g = batch * world
    start = (n // 2) // g * g  # resumed in the middle of the epoch
    sched = Schedule(n, batch_size=batch, world_size=world, start=start)
    w = World(rank, world, worker, workers)
    k = next(iter(sched.worker_batches(w)))
    ids = order[sched.positions(rank, k)]
    t_ids = time.perf_counter() - t0
    needs = remote_needs(ds, order, sched, w)  # type: ignore[arg-type]
    return {
        "partitions": P,
        "ids": ids,
        "first_batch_s": t_ids,
        "total_s": time.perf_counter() - t0,
        "needs": len(needs),
    }


def old_plan(counts: np.ndarray, rank: int, world: int, worker: int, workers: int) -> dict:
    src = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:mmload/plan.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("old_plan", f.name)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_plan"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    from mmload.config import ShuffleConfig

    t0 = time.perf_counter()
    order = mod.EpochOrder(counts, seed=1, epoch=3, shuffle=ShuffleConfig())
    n = order.num_samples
    batch = 256
    g = batch * world
    start = (n // 2) // g * g
    sched = mod.Schedule(n, batch_size=batch, world_size=world, start=start)
    w = mod.World(rank, world, worker, workers)
    k = next(iter(sched.worker_batches(w)))
    ids = order[sched.positions(rank, k)]
    return {"ids": ids, "first_batch_s": time.perf_counter() - t0, "total_s": None, "needs": None}


def measure(fn: Any, *args: Any) -> dict:
    tracemalloc.start()
    try:
        out = fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out["peak_mb"] = peak / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000_000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--world", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    counts = np.full(a.shards, a.per_shard, dtype=np.int64)
    rank, worker = a.world - 1, a.workers - 1
    rep = Report(
        "Plan at scale: first batch of the last rank's last worker, resumed mid-epoch",
        {
            "shards": a.shards,
            "samples_per_shard": a.per_shard,
            "rank": f"{rank} of {a.world}",
            "worker": f"{worker} of {a.workers}",
            "batch": 256,
            "shuffle": "ShuffleConfig() (interleave 32)",
            "counts_input_mb": round(counts.nbytes / 2**20, 1),
        },
    )
    new = measure(new_plan, counts, rank, a.world, worker, a.workers)
    rep.add(
        plan=f"mmload (partitioned, P={new['partitions']})",
        first_batch_s=new["first_batch_s"],
        with_shard_needs_s=new["total_s"],
        peak_mb=new["peak_mb"],
        shard_needs=new["needs"],
    )
    if not a.no_baseline:
        old = measure(old_plan, counts, rank, a.world, worker, a.workers)
        rep.add(
            plan=f"mmload {BASELINE_COMMIT} (before)",
            first_batch_s=old["first_batch_s"],
            with_shard_needs_s=None,
            peak_mb=old["peak_mb"],
            shard_needs=None,
        )
        rep.notes.append(f"ratio first batch: {old['first_batch_s'] / new['first_batch_s']:.2f}x")
    assert len(np.unique(new["ids"])) == len(new["ids"]) == 256
    rep.notes.append(
        "shard_needs: this worker's (shard, first batch, last batch) list for the rest of the "
        "epoch, which feeds the cache's look-ahead"
    )
    rep.print(["plan", "first_batch_s", "with_shard_needs_s", "peak_mb", "shard_needs"])
    rep.save(a.json)


if __name__ == "__main__":
    main()
