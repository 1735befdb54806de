"""Regression test from the review of issue 8."""

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import pytest
from review_common import write_tar

import mmload
from mmload.errors import ConfigError


def test_failed_load_state_dict_leaves_loader_broken(tmp_path):
    paths = []
    for s in range(4):
        p = tmp_path / f"d-{s}.tar"
        write_tar(p, [f"k{s}_{i}" for i in range(6)])
        paths.append(str(p))

    def mk(W):
        return mmload.Loader(
            paths, batch_size=2, rank=0, world_size=W, fields=["txt"], cache_dir=tmp_path / "c"
        )

    st = mk(3).state_dict()  # partitions=3 (4 shards < 16*3)
    L = mk(2)
    with pytest.raises(ConfigError):
        L.load_state_dict(st)  # 2 does not divide 3: rejected, fine
    next(iter(L))  # but the loader is now unusable
