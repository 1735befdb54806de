"""Regression test from the review of issue 8."""

import io
import os
import sys
import tarfile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import numpy as np

from mmload.plan import EpochOrder, _bijection
from mmload.sources import Dataset


def bad_tar(path):
    with tarfile.open(path, "w") as t:
        for name in ("a0.txt", "b0.txt", "a0.cls", "c0.txt"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            t.addfile(ti, io.BytesIO(b"x"))


def test_bad_entries_duplicated_on_reindex(tmp_path):
    bad_tar(tmp_path / "d-0.tar")
    ds = Dataset.open(str(tmp_path / "d-0.tar"), skip_bad=True, cache_dir=tmp_path / "c")
    st = os.stat(tmp_path / "d-0.tar")
    os.utime(tmp_path / "d-0.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds2 = Dataset.open(str(tmp_path / "d-0.tar"), skip_bad=True, cache_dir=tmp_path / "c")
    assert len(ds2.bad) == len(ds.bad)


def test_partitions_more_than_samples():
    o = EpochOrder(np.array([3]), seed=0, epoch=0, shuffle=None, partitions=8)
    o.full()


def test_bijection():
    for n in [2, 3, 5, 17, 1000, 4097, 65537, 1 << 20]:
        for seed in range(3):
            x = _bijection(seed, 1, 1, n)
            assert np.array_equal(np.sort(x), np.arange(n)), n
