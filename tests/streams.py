"""Helpers shared by the stream tests: draining a StreamLoader, running the online-training
example under a 2-process torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())
