"""The join benchmark runs end to end on a tiny table and agrees with pyarrow's join_asof."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "join_bench.py"


def test_join_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--rows", "20000", "--queries", "2000", "--updates", "2", "--update-rows", "500"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--repeat", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    for method in ("mmload FeatureTable.join", "pyarrow Table.join_asof", "mmload ingest"):
        assert method in text
    assert "AMD" in text or "Intel" in text or "hardware:" in text
    assert out.exists()
