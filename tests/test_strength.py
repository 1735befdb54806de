"""Behaviours that planted bugs went through unnoticed (issue 15), each checked against an
oracle that does not reuse the code under test: arithmetic by hand, Python's tarfile, torchvision's
formulas."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

import mmload
from mmload.augment import draw_crops
from mmload.config import ErrorPolicy, ImageConfig
from mmload.features import FeatureTable
from mmload.sources.tar import scan_tar


def _tar(path: Path, n: int) -> tuple[int, int]:
    """A tar of n samples; returns (file size, end of the last member's data padding)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            for ext, data in (("bin", bytes([i]) * (100 + i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return path.stat().st_size, end


def test_a_tar_that_ends_at_a_member_end_without_end_blocks_is_truncated(tmp_path: Path) -> None:
    p = tmp_path / "cut.tar"
    size, end = _tar(p, 4)
    assert size >= end + 1024  # tarfile wrote the two end-of-archive blocks
    with open(p, "r+b") as f:
        f.truncate(end)  # cut exactly after the last member: no end-of-archive blocks
    with pytest.raises(mmload.ShardError, match="without the end-of-archive blocks"):
        scan_tar(str(p))
    idx = scan_tar(str(p), skip=True)  # skip: every complete sample is kept, the cut listed
    assert idx.keys == ["s0", "s1", "s2", "s3"]
    assert len(idx.bad) == 1 and "end-of-archive" in idx.bad[0].reason


def test_uint64_query_keys_beyond_int64_are_refused() -> None:
    t = FeatureTable(key="k", timestamp="ts")
    t.update({"k": np.array([1, 2], np.int64), "ts": [0, 0], "x": [1.0, 2.0]})
    ok = t.join(np.array([2**63 - 1, 2], np.uint64), np.array([5, 5]))
    assert ok["x"].tolist() == [0.0, 2.0]  # the largest int64 fits (not found), 2 is found
    with pytest.raises(mmload.JoinError, match="does not fit int64"):
        t.join(np.array([2**63, 2], np.uint64), np.array([5, 5]))


@pytest.mark.parametrize(
    ("hw", "size"), [((300, 500), (224, 224)), ((480, 320), (128, 256)), ((100, 400), (60, 30))]
)
def test_center_crop_window_of_non_square_images_and_outputs(
    hw: tuple[int, int], size: tuple[int, int]
) -> None:
    H, W = hw
    oh, ow = size
    cfg = ImageConfig(size=size, crop="center", flip=False)
    c = draw_crops(np.array([H]), np.array([W]), cfg, seed=0, epoch=0, ids=np.array([0]))
    # By hand: the largest window of the output's aspect ratio, times 0.875, centred.
    s = min(H / oh, W / ow) * 0.875
    h, w = min(max(round(oh * s), 1), H), min(max(round(ow * s), 1), W)
    assert (int(c.h[0]), int(c.w[0])) == (h, w)
    assert (int(c.y0[0]), int(c.x0[0])) == ((H - h) // 2, (W - w) // 2)
    assert not c.flip.any()


@pytest.mark.parametrize(
    ("fraction", "n", "want"), [(0.01, 1000, 10), (0.015, 1000, 15), (0.001, 999, 1), (0.5, 7, 3)]
)
def test_fraction_budget_rounds_down_but_allows_at_least_one(
    fraction: float, n: int, want: int
) -> None:
    assert ErrorPolicy("skip", fraction).budget(n) == want == max(1, math.floor(fraction * n))
    assert ErrorPolicy("skip", 3).budget(n) == 3
    assert ErrorPolicy("raise").budget(n) == 0


def _bad_tar(path: Path, n: int, bad: set[int]) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (
                ("bin", b"x" * 10),
                ("cls", b"oops" if i in bad else str(i).encode()),
            ):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_budget_counts_bad_samples_found_while_indexing(tmp_path: Path) -> None:
    """A sample dropped while indexing (a non-contiguous one) uses up budget, so the decode
    stage may skip only what is left: 1 indexing + 2 decode = 3 > budget 2 raises."""
    p = tmp_path / "a.tar"
    _bad_tar(p, 20, bad={5, 9})  # two bad .cls values: found when decoding
    with tarfile.open(p, "a") as tf:  # sample k001 again, after others: not contiguous
        info = tarfile.TarInfo("k001.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"z"))
    kw = {"batch_size": 4, "on_error": "skip", "cache_dir": tmp_path / "c"}
    with mmload.Loader(str(p), max_bad_samples=3, **kw) as ld:
        list(ld)
        assert ld.stats()["bad_samples"] == 3
    with (
        mmload.Loader(str(p), max_bad_samples=2, **kw) as ld,
        pytest.raises(mmload.DecodeError, match=r"budget|allowed"),
    ):
        list(ld)


def test_budget_share_per_rank_rounds_up(tmp_path: Path) -> None:
    """Budget 5 over 2 ranks: each rank may skip ceil(5 / 2) = 3 of its own samples."""
    p = tmp_path / "b.tar"
    # Two ranks, two partitions: rank 0 reads the first half of the shard (k000..k019).
    _bad_tar(p, 40, bad={0, 2, 4, 6})
    kw = {"batch_size": 4, "on_error": "skip", "max_bad_samples": 5, "cache_dir": tmp_path / "c"}
    with mmload.Loader(str(p), rank=1, world_size=2, **kw) as ld:
        list(ld)
        assert ld.stats()["bad_samples"] == 0
    with (
        mmload.Loader(str(p), rank=0, world_size=2, **kw) as ld,
        pytest.raises(mmload.DecodeError, match="allowed"),
    ):
        list(ld)  # 4 bad > its share of 3
    _bad_tar(p, 40, bad={0, 2, 4})
    with mmload.Loader(str(p), rank=0, world_size=2, **{**kw, "cache_dir": tmp_path / "d"}) as ld:
        list(ld)
        assert ld.stats()["bad_samples"] == 3  # exactly its share
