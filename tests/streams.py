"""Helpers shared by the stream tests: draining a StreamLoader, ranks reading in step in
threads, running the online-training example under a 2-process torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmload.errors import StreamIdle

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "online_train.py"


def drain(it: Any) -> list[dict[str, Any]]:
    """Batches until the stream goes idle."""
    out = []
    try:
        for b in it:
            out.append(b)
    except StreamIdle:
        pass
    return out


def train_online(tmp: Path, *args: str) -> dict[str, Any]:
    """examples/online_train.py on 2 torchrun ranks over ``tmp``/events and ``tmp``/features
    (global batch 32, checkpoint ``tmp``/ckpt.pt); its JSON report."""
    report = tmp / f"report-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TRAIN),
        "--events",
        str(tmp / "events"),
        "--features",
        str(tmp / "features"),
        "--global-batch",
        "32",
        "--checkpoint",
        str(tmp / "ckpt.pt"),
        "--report",
        str(report),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())


class Ranks:
    """``world`` StreamLoaders (``make(rank)``) read in threads, in step as a trainer's
    all-reduce keeps ranks, until the stream goes idle. ``join()`` re-raises a rank's error;
    then ``batches[r]`` is rank r's ``(window, keys)`` per step and ``stats[r]`` its stats()."""

    def __init__(self, make: Callable[[int], Any], world: int = 2) -> None:
        self.batches: dict[int, list[tuple[int, list[str]]]] = {r: [] for r in range(world)}
        self.stats: dict[int, dict[str, Any]] = {}
        self._errors: list[BaseException] = []
        self._barrier = threading.Barrier(world)
        self._make = make
        self._threads = [threading.Thread(target=self._rank, args=(r,)) for r in range(world)]
        for t in self._threads:
            t.start()

    def _rank(self, r: int) -> None:
        try:
            with self._make(r) as sl:
                it = iter(sl)
                while True:
                    try:
                        b = next(it)
                    except StreamIdle:
                        break
                    self.batches[r].append((sl.window, list(b["__key__"])))
                    self._barrier.wait(timeout=10)
                self.stats[r] = sl.stats()
        except BaseException as e:  # noqa: BLE001 - re-raised by join()
            self._errors.append(e)
            self._barrier.abort()

    def join(self, timeout: float = 60.0) -> Ranks:
        for t in self._threads:
            t.join(timeout=timeout)
        if self._errors:
            raise self._errors[0]
        return self
