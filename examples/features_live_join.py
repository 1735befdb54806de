"""A streaming job writes feature part files; training batches join them as of each sample.

A producer thread plays the streaming job: every 50 ms it commits a Parquet part file the way
Flink's FileSink does (write a hidden ".part-N.inprogress" file, then rename it). A
``DirectorySource`` tails the directory into a ``FeatureTable``; the "training loop" joins each
batch of (user, sample time) as of the sample time, as the Loader does for every batch.
Run: ``python examples/features_live_join.py``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmload.features import FeatureTable
from mmload.features.directory import DirectorySource

USERS = 1000


def streaming_job(out_dir: str, stop: threading.Event) -> None:
    rng = np.random.default_rng(0)
    for part in range(1_000_000):
        if stop.is_set():
            return
        now_ms = int(time.time() * 1000)
        users = rng.choice(USERS, 200, replace=False)
        table = pa.table(
            {
                "user": [f"user-{u}" for u in users],
                "ts": pa.array(np.full(200, now_ms), pa.timestamp("ms")),
                "clicks_5m": rng.poisson(3, 200),
                "ctr_5m": rng.random(200, dtype=np.float32),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.standard_normal(200 * 4, dtype=np.float32)), 4
                ),
            }
        )
        hidden = os.path.join(out_dir, f".part-{part}.inprogress")
        pq.write_table(table, hidden)
        os.rename(hidden, os.path.join(out_dir, f"part-{part}.parquet"))
        time.sleep(0.05)


def main() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        table = FeatureTable(key="user", timestamp="ts", ttl=2_000, retention=10_000)
        stop = threading.Event()
        job = threading.Thread(target=streaming_job, args=(out_dir, stop), daemon=True)
        job.start()
        rng = np.random.default_rng(1)
        with DirectorySource(out_dir, table, poll_interval=0.1):
            time.sleep(0.5)
            for step in range(20):
                users = [f"user-{u}" for u in rng.integers(0, USERS, 256)]
                sample_ms = np.full(256, int(time.time() * 1000)) - rng.integers(0, 300, 256)
                batch = table.join(users, sample_ms)  # what the Loader adds to each batch
                found = batch["__features_found__"]
                print(
                    f"step {step:2d}: found {int(found.sum()):3d}/256, "
                    f"clicks_5m {batch['clicks_5m'].float().mean():.2f}, "
                    f"embedding {tuple(batch['embedding'].shape)}"
                )
                time.sleep(0.1)
            stop.set()
            stats = table.stats()
        print(
            f"rows {stats['rows']}, updates {stats['updates_applied']}, "
            f"errors {stats['update_errors']}, feature lag {stats['feature_lag']} ms"
        )


if __name__ == "__main__":
    main()
