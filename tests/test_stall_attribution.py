"""stats() attributes the trainer's waiting to the stage that starves it (issue 11, item 4).

A stage is made slow on purpose (a sleep in the read or in the batch decode); the trainer's
own step is fast, so it waits, and ``bottleneck`` must name that stage. With a slow trainer
and a fast loader nothing starves it after the first batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import mmload
from mmload.decode.batch import BatchDecoder
from mmload.sources import Dataset


def loader(paths: list[str], tmp_path: Path) -> mmload.Loader:
    return mmload.Loader(paths, batch_size=4, image_fields=[], cache_dir=tmp_path / "c", prefetch=2)


@pytest.mark.parametrize("slow", ["read", "decode"])
def test_the_slow_stage_is_named(
    slow: str, make_shards: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, _ = make_shards([16, 16], image=False)
    target, name = (Dataset, "read") if slow == "read" else (BatchDecoder, "finish")
    real = getattr(target, name)

    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.03)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, slowed)
    with loader(paths, tmp_path) as ld:
        assert sum(len(b["__key__"]) for b in ld) == 32
        st = ld.stats()
    assert st["bottleneck"] == slow
    assert st["seconds"]["wait"] > 0.5 * 8 * 0.03  # 8 batches, each behind by most of a sleep
    assert st["stage_wait"][slow] >= 0.5 * st["seconds"]["wait"]


def test_a_slow_trainer_is_not_starved(make_shards: Any, tmp_path: Path) -> None:
    paths, _ = make_shards([16, 16], image=False)
    with loader(paths, tmp_path) as ld:
        it = iter(ld)
        next(it)  # the first batch always waits for the pipeline to fill
        waited_before = ld.stats()["seconds"]["wait"]
        for _ in it:
            time.sleep(0.05)
        st = ld.stats()
    assert st["seconds"]["wait"] - waited_before < 0.01 * st["seconds"]["elapsed"] + 0.02
