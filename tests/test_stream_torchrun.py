"""A real producer process commits event and feature part files while a real 2-process torchrun
trains on them (examples/online_train.py), is stopped mid-stream with a checkpoint, and resumes
while files keep arriving: every committed event is trained on exactly once (apart from counted
padding), both ranks take equal steps, and no joined feature is newer than its event.

The producer holds after 20 of its 40 files until the first run has stopped, so files arrive after
the stop however slowly a loaded machine starts the trainers; the waits for a new file are long
enough that a slow producer is not taken for the end of the stream."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.streams import train_online

ROOT = Path(__file__).resolve().parents[1]
PRODUCER = ROOT / "examples" / "stream_producer.py"


@pytest.mark.dist
@pytest.mark.slow
def test_online_training_restarts_mid_stream_exactly_once(tmp_path: Path) -> None:
    gate = tmp_path / "resume-producer"
    producer = subprocess.Popen(
        [
            sys.executable,
            str(PRODUCER),
            "--events",
            str(tmp_path / "events"),
            "--features",
            str(tmp_path / "features"),
            "--parts",
            "40",
            "--rows",
            "50",
            "--interval",
            "0.25",
            "--log",
            str(tmp_path / "committed.jsonl"),
            "--pause-after",
            "20",
            "--resume-when",
            str(gate),
        ]
    )
    try:
        while not (tmp_path / "events").is_dir():
            time.sleep(0.05)
        first = train_online(tmp_path, "--stop-after", "12", "--max-wait", "10")
        committed_at_stop = len((tmp_path / "committed.jsonl").read_text().splitlines())
        gate.touch()
        second = train_online(tmp_path, "--resume", "--max-wait", "10")
    finally:
        gate.touch()
        producer.wait(timeout=120)
    log = [json.loads(x) for x in (tmp_path / "committed.jsonl").read_text().splitlines()]
    assert len(log) == 40 and committed_at_stop <= 20  # files arrived after the stop

    want = Counter(f"e{p:06d}-{i:05d}" for p in range(40) for i in range(50))
    got: Counter[str] = Counter()
    padded = 0
    for run in (first, second):
        steps = [r["steps"] for r in run["ranks"]]
        assert steps[0] == steps[1] and steps[0] > 0  # equal steps
        padded += run["ranks"][0]["stats"]["samples_padded"]
        r0, r1 = (r["seen"] for r in run["ranks"])
        # step by step, both ranks joined against the same feature version (from the ledger)
        assert [s["feature_version"] for s in r0] == [s["feature_version"] for s in r1]
        for r in run["ranks"]:
            for s in r["seen"]:
                got.update(s["keys"])
                for e, f, ok in zip(s["event_ts"], s["feat_ts"], s["found"], strict=True):
                    assert not ok or f <= e  # never a feature value from the event's future
    assert first["ranks"][0]["steps"] == 12
    assert set(got) == set(want)  # none lost
    assert sum(got.values()) == sum(want.values()) + padded  # none twice beyond counted padding
    assert padded < 32 * second["ranks"][0]["stats"]["windows_cut"]  # < a global batch a window
    # late="wait": a window is cut once the features' watermark passed its events, so only the
    # last window (no feature file after it) may join early
    early = [
        e for run in (first, second) for r in run["ranks"] for s in r["seen"] for e in s["early"]
    ]
    assert sum(early) <= 2 * 50 + 32
