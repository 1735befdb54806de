"""One harness for every benchmark: environment record, timing, and a printed/JSON table.

Every result row carries the benchmark's configuration; every report carries the hardware and
library versions, so numbers are never separated from what produced them. A benchmark compares
against its baseline in the same run and prints the ratio.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report", "environment", "timed"]


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Hardware and versions of everything that shapes the numbers."""
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": _gpu(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            m: _version(m)
            for m in (
                "mmload",
                "torch",
                "numpy",
                "pyarrow",
                "nvidia.dali",
                "webdataset",
                "PIL",
                "numba",
                "cudf",
            )
        },
    }


def timed(fn: Callable[[], int], *, repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Run ``fn`` (returns items processed) ``warmup + repeat`` times; best/median items/s."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    rates.sort()
    return {"best": rates[-1], "median": rates[len(rates) // 2], "runs": len(rates)}


@dataclass
class Report:
    """A named set of result rows plus the environment, printed as a table and saved as JSON."""

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def print(self, columns: Iterable[str]) -> None:
        cols = list(columns)
        env = environment()
        print(f"\n== {self.name} ==")
        print(
            f"hardware: {env['cpu']} x{env['cpus']} (affinity {env['affinity']}); gpu: {env['gpu']}"
        )
        print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
        print("config: " + json.dumps(self.config, sort_keys=True))
        widths = [max(len(c), *(len(_fmt(r.get(c))) for r in self.rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in self.rows:
            print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))
        for n in self.notes:
            print(f"note: {n}")

    def save(self, path: str | None) -> None:
        if not path:
            return
        payload = {
            "name": self.name,
            "config": self.config,
            "environment": environment(),
            "rows": self.rows,
            "notes": self.notes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
