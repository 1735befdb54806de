"""The next epoch prepared ahead (workers=0): when an epoch is decoded, its successor's stage
chain starts, so the trainer does not wait at the boundary. Oracles: a fresh loader set to that
epoch (same batches), stats() (nothing of an epoch nobody started), and set_epoch/resume
(a chain prepared for something else is dropped)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mmload import ImageConfig, Loader

SMALL = ImageConfig(size=16, dtype="float32", backend="pil")


def loader(paths: list[str], tmp_path: Path, **kw: Any) -> Loader:
    kw = {"batch_size": 4, "image": SMALL, "cache_dir": tmp_path / "c", "shuffle": True} | kw
    return Loader(paths, **kw)


def wait_for_ahead(ld: Loader, deadline: float = 20.0) -> None:
    """Until the next epoch's chain exists and holds a batch (condition, not a sleep)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline:
        ahead = ld._ahead
        if ahead is not None and not ahead[3]._queue.empty():
            return
        time.sleep(0.01)
    raise AssertionError("the next epoch was not prepared ahead")


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [x["__key__"] for x in a] == [y["__key__"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["jpg"], y["jpg"]) and torch.equal(x["cls"], y["cls"])


def test_next_epoch_is_ready_and_exact(make_shards: Any, tmp_path: Path) -> None:
    paths, _ = make_shards([10, 9])
    with loader(paths, tmp_path) as ld:
        list(ld)
        wait_for_ahead(ld)
        assert ld._ahead is not None and ld._ahead[0] == 1
        got = list(ld)
    with loader(paths, tmp_path) as ref:
        ref.set_epoch(1)
        same(got, list(ref))


def test_a_prepared_epoch_counts_nothing_until_it_begins(make_shards: Any, tmp_path: Path) -> None:
    """A bad sample of epoch 1 decoded ahead is listed only once epoch 1 is iterated."""
    import tarfile

    paths, keys = make_shards([8])
    with tarfile.open(paths[0]) as t:
        m = [m for m in t.getmembers() if m.name.endswith(".jpg")][3]
    with open(paths[0], "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"NOTAJPEG" * 4)
    with loader(paths, tmp_path, on_error="skip", max_bad_samples=1) as ld:
        list(ld)
        wait_for_ahead(ld)
        st = ld.stats()
        assert [b["key"] for b in st["bad"]] == [keys[3]]
        assert st["samples_replaced"] == 1
        list(ld)  # epoch 1: its own budget of 1, not exceeded
        st = ld.stats()
        assert [b["key"] for b in st["bad"]] == [keys[3], keys[3]]
        assert st["samples_replaced"] == 2 and st["samples"] == 2 * 7


def test_a_prepared_epoch_is_dropped_for_another_request(make_shards: Any, tmp_path: Path) -> None:
    paths, _ = make_shards([10, 9])
    with loader(paths, tmp_path) as ld:
        state = ld.state_dict()
        list(ld)
        wait_for_ahead(ld)
        ld.set_epoch(5)
        got5 = list(ld)
        wait_for_ahead(ld)
        ld.load_state_dict(state)  # back to epoch 0 from its start
        got0 = list(ld)
    with loader(paths, tmp_path) as ref:
        want0 = list(ref)
        ref.set_epoch(5)
        same(got5, list(ref))
    same(got0, want0)


def test_the_last_batch_completes_the_epoch(make_shards: Any, tmp_path: Path) -> None:
    """A loop of exactly len() steps never exhausts the generator (Lightning's, and many
    hand-written loops): the next iteration is still the next epoch, whole, and state_dict()
    after the last batch agrees with it."""
    paths, _ = make_shards([10, 9])
    with loader(paths, tmp_path) as ref:
        want = [list(ref) for _ in range(3)]
    with loader(paths, tmp_path) as ld:
        got = []
        for _ in range(3):
            epoch = [b for _, b in zip(range(len(ld)), ld, strict=False)]
            assert ld.state_dict()["epoch"] == len(got) + 1
            assert ld.state_dict()["samples_consumed"] == 0
            got.append(epoch)
    for g, w in zip(got, want, strict=True):
        same(g, w)


def test_set_epoch_after_the_last_batch_wins(make_shards: Any, tmp_path: Path) -> None:
    paths, _ = make_shards([10, 9])
    with loader(paths, tmp_path) as ld:
        it = iter(ld)
        for _ in range(len(ld)):
            next(it)
        ld.set_epoch(4)
        assert next(it, None) is None  # the old epoch's generator ends...
        assert ld.epoch == 4  # ...without overriding the epoch the user chose
        got = list(ld)
    with loader(paths, tmp_path) as ref:
        ref.set_epoch(4)
        same(got, list(ref))


def test_reiter_mid_epoch_resumes_where_it_stopped(make_shards: Any, tmp_path: Path) -> None:
    """Breaking out after batch 3 and iterating again continues the same epoch at batch 3
    (what state_dict() said), for in-process and worker-process loaders alike; len() and
    state_dict() calls in between change nothing."""
    paths, _ = make_shards([10, 9])
    with loader(paths, tmp_path) as ref:
        whole = list(ref)
    for workers in (0, 2):
        with loader(paths, tmp_path, workers=workers) as ld:
            head = []
            for b in ld:
                head.append(b)
                if len(head) == 3:
                    break
            assert ld.state_dict()["samples_consumed"] == 3 * 4
            assert len(ld) == len(whole)
            rest = list(ld)
            assert ld.state_dict() == ld.state_dict() and ld.state_dict()["epoch"] == 1
        same(head + rest, whole)
