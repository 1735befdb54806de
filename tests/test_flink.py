"""A real Apache Flink job (PyFlink local mini-cluster, examples/flink_producer.py) commits event
and feature part files while a real 2-process torchrun trains on them (examples/online_train.py);
the trainer is stopped mid-stream and resumed while Flink keeps committing. Every event Flink
committed is trained on exactly once (apart from counted padding), both ranks take equal steps
and join the same feature version at every step, and no joined feature is newer than its event.

PyFlink pins ``pyarrow<21`` and ``numpy<2.2``: it runs from its own venv, ``.venv-flink`` at the
repository root, created here when missing (``pip install apache-flink``); it needs Java
(``.ci/run`` installs Debian's ``default-jre-headless`` when ``java`` is missing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.streams import train_online

ROOT = Path(__file__).resolve().parents[1]
FLINK_VENV = ROOT / ".venv-flink"
FLINK_PY = FLINK_VENV / "bin" / "python"
PRODUCER = ROOT / "examples" / "flink_producer.py"


@pytest.fixture(scope="module")
def flink_python() -> Path:
    if shutil.which("java") is None:
        pytest.skip("no Java runtime: install one (apt-get install default-jre-headless)")
    ok = FLINK_PY.exists() and (
        subprocess.run([str(FLINK_PY), "-c", "import pyflink"], capture_output=True).returncode == 0
    )
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", str(FLINK_VENV)], check=True)
        pip = subprocess.run(
            [str(FLINK_PY), "-m", "pip", "install", "-q", "apache-flink==2.3.0"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if pip.returncode != 0:
            pytest.skip(f"apache-flink could not be installed: {pip.stderr[-500:]}")
    return FLINK_PY


def _committed_keys(events: Path) -> Counter[str]:
    keys: Counter[str] = Counter()
    for dirpath, dirnames, files in os.walk(events):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        for f in files:
            if f.startswith("part-") and f.endswith(".jsonl"):
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    keys.update(json.loads(line)["__key__"] for line in fh if line.strip())
    return keys


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(1500)  # Flink's start, two torchrun runs: minutes on a loaded machine
def test_flink_job_feeds_online_training_exactly_once(flink_python: Path, tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "features").mkdir()
    n = 3000
    producer = subprocess.Popen(
        [
            str(flink_python),
            str(PRODUCER),
            "--events-dir",
            str(tmp_path / "events"),
            "--features-dir",
            str(tmp_path / "features"),
            "--events",
            str(n),
            "--rate",
            "250",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The trainer starts with Flink (a JVM), whose first commit may take long on a loaded
        # machine: the waits for a next file are generous. The second run ends when no file
        # has come for --max-wait seconds after Flink finished; a shorter wait would end it
        # early if Flink paused that long while starved.
        first = train_online(tmp_path, "--stop-after", "15", "--max-wait", "120")
        still_running = producer.poll() is None
        second = train_online(tmp_path, "--resume", "--max-wait", "30")
        out, _ = producer.communicate(timeout=120)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, out[-3000:]
    assert still_running  # the restart happened while Flink was still committing
    want = _committed_keys(tmp_path / "events")
    assert len(want) == n and sum(want.values()) == n  # Flink committed each event once

    got: Counter[str] = Counter()
    padded = 0
    for run in (first, second):
        r0, r1 = (r["seen"] for r in run["ranks"])
        assert len(r0) == len(r1) > 0  # equal steps
        assert [s["feature_version"] for s in r0] == [s["feature_version"] for s in r1]
        padded += run["ranks"][0]["stats"]["samples_padded"]
        for r in run["ranks"]:
            for s in r["seen"]:
                got.update(s["keys"])
                for e, f, ok in zip(s["event_ts"], s["feat_ts"], s["found"], strict=True):
                    assert not ok or f <= e  # never a feature value from the event's future
    assert first["ranks"][0]["steps"] == 15
    assert set(got) == set(want)  # none lost
    assert sum(got.values()) == n + padded  # none twice beyond the counted padding
