"""A real Apache Flink job producing what ``examples/online_train.py`` trains on.

PyFlink (the ``apache-flink`` package bundles Flink's runtime; it needs a Java runtime, e.g.
Debian's ``default-jre-headless``) runs a local mini-cluster job with two rate-limited
``datagen`` sources: impression events and per-user feature updates. Each record is stamped with
the wall-clock time it is produced (the event time) and written by Flink's ``FileSink`` in row
format as JSON lines: a hidden ``.part-*.inprogress.*`` file per bucket, renamed to
``part-<uuid>-<subtask>-<n>.jsonl`` when a checkpoint completes (every ``--checkpoint-ms``),
inside Flink's hourly bucket directories. The job ends after ``--events`` events (its last
checkpoint commits the rest).

``apache-flink`` pins ``pyarrow<21`` and ``numpy<2.2``, so it runs in a venv of its own:

    python3 -m venv .venv-flink && .venv-flink/bin/pip install apache-flink==2.3.0
    .venv-flink/bin/python examples/flink_producer.py --events-dir data/events \\
        --features-dir data/features --events 20000 --rate 1000

Flink's Parquet writer needs jars that are not in the wheel (and Maven Central may be out of
reach), hence JSON lines. This file imports nothing from mmload.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

USERS, ITEMS = 64, 128


def _sink(path: str) -> Any:
    from pyflink.common.serialization import Encoder
    from pyflink.datastream.connectors.file_system import (
        FileSink,
        OutputFileConfig,
        RollingPolicy,
    )

    names = OutputFileConfig.builder().with_part_prefix("part").with_part_suffix(".jsonl").build()
    return (
        FileSink.for_row_format(path, Encoder.simple_string_encoder("UTF-8"))
        .with_output_file_config(names)
        .with_rolling_policy(RollingPolicy.on_checkpoint_rolling_policy())
        .build()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events-dir", required=True)
    ap.add_argument("--features-dir", required=True)
    ap.add_argument("--events", type=int, default=20_000, help="events in all (then it ends)")
    ap.add_argument("--rate", type=int, default=1000, help="events per second")
    ap.add_argument("--feature-rate", type=int, default=64, help="feature updates per second")
    ap.add_argument("--checkpoint-ms", type=int, default=1000)
    args = ap.parse_args()

    from pyflink.common import Configuration, Types
    from pyflink.datastream import (
        CheckpointingMode,
        RuntimeExecutionMode,
        StreamExecutionEnvironment,
    )
    from pyflink.datastream.functions import MapFunction
    from pyflink.table import StreamTableEnvironment

    class ToEvent(MapFunction):  # type: ignore[misc]
        def map(self, row: Any) -> str:
            now = int(time.time() * 1000)
            uid, item = int(row.user_id), int(row.item_id)
            label = int((uid * 31 + item * 17 + int(row.id)) % 7 == 0)
            doc = {
                "__key__": f"e{int(row.id):09d}",
                "user_id": uid,
                "item_id": item,
                "event_ts": now,
                "label": label,
            }
            return json.dumps(doc)

    class ToFeature(MapFunction):  # type: ignore[misc]
        def map(self, row: Any) -> str:
            now = int(time.time() * 1000)
            doc = {"user_id": int(row.user_id), "ts": now, "ctr": float(row.ctr), "feat_ts": now}
            return json.dumps(doc)

    conf = Configuration()
    conf.set_string("parallelism.default", "1")
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_runtime_mode(RuntimeExecutionMode.STREAMING)
    env.enable_checkpointing(args.checkpoint_ms, CheckpointingMode.EXACTLY_ONCE)
    env.set_parallelism(1)
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(
        f"""CREATE TEMPORARY TABLE events (id BIGINT, user_id INT, item_id INT) WITH (
            'connector' = 'datagen', 'rows-per-second' = '{args.rate}',
            'fields.id.kind' = 'sequence', 'fields.id.start' = '0',
            'fields.id.end' = '{args.events - 1}',
            'fields.user_id.min' = '0', 'fields.user_id.max' = '{USERS - 1}',
            'fields.item_id.min' = '0', 'fields.item_id.max' = '{ITEMS - 1}')"""
    )
    # Feature updates for as long as events come: as many seconds' worth as the events take.
    n_features = max(1, args.feature_rate * (args.events // max(1, args.rate) + 2))
    t_env.execute_sql(
        f"""CREATE TEMPORARY TABLE features (user_id INT, ctr DOUBLE) WITH (
            'connector' = 'datagen', 'rows-per-second' = '{args.feature_rate}',
            'number-of-rows' = '{n_features}',
            'fields.user_id.min' = '0', 'fields.user_id.max' = '{USERS - 1}',
            'fields.ctr.min' = '0.0', 'fields.ctr.max' = '1.0')"""
    )
    events = t_env.to_data_stream(t_env.from_path("events"))
    features = t_env.to_data_stream(t_env.from_path("features"))
    events.map(ToEvent(), output_type=Types.STRING()).sink_to(_sink(args.events_dir))
    features.map(ToFeature(), output_type=Types.STRING()).sink_to(_sink(args.features_dir))
    t0 = time.time()
    env.execute("mmload-online-producer")
    print(f"flink job done: {args.events} events in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
