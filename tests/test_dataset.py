"""mmload.IterableDataset inside torch DataLoader workers: coverage grid, order, stats, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mmload import ConfigError, ImageConfig, IterableDataset, Loader
from mmload.decode.dali import dali_available

SMALL = ImageConfig(size=32)


def _ds(paths: list[str], tmp_path: Path, **kw: Any) -> IterableDataset:
    kw.setdefault("batch_size", 3)
    kw.setdefault("image", SMALL)
    kw.setdefault("cache_dir", tmp_path / "cache")
    return IterableDataset(paths, **kw)


def _run(ds: IterableDataset, workers: int) -> list[list[str]]:
    dl = DataLoader(ds, batch_size=None, num_workers=workers)
    return [list(b["__key__"]) for b in dl]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_coverage_grid_with_real_workers(make_shards, tmp_path: Path, world_size: int) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([7, 1, 12, 4, 9], image=False)  # 33 samples, uneven shards
    for workers in (0, 1, 2):
        seen: Counter[str] = Counter()
        steps = []
        for rank in range(world_size):
            ds = _ds(paths, tmp_path, shuffle=True, seed=4, rank=rank, world_size=world_size)
            batches = _run(ds, workers)
            steps.append(len(batches))
            assert all(len(b) == 3 for b in batches)
            # Same batches, same order as the in-process Loader, for any number of workers.
            with Loader(
                paths,
                batch_size=3,
                shuffle=True,
                seed=4,
                rank=rank,
                world_size=world_size,
                cache_dir=tmp_path / "cache",
            ) as L:
                assert batches == [list(b["__key__"]) for b in L]
            seen.update(k for b in batches for k in b)
            padded = ds.stats()["padded_per_epoch"]
            ds.close()
        assert len(set(steps)) == 1, f"unequal steps {steps}"
        assert set(seen) == set(keys)
        assert sum(seen.values()) == len(keys) + padded


def test_workers_spool_bad_sample_stats(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import tarfile

    paths, keys = make_shards([6, 6])
    with tarfile.open(paths[1]) as t:
        m = [m for m in t.getmembers() if m.name.endswith(".jpg")][4]
    with open(paths[1], "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"garbage!" * 4)
    ds = _ds(paths, tmp_path, on_error="skip", max_bad_samples=4)
    batches = _run(ds, 2)
    assert len(batches) == 4
    stats = ds.stats()
    assert stats["bad_samples"] == 1
    assert stats["bad"][0]["key"] == keys[10]
    assert stats["bad"][0]["shard"] == paths[1]
    assert stats["samples"] == 11 and stats["samples_replaced"] == 1  # unique samples only
    ds.close()


def test_state_dict_and_resume(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([10, 8], image=False)
    ds = _ds(paths, tmp_path, shuffle=True, seed=9)
    full = _run(ds, 2)
    state = ds.state_dict(batches_consumed=2)
    ds2 = _ds(paths, tmp_path, shuffle=True, seed=9)
    ds2.load_state_dict(state)
    assert _run(ds2, 2) == full[2:]
    end = ds.state_dict(batches_consumed=len(full))
    assert (end["epoch"], end["samples_consumed"]) == (1, 0)
    with pytest.raises(ConfigError):
        ds.state_dict(batches_consumed=len(full) + 1)
    ds.set_epoch(1)
    assert _run(ds, 2) != full


def test_cuda_in_workers_is_refused(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA"):
            _ds(*make_shards([3], image=False)[:1], tmp_path, device="cuda")
        return
    ds = _ds(make_shards([3], image=False)[0], tmp_path, device="cuda")
    with pytest.raises(ConfigError, match="worker"):
        _run(ds, 1)


def test_workers_after_the_parent_iterated(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The parent built its DALI decoder first; forked and spawned workers build their own."""
    paths, _ = make_shards([5, 4])
    ds = _ds(paths, tmp_path)
    in_process = _run(ds, 0)
    assert _run(ds, 2) == in_process
    spawned = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    batches = list(spawned)
    assert [list(b["__key__"]) for b in batches] == in_process
    assert batches[0]["jpg"].shape == (3, 3, 32, 32)
    ds.close()


_README_DROP_IN = """
import sys
import torch.utils.data
import mmload

ds = mmload.IterableDataset(sys.argv[1], batch_size=4, image=mmload.ImageConfig(size=32))
# Fork at once: the background DALI import started by the constructor may still be running.
dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
keys = [k for batch in dl for k in batch["__key__"]]
assert sorted(keys) == sorted(set(keys)), keys
print(len(keys), tuple(next(iter(dl))["jpg"].shape))
"""


@pytest.mark.slow
@pytest.mark.skipif(not dali_available(), reason="the race needs DALI installed (it is on CI)")
def test_readme_drop_in_forks_during_the_dali_import(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The README's DataLoader usage with DALI installed and the default backend, forking right
    after construction, in a fresh interpreter (so DALI is not imported yet), several times."""
    _, keys = make_shards([6, 6])
    script = tmp_path / "drop_in.py"
    script.write_text(_README_DROP_IN)
    env = {**os.environ, "MMLOAD_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(3):
        r = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "data-{0000..0001}.tar")],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split()[0] == str(len(keys))
        assert "(4, 3, 32, 32)" in r.stdout
