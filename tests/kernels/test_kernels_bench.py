"""benchmarks/kernels_bench.py imports cleanly and exits 0 without measuring when it cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_bench.py"


def _run(*args: str, sim: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dry_run_prints_the_plan_and_exits_0() -> None:
    proc = _run("--dry-run", "--batch", "8", sim=False)
    assert proc.returncode == 0, proc.stderr
    assert "dry run, nothing measured" in proc.stdout
    assert "'batch': 8" in proc.stdout


def test_without_a_usable_gpu_it_says_so_and_exits_0() -> None:
    # The simulator stands in for "no GPU" on any machine: the script must refuse to time it.
    proc = _run(sim=True)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU to measure on" in proc.stdout
