"""Shared test setup: GPU detection, the Numba CUDA simulator, and small data builders.

Without a GPU the Numba CUDA simulator is switched on (before numba.cuda is imported anywhere),
so kernels run against their NumPy references on the CPU; ``gpu``-marked tests skip themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_GPU = _has_gpu()
if not HAS_GPU:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- data builders ------------------------------------------------------------------------------

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


@pytest.fixture(scope="session")
def jpegs() -> list[bytes]:
    """32 small real-photo JPEGs (random crops of scikit-image photos), sizes 40..80 px."""
    from mmload.demo import load_photos, make_jpeg

    photos = load_photos()
    rng = np.random.default_rng(0)
    out = []
    for i in range(32):
        w, h = int(rng.integers(40, 81)), int(rng.integers(40, 81))
        out.append(make_jpeg(photos[i % len(photos)][1], rng, (w, h)))
    return out


ShardMaker = Callable[..., tuple[list[str], list[str]]]


@pytest.fixture
def make_shards(tmp_path: Path, jpegs: list[bytes]) -> ShardMaker:
    """Write tar shards with webdataset's ShardWriter: one per entry of ``counts``.

    Each sample has ``jpg``, ``cls`` (its global index mod 10) and ``txt``; returns
    (shard paths, keys in data set order).
    """
    import webdataset as wds

    def make(
        counts: Sequence[int], name: str = "data", image: bool = True
    ) -> tuple[list[str], list[str]]:
        paths, keys = [], []
        i = 0
        for s, c in enumerate(counts):
            path = str(tmp_path / f"{name}-{s:04d}.tar")
            with wds.TarWriter(path) as w:
                for _ in range(c):
                    key = f"s{s:03d}_{i:06d}"
                    sample = {
                        "__key__": key,
                        "cls": str(i % 10).encode(),
                        "txt": f"caption {i}".encode(),
                    }
                    if image:
                        sample["jpg"] = jpegs[i % len(jpegs)]
                    w.write(sample)
                    keys.append(key)
                    i += 1
            paths.append(path)
        return paths, keys

    return make


@pytest.fixture
def flight_call_options(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The keyword arguments of every ``pyarrow.flight.FlightCallOptions`` made during the test
    (pyarrow gives no way to read a call's deadline back)."""
    import pyarrow.flight as flight

    made: list[dict[str, object]] = []
    real = flight.FlightCallOptions

    def options(**kw: object) -> object:
        made.append(kw)
        return real(**kw)

    monkeypatch.setattr(flight, "FlightCallOptions", options)
    return made
