"""Whole-object fetching of remote shards (mmload.sources.fetch) against loopback servers:
byte-exact downloads, recovery from each fault, resume with Range, bounded failure."""

from __future__ import annotations

import gzip
import logging
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mmload.config import RemoteConfig
from mmload.errors import ShardError
from mmload.sources.fetch import (
    FETCH_STATS,
    FetchStats,
    RemoteObject,
    download,
    stat_remote,
)
from tests.remote import servers
from tests.remote.servers import (
    Drop,
    Fault,
    FileServer,
    PlainServer,
    Redirect,
    Replace,
    Short,
    Stall,
    Status,
    etag_of,
)

flaky_fs = servers.flaky_fs
moto_s3 = servers.moto_s3
plain_server = servers.plain_server
range_server = servers.range_server

pytestmark = pytest.mark.timeout(60)

SIZE = 1_500_000
K = 300_000  # where body faults strike
FAST = RemoteConfig(
    connect_timeout=2.0, read_timeout=0.5, retries=3, backoff=0.01, backoff_max=0.05
)


def payload(n: int = SIZE, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def no_temps(d: Path) -> bool:
    return not list(d.glob(".fetch-*"))


def delta(before: dict[str, int]) -> dict[str, int]:
    now = FETCH_STATS.snapshot()
    return {k: now[k] - before[k] for k in now}


# -- byte-exact downloads -----------------------------------------------------------------------


def test_range_server_exact(range_server: FileServer, tmp_path: Path) -> None:
    data = payload()
    url = range_server.put("a.bin", data)
    dest = tmp_path / "out" / "a.bin"
    before = FETCH_STATS.snapshot()
    got = download(url, dest, FAST)
    assert dest.read_bytes() == data
    assert got == RemoteObject(SIZE, etag_of(data))
    assert stat_remote(url, FAST) == got
    assert delta(before) == {"bytes": SIZE, "requests": 2, "retries": 0}
    assert [(s.method, s.range, s.sent) for s in range_server.log("a.bin")] == [
        ("GET", None, SIZE),
        ("HEAD", None, 0),
    ]
    assert no_temps(dest.parent)


def test_plain_server_exact(plain_server: PlainServer, tmp_path: Path) -> None:
    data = payload(seed=1)
    url = plain_server.put("a.bin", data)
    got = download(url, tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert got.size == SIZE and got.version  # no ETag: the Last-Modified date
    assert stat_remote(url, FAST) == got


def test_s3_exact(moto_s3: Any, tmp_path: Path) -> None:
    data = payload(seed=2)
    moto_s3.put_object(Bucket="remote", Key="x/a.bin", Body=data)
    etag = moto_s3.head_object(Bucket="remote", Key="x/a.bin")["ETag"].strip('"')
    got = download("s3://remote/x/a.bin", tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert got == RemoteObject(SIZE, etag)
    assert stat_remote("s3://remote/x/a.bin", FAST) == got
    with pytest.raises(ShardError, match="changed since it was indexed"):
        download("s3://remote/x/a.bin", tmp_path / "b.bin", FAST, expect=RemoteObject(SIZE, "0"))
    for call in (
        lambda: download("s3://remote/x/nothing.bin", tmp_path / "c.bin", FAST),
        lambda: stat_remote("s3://remote/x/nothing.bin", FAST),
    ):
        with pytest.raises(ShardError, match="shard not found") as e:
            call()
        assert "s3://remote/x/nothing.bin" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_local_file_and_pipe(tmp_path: Path) -> None:
    data = payload(seed=3)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    st = src.stat()
    want = RemoteObject(SIZE, str(st.st_mtime_ns))
    assert stat_remote(str(src), FAST) == want
    assert download("file://" + str(src), tmp_path / "o1", FAST) == want
    assert (tmp_path / "o1").read_bytes() == data
    assert download(f"pipe:cat {src}", tmp_path / "o2", FAST) == RemoteObject(SIZE, None)
    assert (tmp_path / "o2").read_bytes() == data
    with pytest.raises(ShardError, match="shard not found"):
        download(str(tmp_path / "nothing"), tmp_path / "o3", FAST)
    with pytest.raises(ShardError, match="exited with 1"):
        download("pipe:false", tmp_path / "o4", FAST)
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
    assert no_temps(tmp_path)


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [Drop(K), Short(K), Stall(K, 30.0), Status(500), Status(503), Status(429)],
    ids=["drop", "short", "stall", "500", "503", "429"],
)
def test_fault_recovers_byte_exact(
    range_server: FileServer, tmp_path: Path, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(seed=4)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", fault)
    before = FETCH_STATS.snapshot()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmload.sources.fetch"):
        got = download(url, tmp_path / "a.bin", FAST)
    assert time.monotonic() - t0 < 10
    assert (tmp_path / "a.bin").read_bytes() == data
    assert got == RemoteObject(SIZE, etag_of(data))
    log = range_server.log("a.bin")
    assert len(log) == 2
    if isinstance(fault, Status):
        assert log[0].status == fault.code and log[1].range is None and log[1].status == 200
    else:  # resumed at the offset reached, guarded by the ETag
        m = re.fullmatch(r"bytes=(\d+)-", log[1].range or "")
        assert m is not None and 0 < int(m.group(1)) <= K
        assert log[1].status == 206 and log[1].if_range == f'"{etag_of(data)}"'
    assert range_server.sent("a.bin") < 2 * SIZE
    assert delta(before)["retries"] == 1
    retries = [r for r in caplog.records if r.name == "mmload.sources.fetch"]
    assert [r.levelno for r in retries] == [logging.WARNING] and url in retries[0].getMessage()


def test_resume_from_exact_offset(range_server: FileServer, tmp_path: Path) -> None:
    data = payload(seed=5)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", Short(K))
    before = FETCH_STATS.snapshot()
    download(url, tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [(s.range, s.status, s.sent) for s in range_server.log("a.bin")] == [
        (None, 200, K),
        (f"bytes={K}-", 206, SIZE - K),
    ]
    assert delta(before) == {"bytes": SIZE, "requests": 2, "retries": 1}


def test_server_without_range_rereads_after_drop(range_server: FileServer, tmp_path: Path) -> None:
    range_server.ranges = False
    data = payload(seed=6)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", Drop(K), Short(2 * K))
    download(url, tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    log = range_server.log("a.bin")
    assert [s.status for s in log] == [200, 200, 200]
    assert log[0].range is None and log[1].range is not None and log[2].range is not None
    assert int(log[2].range.split("=")[1].rstrip("-")) == 2 * K  # asked; got the whole object


def test_stall_shorter_than_read_timeout_is_no_failure(
    range_server: FileServer, tmp_path: Path
) -> None:
    data = payload(seed=7)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", Stall(K, 0.2))
    download(url, tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert len(range_server.log("a.bin")) == 1


def test_stalls_fail_fast_when_retries_run_out(range_server: FileServer, tmp_path: Path) -> None:
    url = range_server.put("a.bin", payload(seed=8))
    range_server.script("a.bin", Stall(K, 30.0), Stall(10, 30.0))
    cfg = RemoteConfig(read_timeout=0.5, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"after 2 attempts: .*(timed out|Timeout)") as e:
        download(url, tmp_path / "a.bin", cfg)
    assert time.monotonic() - t0 < 10  # two 0.5 s read timeouts, not the 30 s stalls
    assert url in str(e.value)
    assert not (tmp_path / "a.bin").exists() and no_temps(tmp_path)


def test_retries_exhausted_names_url_attempts_and_error(
    range_server: FileServer, tmp_path: Path
) -> None:
    url = range_server.put("a.bin", payload(seed=9))
    range_server.script("a.bin", *[Status(503)] * 10)
    before = FETCH_STATS.snapshot()
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"cannot fetch shard after 4 attempts: HTTP 503") as e:
        download(url, tmp_path / "a.bin", FAST)
    assert time.monotonic() - t0 < 5
    assert url in str(e.value)
    assert len(range_server.log("a.bin")) == 4
    assert delta(before)["retries"] == 3
    assert not (tmp_path / "a.bin").exists() and no_temps(tmp_path)


def test_connection_refused_is_retried_then_fails(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.bin"
    t0 = time.monotonic()
    with pytest.raises(ShardError, match="after 4 attempts: ConnectionRefusedError"):
        download(url, tmp_path / "a.bin", FAST)
    with pytest.raises(ShardError, match="cannot stat shard after 4 attempts"):
        stat_remote(url, FAST)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "a.bin").exists() and no_temps(tmp_path)


def test_404_and_403_fail_at_once(range_server: FileServer, tmp_path: Path) -> None:
    before = FETCH_STATS.snapshot()
    missing = range_server.url_for("missing.bin")
    with pytest.raises(ShardError, match=r"shard not found \(HTTP 404") as e:
        download(missing, tmp_path / "a.bin", FAST)
    assert missing in str(e.value)
    with pytest.raises(ShardError, match="shard not found"):
        stat_remote(missing, FAST)
    url = range_server.put("a.bin", payload(seed=10))
    range_server.script("a.bin", Status(403), Status(403))
    with pytest.raises(ShardError, match=r"access denied \(HTTP 403"):
        download(url, tmp_path / "a.bin", FAST)
    assert len(range_server.log("missing.bin")) == 2 and len(range_server.log("a.bin")) == 1
    assert delta(before)["retries"] == 0
    assert not (tmp_path / "a.bin").exists() and no_temps(tmp_path)


def test_failed_download_leaves_existing_dest_alone(
    range_server: FileServer, tmp_path: Path
) -> None:
    url = range_server.put("a.bin", payload(seed=11))
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    range_server.script("a.bin", Drop(K), Short(K))
    with pytest.raises(ShardError, match="after 2 attempts: short body"):
        download(url, dest, RemoteConfig(read_timeout=0.5, retries=1, backoff=0.01))
    assert dest.read_bytes() == b"old" and no_temps(tmp_path)


def test_redirect_is_followed(range_server: FileServer, tmp_path: Path) -> None:
    data = payload(seed=12)
    range_server.put("b.bin", data)
    range_server.script("a.bin", Redirect("/b.bin"))
    download(range_server.url_for("a.bin"), tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data


def test_stat_falls_back_to_ranged_get_when_head_is_refused(
    range_server: FileServer,
) -> None:
    data = payload(seed=13)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", Status(405))
    assert stat_remote(url, FAST) == RemoteObject(SIZE, etag_of(data))
    assert [(s.method, s.status, s.range) for s in range_server.log("a.bin")] == [
        ("HEAD", 405, None),
        ("GET", 206, "bytes=0-0"),
    ]


def test_retry_after_is_honoured_up_to_backoff_max(
    range_server: FileServer, tmp_path: Path
) -> None:
    url = range_server.put("a.bin", payload(seed=14))
    range_server.script("a.bin", Status(503, retry_after="1"))
    t0 = time.monotonic()
    download(url, tmp_path / "a.bin", RemoteConfig(retries=1, backoff=0.01, backoff_max=2.0))
    assert time.monotonic() - t0 >= 0.9
    range_server.script("a.bin", Status(429, retry_after="100"))
    t0 = time.monotonic()
    download(url, tmp_path / "b.bin", FAST)  # backoff_max 0.05 caps it
    assert time.monotonic() - t0 < 10  # not the 100 s asked for


# -- changed objects ----------------------------------------------------------------------------


def test_expect_mismatch_is_a_changed_shard(range_server: FileServer, tmp_path: Path) -> None:
    data = payload(seed=15)
    url = range_server.put("a.bin", data)
    indexed = stat_remote(url, FAST)
    assert download(url, tmp_path / "ok.bin", FAST, expect=indexed) == indexed
    for wrong in (RemoteObject(SIZE + 1, indexed.version), RemoteObject(SIZE, "other")):
        with pytest.raises(ShardError, match="changed since it was indexed") as e:
            download(url, tmp_path / "a.bin", FAST, expect=wrong)
        assert url in str(e.value)
    assert not (tmp_path / "a.bin").exists() and no_temps(tmp_path)


def test_change_between_attempts_restarts_or_fails(
    range_server: FileServer, tmp_path: Path
) -> None:
    old, new = payload(seed=16), payload(SIZE - 1000, seed=17)
    url = range_server.put("a.bin", old)
    range_server.script("a.bin", Short(K), Replace(new))
    got = download(url, tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == new
    assert got == RemoteObject(len(new), etag_of(new))
    log = range_server.log("a.bin")
    assert log[1].if_range == f'"{etag_of(old)}"' and log[1].status == 200  # If-Range: whole
    range_server.put("a.bin", old)
    indexed = stat_remote(url, FAST)
    range_server.script("a.bin", Short(K), Replace(new))
    with pytest.raises(ShardError, match="changed since it was indexed"):
        download(url, tmp_path / "b.bin", FAST, expect=indexed)
    assert not (tmp_path / "b.bin").exists() and no_temps(tmp_path)


# -- compressed shards --------------------------------------------------------------------------


def test_compressed_download_decompresses(range_server: FileServer, tmp_path: Path) -> None:
    data = payload(seed=18)
    gz = gzip.compress(data, compresslevel=1)
    url = range_server.put("a.tar.gz", gz)
    range_server.script("a.tar.gz", Drop(len(gz) // 2))  # the retry resumes the raw bytes
    got = download(url, tmp_path / "a.tar", FAST, compressed=True)
    assert (tmp_path / "a.tar").read_bytes() == data
    assert got == RemoteObject(len(gz), etag_of(gz))
    assert range_server.log("a.tar.gz")[1].status == 206
    assert no_temps(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not-gzip"])
def test_corrupt_gzip_is_a_shard_error(
    range_server: FileServer, tmp_path: Path, damage: str
) -> None:
    gz = bytearray(gzip.compress(payload(seed=19), compresslevel=1))
    if damage == "truncated":
        gz = gz[: len(gz) // 2]
    elif damage == "flipped":
        gz[len(gz) // 2] ^= 0xFF
    else:
        gz = bytearray(b"plain tar bytes, not gzip")
    url = range_server.put("a.tar.gz", bytes(gz))
    with pytest.raises(ShardError, match="corrupt gzip stream") as e:
        download(url, tmp_path / "a.tar", FAST, compressed=True)
    assert url in str(e.value)
    assert not (tmp_path / "a.tar").exists() and no_temps(tmp_path)


# -- fsspec backends ----------------------------------------------------------------------------


def test_fsspec_backend_resumes_at_offset(flaky_fs: Any, tmp_path: Path) -> None:
    data = payload(seed=20)
    flaky_fs.files["/d/a.bin"] = data
    flaky_fs.fail_at["/d/a.bin"] = [K, 2 * K]
    got = download("flaky:///d/a.bin", tmp_path / "a.bin", FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert got == RemoteObject(SIZE, etag_of(data))
    assert flaky_fs.opens == 3 and flaky_fs.seeks == [K, 2 * K]
    flaky_fs.fail_at["/d/a.bin"] = [K] * 10
    with pytest.raises(ShardError, match="after 4 attempts: ConnectionResetError"):
        download("flaky:///d/a.bin", tmp_path / "b.bin", FAST)
    with pytest.raises(ShardError, match="shard not found"):
        download("flaky:///d/nothing.bin", tmp_path / "c.bin", FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


# -- stats -------------------------------------------------------------------------------------


def test_fetch_stats_snapshot_and_reset() -> None:
    stats = FetchStats()
    stats.add(nbytes=10, requests=2)
    stats.add(nbytes=5, retries=1)
    assert stats.snapshot() == {"bytes": 15, "requests": 2, "retries": 1}
    stats.reset()
    assert stats.snapshot() == {"bytes": 0, "requests": 0, "retries": 0}
