"""Online training from a real Flink job: events/s produced and consumed, and the latency from an
event's time to the batch that holds it, against the latency to its commit (the floor).

A PyFlink mini-cluster (examples/flink_producer.py, from ``.venv-flink``) commits JSON-lines
event and feature part files on each checkpoint; in this process a ``StreamLoader`` with a
``LedgerSource`` feature join reads them as they are committed. A watcher thread notes when each
committed file first appears, so each event has three times: its event time (stamped by the
Flink job), its commit (the file's appearance: nothing can read it sooner), and the batch that
holds it. One row per feature policy (``late="wait"``: cut a window once the features' watermark
passed its events; ``late="join"``: join what is there).

    .venv-flink/bin/pip install apache-flink==2.3.0   # once; Java needed
    python benchmarks/online_flink.py --events 6000 --rate 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

ROOT = Path(__file__).resolve().parents[1]


def watch(root: Path, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each committed part file first appears."""
    while not stop.is_set():
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            for f in files:
                if f.startswith("part-") and f.endswith(".jsonl"):
                    seen.setdefault(os.path.join(dirpath, f), time.time())
        stop.wait(0.005)


def one_run(args: argparse.Namespace, late: str) -> dict[str, Any]:
    import mmload
    from mmload.features import FeatureTable
    from mmload.features.ledger import LedgerSource

    tmp = Path(tempfile.mkdtemp(prefix="mmload-flink-"))
    ev, ft = tmp / "events", tmp / "features"
    ev.mkdir()
    ft.mkdir()
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(ev, seen, stop), daemon=True)
    watcher.start()
    t_start = time.time()
    producer = subprocess.Popen(
        [
            str(args.flink_python),
            str(ROOT / "examples" / "flink_producer.py"),
            "--events-dir",
            str(ev),
            "--features-dir",
            str(ft),
            "--events",
            str(args.events),
            "--rate",
            str(args.rate),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("ts", pa.int64()),
            ("ctr", pa.float32()),
            ("feat_ts", pa.int64()),
        ]
    )
    table = FeatureTable(key="user_id", timestamp="ts", columns=schema)
    got: list[tuple[float, list[int], list[bool]]] = []
    with (
        LedgerSource(ft, table, sequencer=True, poll_interval=0.02) as source,
        mmload.StreamLoader(
            ev,
            batch_size=args.batch,
            max_wait_s=args.idle,
            poll_s=0.02,
            fields=["user_id", "item_id", "event_ts", "label"],
            features=mmload.FeatureJoin(
                table, key="user_id", timestamp="event_ts", late=late, max_wait_s=5.0
            ),
            feature_source=source,
        ) as stream,
    ):
        t_first = None
        while True:  # until the job has ended and the stream has been idle for args.idle s
            try:
                for b in stream:
                    now = time.time()
                    t_first = t_first or now
                    got.append((now, b["event_ts"].tolist(), b["__features_early__"].tolist()))
            except mmload.StreamIdle:
                if producer.poll() is not None:
                    break
        stats = stream.stats()
    out, _ = producer.communicate(timeout=60)
    stop.set()
    if producer.returncode != 0:
        raise SystemExit(f"flink job failed:\n{out[-3000:]}")
    # When each event was committed: the appearance of the file that holds it.
    committed: list[int] = []
    for path, t in seen.items():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    committed.append(round(t * 1000) - json.loads(line)["event_ts"])
    to_batch = [t * 1000 - e for t, es, _ in got for e in es]
    n = sum(len(es) for _, es, _ in got)
    t_last = got[-1][0] if got else time.time()
    commit_span = max(seen.values()) - min(seen.values()) if seen else 0.0
    early = sum(sum(x) for _, _, x in got)
    pct = np.percentile
    return {
        "policy": f"late={late!r}",
        "events": args.events,
        "produced_per_s": round(args.events / max(1e-9, commit_span), 1),
        "consumed_per_s": round(n / max(1e-9, t_last - (t_first or t_last)), 1),
        "commit_ms_p50": round(float(pct(committed, 50))),
        "commit_ms_p99": round(float(pct(committed, 99))),
        "batch_ms_p50": round(float(pct(to_batch, 50))),
        "batch_ms_p99": round(float(pct(to_batch, 99))),
        "added_ms_p50": round(float(pct(to_batch, 50) - pct(committed, 50))),
        "early_joins": early,
        "windows": stats["windows_cut"],
        "samples": stats["samples"],
        "wall_s": round(time.time() - t_start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--rate", type=int, default=500, help="events per second")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--idle", type=float, default=6.0, help="seconds without a file: done")
    ap.add_argument("--flink-python", type=Path, default=ROOT / ".venv-flink" / "bin" / "python")
    ap.add_argument("--json", help="save the report here")
    args = ap.parse_args()
    flink = subprocess.run(
        [
            str(args.flink_python),
            "-c",
            "import importlib.metadata as m; print(m.version('apache-flink'))",
        ],
        capture_output=True,
        text=True,
    )
    rep = Report(
        "Online training from a Flink job: throughput and event-to-batch latency",
        {
            "events": args.events,
            "rate": args.rate,
            "batch": args.batch,
            "flink": flink.stdout.strip() or "missing",
            "checkpoint_ms": 1000,
            "format": "JSON lines, FileSink row format, committed on checkpoint",
        },
    )
    for late in ("wait", "join"):
        rep.add(**one_run(args, late))
    rep.notes.append(
        "commit_ms: event time -> its file's commit (the floor: nothing reads a file sooner); "
        "batch_ms: event time -> the batch that holds it; added_ms: the difference at p50"
    )
    rep.print(list(rep.rows[0]))
    rep.save(args.json)


if __name__ == "__main__":
    main()
