"""s3:// shards against a real S3 API server on loopback (moto's server, via s3fs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmload.errors import ShardError
from mmload.sources import Dataset


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    import boto3  # dev dependencies: s3fs, moto[server] (no skip: a missing one is a failure)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="train")
    try:
        yield client
    finally:
        server.stop()


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
