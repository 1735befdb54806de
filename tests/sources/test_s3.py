"""s3:// shards against a real S3 API server on loopback (moto's server, via s3fs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmload.errors import ShardError
from mmload.sources import Dataset
from tests.remote import servers

moto_s3 = servers.moto_s3  # moto's S3 server on loopback (tests/remote/servers.py)


@pytest.fixture
def s3_bucket(moto_s3: Any) -> Any:
    moto_s3.create_bucket(Bucket="train")
    return moto_s3


def test_s3_shards_by_braces_and_glob(make_shards, s3_bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([3, 4])
    for p in paths:
        s3_bucket.upload_file(p, "train", f"wds/{Path(p).name}")  # type: ignore[attr-defined]
    ds = Dataset.open("s3://train/wds/data-{0000..0001}.tar", cache_dir=tmp_path / "c1")
    got = ds.read(np.arange(7))
    assert [s["__key__"] for s in got] == keys  # type: ignore[index]
    local = Dataset.open(paths, index_cache=False).read(np.arange(7))
    assert all(g["jpg"] == r["jpg"] for g, r in zip(got, local, strict=True))  # type: ignore[index]
    globbed = Dataset.open("s3://train/wds/data-*.tar", cache_dir=tmp_path / "c2")
    assert [s.url for s in globbed.specs] == [f"s3://train/wds/{Path(p).name}" for p in paths]


def test_s3_missing_object(s3_bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShardError) as e:
        Dataset.open("s3://train/nothing.tar", cache_dir=tmp_path / "c")
    assert "s3://train/nothing.tar" in str(e.value)
