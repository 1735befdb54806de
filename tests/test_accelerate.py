"""Hugging Face Accelerate: a real ``accelerate launch`` of 2 CPU processes (gloo).

The supported way (``mmload.Loader`` through ``Accelerator.prepare()`` unchanged) gives every
sample once per epoch with equal steps per process; a DataLoader over ``mmload.IterableDataset``
given to ``prepare()`` is refused with mmload's error (with 0 and 2 DataLoader workers), and the
launch ends instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("accelerate")  # in the dev extra: installed wherever the suite runs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_train.py"


def _launch(port: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # several processes; Accelerator(cpu=True) makes it gloo on the CPU
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
        str(EXAMPLE),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.dist
def test_loader_through_prepare_two_processes(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([11, 3, 8, 5])  # 27 samples, global batch 8: 5 padded
    report = tmp_path / "report.json"
    proc = _launch(29611, "--shards", *paths, "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert [r["steps"] for r in ranks] == [8, 8]  # 2 epochs x 4 equal steps
    for epoch in range(2):
        seen = Counter(k for r in ranks for k in r["keys"][epoch])
        assert set(seen) == set(keys)
        assert sum(seen.values()) == 32  # 27 once, 5 padding repeats
    assert ranks[0]["keys"][0] != ranks[0]["keys"][1]  # epochs shuffled differently


@pytest.mark.dist
@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_dataloader_is_refused_not_hung(make_shards, tmp_path: Path, workers: int) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([6, 6])
    proc = _launch(
        29612 + workers,
        "--shards",
        *paths,
        "--wrap",
        "--wrap-workers",
        str(workers),
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "mmload.errors.ConfigError" in out
    assert "wrapped by Accelerate's DataLoaderDispatcher" in out


@pytest.mark.dist
def test_prepared_without_dispatch_fails_not_hangs(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dispatch_batches=False: Accelerate's IterableDatasetShard fails on batch_size=None before
    it asks mmload for anything; the launch still ends (no rank waits forever)."""
    paths, _ = make_shards([6, 6])
    proc = _launch(29615, "--shards", *paths, "--wrap", "--no-dispatch", cwd=tmp_path)
    assert proc.returncode != 0
    assert "IterableDatasetShard" in proc.stdout + proc.stderr or "NoneType" in proc.stderr
