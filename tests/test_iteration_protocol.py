"""The iteration protocol (issue 17): every sequence of len(), iter(), partial and exact-length
epochs, re-iter and state_dict() a trainer runs gives the batches the plan says, on Loader
(workers 0 and 2) and on IterableDataset in a DataLoader (num_workers 0 and 2).

The oracle is a fresh ``Loader`` iterated to exhaustion epoch by epoch (the plain sequence,
checked against the plan elsewhere): each sequence must yield exactly its batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.data

from mmload import ImageConfig, IterableDataset, Loader

SMALL = ImageConfig(size=16, dtype="float32", backend="pil")


def opts(tmp_path: Path) -> dict[str, Any]:
    return {"batch_size": 4, "image": SMALL, "cache_dir": tmp_path / "c", "shuffle": True}


def keys(batches: list[dict[str, Any]]) -> list[list[str]]:
    return [b["__key__"] for b in batches]


@pytest.fixture
def data(make_shards: Any, tmp_path: Path) -> tuple[list[str], list[list[list[str]]]]:
    """Shards (19 samples: 5 batches of 4, the last padded) and the keys of epochs 0..2."""
    paths, _ = make_shards([10, 9])
    with Loader(paths, **opts(tmp_path)) as ref:
        want = [keys(list(ref)) for _ in range(3)]
    assert want[0] != want[1]
    return paths, want


def exact_len(it: Any, n: int) -> list[dict[str, Any]]:
    return [b for _, b in zip(range(n), it, strict=False)]


# -- Loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_exact_length_epochs(data: Any, tmp_path: Path, workers: int) -> None:
    paths, want = data
    with Loader(paths, workers=workers, **opts(tmp_path)) as ld:
        for e in range(3):
            assert keys(exact_len(ld, len(ld))) == want[e]
            assert ld.state_dict()["epoch"] == e + 1
            assert ld.state_dict()["samples_consumed"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_len_partial_reiter_and_state(data: Any, tmp_path: Path, workers: int) -> None:
    """len() starts nothing; 2 batches, a re-iter that takes 1, state_dict() calls in between,
    the rest; then a whole next epoch; a second loader resumed from the mid-epoch state gets
    exactly the remaining batches."""
    paths, want = data
    with Loader(paths, workers=workers, **opts(tmp_path)) as ld:
        assert len(ld) == 5
        assert ld.stats()["batches"] == 0  # len() did not iterate
        got = exact_len(ld, 2)
        assert ld.state_dict() == ld.state_dict()
        assert ld.state_dict()["samples_consumed"] == 8
        got += exact_len(ld, 1)
        state = ld.state_dict()
        assert state["epoch"] == 0 and state["samples_consumed"] == 12
        got += list(ld)
        assert keys(got) == want[0]
        assert keys(list(ld)) == want[1]
    with Loader(paths, workers=workers, **opts(tmp_path)) as again:
        again.load_state_dict(state)
        assert keys(list(again)) == want[0][3:]
        assert keys(list(again)) == want[1]


# -- IterableDataset in a DataLoader ----------------------------------------------------------


def dataloader(ds: IterableDataset, workers: int) -> torch.utils.data.DataLoader[Any]:
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def test_dataset_in_process_advances_like_loader(data: Any, tmp_path: Path) -> None:
    """num_workers=0: exact-length epochs advance the epoch without set_epoch, a re-iter mid
    epoch resumes after the last batch taken, state_dict(n) counts from where the iteration
    began and agrees with what the next iteration yields."""
    paths, want = data
    ds = IterableDataset(paths, **opts(tmp_path))
    dl = dataloader(ds, 0)
    assert len(dl) == 5
    assert keys(exact_len(dl, len(dl))) == want[0]
    assert ds.state_dict(5) == {**ds.state_dict(5), "epoch": 1, "samples_consumed": 0}
    head = exact_len(dl, 2)
    assert ds.state_dict(2)["samples_consumed"] == 8 and ds.state_dict(2)["epoch"] == 1
    mid = exact_len(dl, 1)  # a new iteration: resumes at batch 2
    st = ds.state_dict(1)
    assert st["epoch"] == 1 and st["samples_consumed"] == 12
    rest = list(dl)
    assert keys(head + mid + rest) == want[1]
    assert keys(list(dl)) == want[2]
    ds.close()
    again = IterableDataset(paths, **opts(tmp_path))
    again.load_state_dict(st)
    assert keys(list(dataloader(again, 0))) == want[1][3:]
    again.close()


def test_dataset_set_epoch_wins(data: Any, tmp_path: Path) -> None:
    paths, want = data
    ds = IterableDataset(paths, **opts(tmp_path))
    dl = dataloader(ds, 0)
    exact_len(dl, 2)
    ds.set_epoch(2)  # the trainer chooses: epoch 2 from its start
    assert keys(list(dl)) == want[2]
    ds.close()


def test_dataset_workers_with_set_epoch(data: Any, tmp_path: Path) -> None:
    """num_workers=2: the trainer calls set_epoch (Lightning does); exact-length epochs give
    each epoch's batches in order; state_dict(n) mid-epoch resumes exactly, with 2 workers or
    none."""
    paths, want = data
    ds = IterableDataset(paths, **opts(tmp_path))
    dl = dataloader(ds, 2)
    for e in range(2):
        ds.set_epoch(e)
        assert len(dl) == 5
        assert keys(exact_len(dl, len(dl))) == want[e]
    ds.set_epoch(2)
    head = exact_len(dl, 3)
    st = ds.state_dict(3)
    assert st == {**st, "epoch": 2, "samples_consumed": 12}
    assert keys(head) == want[2][:3]
    ds.close()
    for workers in (2, 0):
        again = IterableDataset(paths, **opts(tmp_path))
        again.load_state_dict(st)
        assert keys(list(dataloader(again, workers))) == want[2][3:]
        assert again.state_dict(2) == {**st, "epoch": 3, "samples_consumed": 0}
        again.close()


SCRIPT = """
import sys, torch.utils.data
from mmload import ImageConfig, IterableDataset
ds = IterableDataset(sys.argv[1:], batch_size=4, image=ImageConfig(size=16, backend="pil"),
                     shuffle=True, cache_dir=%r)
dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
first = [b["__key__"] for b in dl]
%s
second = [b["__key__"] for b in dl]
print("same" if first == second else "differ")
ds.close()
"""


@pytest.mark.parametrize("choose", [False, True])
def test_dataset_workers_repeat_without_set_epoch_warns(
    data: Any, tmp_path: Path, choose: bool
) -> None:
    """Workers cannot advance the epoch: a second pass without set_epoch repeats the first
    (as DistributedSampler does) and a worker says so on stderr; with set_epoch(1) it is the
    next epoch and nothing is said."""
    paths, _ = data
    code = SCRIPT % (str(tmp_path / "c"), "ds.set_epoch(1)" if choose else "")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == (["differ"] if choose else ["same"])
    warned = "is iterated again from the same point" in proc.stderr
    assert warned is not choose
