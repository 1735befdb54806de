"""A real ``torchrun --nproc_per_node=2`` (gloo, CPU) over uneven shards, and an elastic restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrun_train.py"


def _torchrun(nproc: int, *args: str, cwd: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(EXAMPLE),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.dist
def test_two_ranks_take_equal_steps_and_cover_the_data(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([11, 3, 8, 5])  # 27 samples: uneven, not a multiple of 2 x 4
    report = tmp_path / "report.json"
    _torchrun(
        2,
        "--shards",
        *paths,
        "--global-batch",
        "8",
        "--report",
        str(report),
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    r = json.loads(report.read_text())
    ranks = r["ranks"]
    assert [x["steps"] for x in ranks] == [4, 4]
    seen = Counter(k for x in ranks for k in x["keys"])
    assert set(seen) == set(keys)
    padded = ranks[0]["stats"]["samples_padded"]
    assert padded == 32 - 27
    assert sum(seen.values()) == 32
    assert all(x["stats"]["bad_samples"] == 0 for x in ranks)


@pytest.mark.dist
def test_checkpoint_on_two_ranks_resume_on_three(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([13, 9, 14])  # 36 samples
    ckpt, first, second = tmp_path / "ckpt.pt", tmp_path / "a.json", tmp_path / "b.json"
    common = [
        "--shards",
        *paths,
        "--global-batch",
        "6",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--checkpoint",
        str(ckpt),
    ]
    _torchrun(2, *common, "--stop-after", "2", "--report", str(first), cwd=tmp_path)
    _torchrun(3, *common, "--resume", "--report", str(second), cwd=tmp_path)
    a = [k for x in json.loads(first.read_text())["ranks"] for k in x["keys"]]
    b_ranks = json.loads(second.read_text())["ranks"]
    b = [k for x in b_ranks for k in x["keys"]]
    assert len(a) == 12
    assert len({x["steps"] for x in b_ranks}) == 1
    assert sorted(a + b) == sorted(keys), "every sample exactly once across the restart"
