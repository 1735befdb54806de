"""Lightning checkpoints and resumes a ``mmload.Loader`` returned from ``train_dataloader()``
by itself: a run resumed from a mid-epoch checkpoint trains on exactly the batches not yet
seen, on 1 process and with ``strategy="ddp", devices=2, accelerator="cpu"``
(examples/lightning_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="lightning is a dev dependency")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"


def _run(cwd: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data", "data", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(1500)  # two Lightning runs; each may take minutes on a loaded machine
@pytest.mark.parametrize("devices", [1, 2])
def test_lightning_resumes_mid_epoch_exactly(tmp_path: Path, devices: int) -> None:
    _run(tmp_path, "--devices", str(devices), "--every", "5", "--report", "full")
    _run(
        tmp_path,
        "--devices", str(devices),
        "--resume", "lightning-ckpt/epoch=0-step=5.ckpt",
        "--report", "resumed",
    )  # fmt: skip
    seen: Counter[str] = Counter()
    for r in range(devices):
        full = json.loads((tmp_path / f"full-rank{r}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed-rank{r}.json").read_text())
        assert resumed == full[5:], r  # exactly the batches after step 5, in order
        seen.update(k for b in full for k in b["keys"])
    assert len(seen) == 29 + 17 + 38  # every sample, on some rank
    padded = sum(seen.values()) - len(seen)
    assert padded < 4 * devices  # only the last global batch's counted padding repeats


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(1500)  # two Lightning runs; each may take minutes on a loaded machine
@pytest.mark.parametrize("devices", [1, 2])
def test_lightning_every_epoch_sees_every_sample_and_resumes_in_epoch_two(
    tmp_path: Path, devices: int
) -> None:
    steps = -(-(29 + 17 + 38) // (4 * devices))  # per epoch, equal on every rank
    at = steps + 3  # a checkpoint inside the second epoch
    _run(
        tmp_path, "--devices", str(devices), "--epochs", "3", "--every", str(at), "--report", "full"
    )
    _run(
        tmp_path,
        "--devices", str(devices), "--epochs", "3",
        "--resume", f"lightning-ckpt/epoch=1-step={at}.ckpt",
        "--report", "resumed",
    )  # fmt: skip
    per_epoch: dict[int, Counter[str]] = {0: Counter(), 1: Counter(), 2: Counter()}
    orders: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for r in range(devices):
        full = json.loads((tmp_path / f"full-rank{r}.json").read_text())
        assert [b["epoch"] for b in full] == [e for e in range(3) for _ in range(steps)], r
        for b in full:
            per_epoch[b["epoch"]].update(b["keys"])
            orders[b["epoch"]] += b["keys"]
        resumed = json.loads((tmp_path / f"resumed-rank{r}.json").read_text())
        assert resumed == full[at:], r  # the rest of epoch 1, then all of epoch 2
    for e, keys in per_epoch.items():
        assert len(keys) == 29 + 17 + 38, e  # every sample in every epoch
        assert sum(keys.values()) - len(keys) < 4 * devices  # counted padding only
    assert orders[0] != orders[1] != orders[2]  # shuffled anew each epoch
