"""A stand-in streaming job: commits impression events and per-user feature updates as Parquet
part files, the way Flink's FileSink does (write a hidden in-progress file, rename it).

    python examples/stream_producer.py --events data/events --features data/features \\
        --parts 50 --rows 200 --interval 0.2

Events: ``__key__`` (unique), ``user_id``, ``item_id``, ``event_ts`` (ms, increasing),
``label`` (a click, more likely when the user's current ``ctr`` is high). Features, committed
before the events they describe: ``user_id``, ``ts`` (ms), ``ctr`` and ``feat_ts`` (= ``ts``, so
a trainer can check that no joined value is newer than its event). ``examples/online_train.py``
trains on them while this runs. With ``--log`` it writes one JSON line per committed events file
(name, rows, commit time), which the tests use to check exactly-once consumption. With
``--pause-after N --resume-when PATH`` it stops after N events files until PATH exists (a test
holds the stream there while a trainer stops and restarts, whatever the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

USERS = 64
ITEMS = 128


def commit(table: pa.Table, directory: str, name: str) -> None:
    """Write ``table`` under a hidden in-progress name, then rename it into place (the commit)."""
    hidden = os.path.join(directory, f".{name}.inprogress.{os.getpid()}")
    pq.write_table(table, hidden)
    os.rename(hidden, os.path.join(directory, name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--parts", type=int, default=50, help="events part files to commit")
    ap.add_argument("--rows", type=int, default=200, help="events per part file")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between commits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", help="append a JSON line per committed events file here")
    ap.add_argument(
        "--pause-after",
        type=int,
        help="after this many events files, wait until the --resume-when file exists",
    )
    ap.add_argument("--resume-when", help="the file whose creation ends the pause")
    args = ap.parse_args()
    if (args.pause_after is None) != (args.resume_when is None):
        ap.error("--pause-after and --resume-when go together")
    os.makedirs(args.events, exist_ok=True)
    os.makedirs(args.features, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    ctr = rng.random(USERS).astype(np.float32) * 0.5
    t_ms = 1_700_000_000_000
    for part in range(args.parts):
        # The users' features as of now, committed before the events that follow them.
        ctr = np.clip(ctr + rng.normal(0, 0.05, USERS).astype(np.float32), 0.01, 0.99)
        ts = np.full(USERS, t_ms, dtype=np.int64)
        feats = pa.table(
            {"user_id": np.arange(USERS, dtype=np.int64), "ts": ts, "ctr": ctr, "feat_ts": ts}
        )
        commit(feats, args.features, f"features-{part:06d}.parquet")
        n = args.rows
        users = rng.integers(0, USERS, n)
        event_ts = t_ms + 1 + np.sort(rng.integers(0, 1000, n))
        events = pa.table(
            {
                "__key__": [f"e{part:06d}-{i:05d}" for i in range(n)],
                "user_id": users.astype(np.int64),
                "item_id": rng.integers(0, ITEMS, n).astype(np.int64),
                "event_ts": event_ts.astype(np.int64),
                "label": (rng.random(n) < ctr[users]).astype(np.int64),
            }
        )
        name = f"part-{part:06d}.parquet"
        commit(events, args.events, name)
        if args.log:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"file": name, "rows": n, "committed_at": time.time()}) + "\n")
        t_ms += 1000
        if part + 1 == args.pause_after:
            while not os.path.exists(args.resume_when):
                time.sleep(0.05)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
