"""What mmload.sources.fetch reports when a fetch or stat fails (the error names the shard,
says why, and counts its requests), how a failing pipe command is cleaned up, and that every
copy loop reads in bounded chunks. Written from the surviving mutants of issue 15."""

from __future__ import annotations

import datetime
import errno
import gzip
import http.server
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mmload.config import RemoteConfig
from mmload.errors import ShardError
from mmload.sources import fetch
from mmload.sources.fetch import FETCH_STATS, RemoteObject, download, stat_remote
from tests.remote import servers
from tests.remote.servers import FileServer, Status, etag_of

range_server = servers.range_server
flaky_fs = servers.flaky_fs

pytestmark = pytest.mark.timeout(60)

FAST = RemoteConfig(
    connect_timeout=2.0, read_timeout=0.5, retries=3, backoff=0.01, backoff_max=0.02
)
BIG = 3 * fetch._CHUNK + 5  # more than one read's worth


def delta(before: dict[str, int]) -> dict[str, int]:
    now = FETCH_STATS.snapshot()
    return {k: now[k] - before[k] for k in now}


class Writes:
    """A file-like sink that records the size of every write."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def write(self, b: bytes) -> int:
        self.sizes.append(len(b))
        return len(b)


# -- local files --------------------------------------------------------------------------------


def test_local_stat_and_download_errors_name_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.tar"
    for url in (str(missing), "file://" + str(missing)):
        with pytest.raises(ShardError) as e:
            stat_remote(url, FAST)
        assert (e.value.reason, e.value.shard) == ("shard not found", url)
        with pytest.raises(ShardError) as e:
            download(url, tmp_path / "out", FAST)
        assert (e.value.reason, e.value.shard) == ("shard not found", url)

    with pytest.raises(ShardError) as e:
        download(str(tmp_path), tmp_path / "out", FAST)  # a directory
    assert e.value.shard == str(tmp_path)
    assert e.value.reason.startswith("cannot open shard: IsADirectoryError: [Errno 21]")

    secret = tmp_path / "secret.tar"
    secret.write_bytes(b"x")
    real_stat = os.stat

    def denied(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path) == str(secret):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(fetch.os, "stat", denied)
    with pytest.raises(ShardError) as e:
        stat_remote(str(secret), FAST)
    assert e.value.shard == str(secret)
    assert e.value.reason.startswith("access denied (PermissionError: [Errno 13] Permission")
    assert not (tmp_path / "out").exists()


def test_local_download_checks_expect_and_counts(tmp_path: Path) -> None:
    src = tmp_path / "a.tar"
    src.write_bytes(os.urandom(BIG))
    version = str(src.stat().st_mtime_ns)
    before = FETCH_STATS.snapshot()
    assert download(str(src), tmp_path / "o", FAST) == RemoteObject(BIG, version)
    assert delta(before) == {"bytes": BIG, "requests": 1, "retries": 0}
    for expect in (RemoteObject(BIG + 1, None), RemoteObject(None, "other")):
        with pytest.raises(ShardError) as e:
            download(str(src), tmp_path / "o2", FAST, expect=expect)
        assert e.value.shard == str(src)
        assert e.value.reason.startswith("shard changed since it was indexed")
    assert not (tmp_path / "o2").exists()
    download(str(src), tmp_path / "o2", FAST, expect=RemoteObject(BIG, version))


def test_pipe_stat_is_unknown() -> None:
    assert stat_remote("pipe:echo hi", FAST) == RemoteObject(None, None)


# -- pipes --------------------------------------------------------------------------------------


def test_failing_pipe_reports_exit_code_and_stderr_tail(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = "pipe:echo boom >&2; exit 3"
    before = FETCH_STATS.snapshot()
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o", FAST)
    assert (e.value.reason, e.value.shard) == ("pipe command exited with 3: boom", url)
    assert delta(before)["requests"] == 1
    assert "boom" not in capfd.readouterr().err  # captured, not passed through

    # Only the last 500 bytes of a long stderr; bytes that are not UTF-8 are replaced.
    long = "pipe:python3 -c \"import sys; sys.stderr.write('a' * 1000 + 'b' * 500); sys.exit(2)\""
    with pytest.raises(ShardError) as e:
        download(long, tmp_path / "o", FAST)
    assert e.value.reason == "pipe command exited with 2: " + "b" * 500
    raw = "pipe:printf 'bad \\377\\376 bytes' >&2; exit 1"
    with pytest.raises(ShardError) as e:
        download(raw, tmp_path / "o", FAST)
    assert e.value.reason == "pipe command exited with 1: bad \ufffd\ufffd bytes"
    assert not (tmp_path / "o").exists()


def test_pipe_that_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(fetch.subprocess, "Popen", no_memory)
    with pytest.raises(ShardError) as e:
        download("pipe:cat x", tmp_path / "o", FAST)
    assert e.value.shard == "pipe:cat x"
    assert e.value.reason == "cannot run pipe command: OSError: [Errno 12] Cannot allocate memory"


def test_pipe_is_killed_and_reaped_when_writing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        started.append(proc)
        return proc

    class Full:
        def write(self, b: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch.subprocess, "Popen", recording)
    try:
        with pytest.raises(OSError, match="No space left"):
            fetch._run_pipe("pipe:yes", Full())  # type: ignore[arg-type]
        (proc,) = started
        assert proc.returncode == -9  # killed (`yes` never ends) and reaped
        assert proc.stdout is not None and proc.stdout.closed
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_copy_loops_read_in_bounded_chunks(tmp_path: Path) -> None:
    data = os.urandom(BIG)
    src = tmp_path / "a.bin"
    src.write_bytes(data)
    gz = tmp_path / "a.bin.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    for copy in (
        lambda out: fetch._local_download(str(src), out, None),
        lambda out: fetch._run_pipe(f"pipe:cat {src}", out),
        lambda out: fetch._gunzip(str(gz), out, str(gz)),
    ):
        out = Writes()
        copy(out)
        assert sum(out.sizes) == BIG
        assert max(out.sizes) <= fetch._CHUNK


def test_corrupt_gzip_names_the_decoder_error(tmp_path: Path) -> None:
    src = tmp_path / "a.tar.gz"
    src.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(ShardError) as e:
        download(str(src), tmp_path / "o", FAST, compressed=True)
    assert e.value.shard == str(src)
    assert e.value.reason.startswith("corrupt gzip stream: BadGzipFile: Not a gzipped file")


# -- http(s) stat -------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", [403, 405, 501])
def test_stat_falls_back_to_get_for_each_head_refusal(
    range_server: FileServer, refusal: int
) -> None:
    data = os.urandom(1000)
    url = range_server.put("a.bin", data)
    range_server.script("a.bin", Status(refusal))
    assert stat_remote(url, FAST) == RemoteObject(1000, etag_of(data))
    assert [(s.method, s.status) for s in range_server.log("a.bin")] == [
        ("HEAD", refusal),
        ("GET", 206),
    ]


def test_stat_fallback_without_range_support_uses_content_length(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, ranges=False)
    try:
        data = os.urandom(1000)
        url = server.put("a.bin", data)
        server.script("a.bin", Status(405))
        assert stat_remote(url, FAST) == RemoteObject(1000, etag_of(data))
        assert [s.status for s in server.log("a.bin")] == [405, 200]
    finally:
        server.close()


class _UnknownTotal(http.server.BaseHTTPRequestHandler):
    """Refuses HEAD; answers a ranged GET with ``Content-Range: bytes 0-0/*`` (size unknown)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(206)
        self.send_header("Content-Range", "bytes 0-0/*" if "bad" not in self.path else "bytes 0")
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", "1")
        self.end_headers()
        self.wfile.write(b"x")


@pytest.fixture
def unknown_total() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _UnknownTotal)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/a.bin"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_stat_with_unknown_total_size(unknown_total: str) -> None:
    assert stat_remote(unknown_total, FAST) == RemoteObject(None, "v1")
    malformed = unknown_total.replace("a.bin", "bad.bin")  # a Content-Range we cannot parse
    assert stat_remote(malformed, FAST) == RemoteObject(None, "v1")


def test_s3_clients_get_the_timeouts() -> None:
    cfg = RemoteConfig(connect_timeout=2.5, read_timeout=0.75)
    for url in ("s3://bucket/x/a.tar", "s3a://bucket/x/a.tar", "s3://bucket/x/a://b.tar"):
        fs, path = fetch._fs(url, cfg)
        assert path == url.split("://", 1)[1]
        assert fs.config_kwargs == {"connect_timeout": 2.5, "read_timeout": 0.75}
    fs, path = fetch._fs("memory://bucket/x/a.tar", cfg)  # other backends: no botocore options
    assert path == "/bucket/x/a.tar" and fs.storage_options == {}
    with pytest.raises(ShardError) as e:
        fetch._fs("nosuchproto://b/a.tar", cfg)
    assert e.value.shard == "nosuchproto://b/a.tar"
    assert e.value.reason.startswith("cannot open shard URL: ValueError: Protocol not known")


def test_stat_retries_then_names_the_url(range_server: FileServer) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", *[Status(503)] * 4)
    before = FETCH_STATS.snapshot()
    with pytest.raises(ShardError) as e:
        stat_remote(url, FAST)
    assert e.value.shard == url
    assert re.fullmatch(
        r"cannot stat shard after 4 attempts: HTTP 503 Service Unavailable", e.value.reason
    )
    assert delta(before) == {"bytes": 0, "requests": 4, "retries": 3}


# -- fsspec stat --------------------------------------------------------------------------------


def _broken_info_fs() -> type:
    from fsspec.spec import AbstractFileSystem

    class _FS(AbstractFileSystem):
        protocol = "brokeninfo"
        cachable = False

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            if "denied" in path:
                raise PermissionError(errno.EACCES, "Access Denied")
            if "quiet" in path:
                raise ConnectionResetError  # no message: the error is named by its type
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    return _FS


def test_fsspec_stat_counts_and_names_the_url(flaky_fs: Any) -> None:
    import fsspec

    data = os.urandom(100)
    flaky_fs.files["/d/a.bin"] = data
    before = FETCH_STATS.snapshot()
    assert stat_remote("flaky:///d/a.bin", FAST) == RemoteObject(100, etag_of(data))
    assert delta(before) == {"bytes": 0, "requests": 1, "retries": 0}
    with pytest.raises(ShardError) as e:
        stat_remote("flaky:///d/none.bin", FAST)
    assert (e.value.reason, e.value.shard) == ("shard not found", "flaky:///d/none.bin")

    fsspec.register_implementation("brokeninfo", _broken_info_fs(), clobber=True)
    with pytest.raises(ShardError) as e:
        stat_remote("brokeninfo:///x.bin", FAST)
    assert e.value.shard == "brokeninfo:///x.bin"
    assert e.value.reason == (
        "cannot stat shard after 4 attempts: ConnectionResetError: [Errno 104] "
        "Connection reset by peer"
    )
    with pytest.raises(ShardError) as e:
        stat_remote("brokeninfo:///quiet.bin", FAST)
    assert e.value.reason == "cannot stat shard after 4 attempts: ConnectionResetError"
    with pytest.raises(ShardError) as e:
        stat_remote("brokeninfo:///denied.bin", FAST)  # not retried
    assert e.value.shard == "brokeninfo:///denied.bin"
    assert e.value.reason == "access denied (PermissionError: [Errno 13] Access Denied)"


def test_fsspec_read_failure_says_where(flaky_fs: Any, tmp_path: Path) -> None:
    flaky_fs.files["/d/a.bin"] = os.urandom(5000)
    flaky_fs.fail_at["/d/a.bin"] = [1234] * 10
    with pytest.raises(ShardError) as e:
        download("flaky:///d/a.bin", tmp_path / "o", FAST)
    assert e.value.reason == (
        "cannot fetch shard after 4 attempts: "
        "ConnectionResetError: injected: connection reset by peer after 1234 bytes"
    )
    flaky_fs.fail_at["/d/a.bin"] = [0] * 10  # at the first byte: no offset to report
    with pytest.raises(ShardError) as e:
        download("flaky:///d/a.bin", tmp_path / "o", FAST)
    assert e.value.reason == (
        "cannot fetch shard after 4 attempts: ConnectionResetError: injected: connection reset "
        "by peer"
    )


def test_fsspec_info_to_size_and_version() -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    cases: list[tuple[dict[str, Any], RemoteObject]] = [
        ({"size": 10, "ETag": '"Xabc"'}, RemoteObject(10, "Xabc")),  # s3
        ({"size": "12", "etag": " e1 "}, RemoteObject(12, "e1")),
        ({"size": 1, "generation": 1700000000123}, RemoteObject(1, "1700000000123")),  # gcs
        ({"size": 1, "LastModified": when}, RemoteObject(1, "2026-01-02T03:04:05+00:00")),
        ({"last_modified": "2026-01-02"}, RemoteObject(None, "2026-01-02")),
        ({"mtime": 1.5}, RemoteObject(None, "1.5")),  # local, memory
        ({"updated": "2026-01-03T00:00:00Z"}, RemoteObject(None, "2026-01-03T00:00:00Z")),
        ({"created": 99}, RemoteObject(None, "99")),
        ({"mtime": 1, "ETag": "e"}, RemoteObject(None, "e")),  # an ETag first
        ({"ETag": "", "mtime": 5}, RemoteObject(None, "5")),  # empty values are skipped
        ({"ETag": None, "updated": "u", "created": "c"}, RemoteObject(None, "u")),
        ({"size": 0}, RemoteObject(0, None)),
        ({}, RemoteObject(None, None)),
    ]
    for info, want in cases:
        assert fetch._fs_object(info) == want, info


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMLOAD_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MMLOAD_CACHE_DIR", "")
    assert fetch.default_cache_dir() == tmp_path / "xdg" / "mmload"
    monkeypatch.delenv("MMLOAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "mmload"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "mmload"


# -- the retry schedule -------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap(
    range_server: FileServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", *[Status(503)] * 6)
    slept: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", slept.append)
    cfg = RemoteConfig(
        connect_timeout=2.0, read_timeout=2.0, retries=5, backoff=1.0, backoff_max=5.0
    )
    with caplog.at_level("WARNING", logger="mmload.sources.fetch"), pytest.raises(ShardError) as e:
        stat_remote(url, cfg)
    assert e.value.reason == "cannot stat shard after 6 attempts: HTTP 503 Service Unavailable"
    # The n-th wait is min(backoff * 2**n, backoff_max), less up to 20% jitter.
    assert len(slept) == 5
    for n, wait in enumerate(slept):
        base = min(1.0 * 2**n, 5.0)
        assert 0.8 * base <= wait <= base, (n, wait)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{url}: attempt {n + 1} of 6 failed (HTTP 503 Service Unavailable); "
        f"retrying in {slept[n]:.2f}s"
        for n in range(5)
    ]


def test_no_retries_is_one_attempt(
    range_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", Status(500))
    monkeypatch.setattr(fetch.time, "sleep", lambda s: pytest.fail("slept"))
    cfg = RemoteConfig(connect_timeout=2.0, read_timeout=2.0, retries=0)
    with pytest.raises(ShardError) as e:
        stat_remote(url, cfg)
    assert e.value.reason == "cannot stat shard after 1 attempt: HTTP 500 Internal Server Error"
    assert len(range_server.log("a.bin")) == 1


# -- http(s) download ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (404, "shard not found (HTTP 404 Not Found)"),
        (410, "shard not found (HTTP 410 Gone)"),
        (401, "access denied (HTTP 401 Unauthorized)"),
        (403, "access denied (HTTP 403 Forbidden)"),
        (400, "cannot fetch shard: HTTP 400 Bad Request"),
        (402, "cannot fetch shard: HTTP 402 Payment Required"),
        (411, "cannot fetch shard: HTTP 411 Length Required"),
        (499, "cannot fetch shard: HTTP 499"),  # no reason phrase
    ],
)
def test_http_refusals_fail_at_once_naming_the_status(
    range_server: FileServer, tmp_path: Path, status: int, reason: str
) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", Status(status))
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o", FAST)
    assert (e.value.reason, e.value.shard) == (reason, url)
    assert len(range_server.log("a.bin")) == 1  # not retried


def test_redirect_loop_is_a_shard_error(range_server: FileServer, tmp_path: Path) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", *[servers.Redirect("/a.bin")] * 10)
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o", FAST)
    assert (e.value.reason, e.value.shard) == ("cannot fetch shard: more than 5 redirects", url)


def test_connect_timeout_applies(tmp_path: Path) -> None:
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=5)  # the backlog is full now
    cfg = RemoteConfig(connect_timeout=0.3, read_timeout=30.0, retries=1, backoff=0.01)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/a.bin"
    try:
        with pytest.raises(ShardError) as e:
            download(url, tmp_path / "o", cfg)
        assert e.value.reason == "cannot fetch shard after 2 attempts: TimeoutError: timed out"
    finally:
        filler.close()
        srv.close()


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [("0", 0.4, 0.5), ("-3", 0.4, 0.5), ("2", 2.0, 2.0), ("9", 5.0, 5.0), ("soon", 0.4, 0.5)],
)
def test_retry_after(
    range_server: FileServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    retry_after: str,
    low: float,
    high: float,
) -> None:
    url = range_server.put("a.bin", b"abc")
    range_server.script("a.bin", Status(503, retry_after))
    slept: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", slept.append)
    cfg = RemoteConfig(connect_timeout=2.0, read_timeout=2.0, backoff=0.5, backoff_max=5.0)
    download(url, tmp_path / "o", cfg)
    assert (tmp_path / "o").read_bytes() == b"abc"
    (wait,) = slept
    assert low <= wait <= high  # the server's wait (capped at backoff_max), else the backoff


class _NoLength(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0 answers without a usable Content-Length (absent, or not a number): the body
    ends when the connection closes."""

    protocol_version = "HTTP/1.0"
    body = b"x" * 5000

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _head(self) -> None:
        self.send_response(200)
        if "bad" in self.path:
            self.send_header("Content-Length", "12abc")
        self.send_header("ETag", '"v"')
        self.end_headers()

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        self._head()
        self.wfile.write(self.body)


@pytest.mark.parametrize("name", ["none.bin", "bad.bin"])
def test_body_without_a_usable_length(tmp_path: Path, name: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoLength)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    try:
        assert stat_remote(url, FAST) == RemoteObject(None, "v")
        assert download(url, tmp_path / "o", FAST) == RemoteObject(5000, "v")
        assert (tmp_path / "o").read_bytes() == _NoLength.body
        # More bytes than the manifest's size: only the count read can tell.
        with pytest.raises(ShardError) as e:
            download(url, tmp_path / "o2", FAST, expect=RemoteObject(4000, "v"))
        assert e.value.shard == url
        assert e.value.reason.startswith("shard changed since it was indexed: the manifest has ")
        assert "the source now reports size 5000" in e.value.reason
        assert not (tmp_path / "o2").exists()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(params=[None, "weak"], ids=["no-etag", "weak-etag"])
def untagged_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FileServer]:
    """A Range server whose ETag (none, or weak) cannot be used for If-Range."""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, etag=request.param)
    try:
        yield server
    finally:
        server.close()


def test_resume_without_a_strong_etag(untagged_server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(BIG)
    url = untagged_server.put("a.bin", data)
    untagged_server.script("a.bin", servers.Drop(fetch._CHUNK))
    download(url, tmp_path / "o", FAST)
    assert (tmp_path / "o").read_bytes() == data
    log = untagged_server.log("a.bin")
    assert [(s.status, s.if_range) for s in log] == [(200, None), (206, None)]
    assert log[1].range is not None and log[1].range != "bytes=0-"  # resumed


@pytest.mark.parametrize(
    ("etag", "new_size"),
    [(None, BIG + 7), ("weak", BIG + 7), ("weak", BIG)],
    ids=["no-etag-other-size", "weak-etag-other-size", "weak-etag-same-size"],
)
def test_object_replaced_between_attempts_without_if_range(
    tmp_path: Path, etag: str | None, new_size: int
) -> None:
    """Without a strong ETag the server cannot send a changed object whole: the client must
    see the change (in size or version) itself and start over, never splice two objects.
    (No ETag and the same size: only Last-Modified, to the second, could tell; not tested.)"""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, etag=etag)
    try:
        old, new = os.urandom(BIG), os.urandom(new_size)
        url = server.put("a.bin", old)
        server.script("a.bin", servers.Drop(fetch._CHUNK), servers.Replace(new))
        download(url, tmp_path / "o", FAST)
        assert (tmp_path / "o").read_bytes() == new
    finally:
        server.close()


def test_object_shrunk_between_attempts_gets_416_then_whole(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, etag=None)  # no If-Range: the resume asks for bytes that are gone
    try:
        old, new = os.urandom(BIG), os.urandom(1000)
        url = server.put("a.bin", old)
        server.script("a.bin", servers.Drop(fetch._CHUNK), servers.Replace(new))
        assert download(url, tmp_path / "o", FAST).size == 1000
        assert (tmp_path / "o").read_bytes() == new
        assert [s.status for s in server.log("a.bin")] == [200, 416, 200]

        server.put("a.bin", old)
        server.script("a.bin", servers.Drop(fetch._CHUNK), servers.Replace(new))
        one_retry = RemoteConfig(connect_timeout=2.0, read_timeout=2.0, retries=1, backoff=0.01)
        with pytest.raises(ShardError) as e:
            download(url, tmp_path / "o2", one_retry)
        m = re.fullmatch(
            r"cannot fetch shard after 2 attempts: HTTP 416 for bytes from (\d+): "
            r"the object changed",
            e.value.reason,
        )
        assert m is not None and int(m.group(1)) >= fetch._CHUNK
    finally:
        server.close()


def test_weak_etag_change_is_logged_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, etag="weak")
    try:
        url = server.put("a.bin", os.urandom(BIG))
        server.script("a.bin", servers.Drop(fetch._CHUNK), servers.Replace(os.urandom(BIG)))
        one_retry = RemoteConfig(connect_timeout=2.0, read_timeout=2.0, retries=1, backoff=0.01)
        with (
            caplog.at_level("WARNING", logger="mmload.sources.fetch"),
            pytest.raises(ShardError) as e,
        ):
            download(url, tmp_path / "o", one_retry)
        assert e.value.reason == (
            "cannot fetch shard after 2 attempts: the object changed between attempts"
        )
        assert f"{url} changed between attempts; fetching it from the start" in [
            r.getMessage() for r in caplog.records
        ]
    finally:
        server.close()


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Each GET runs the next step of ``steps`` (shared by the test), HEAD answers 405."""

    protocol_version = "HTTP/1.0"
    steps: ClassVar[list[Callable[[http.server.BaseHTTPRequestHandler], None]]] = []
    ranges: ClassVar[list[str | None]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).ranges.append(self.headers.get("Range"))
        type(self).steps.pop(0)(self)


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[_Scripted]]]:
    _Scripted.steps, _Scripted.ranges = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/a.bin", _Scripted
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _answer(
    status: int, body: bytes, headers: dict[str, str], send: int | None = None
) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def step(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[:send])

    return step


def test_resume_with_a_wrong_content_range_starts_over(
    scripted: tuple[str, type[_Scripted]], tmp_path: Path
) -> None:
    url, h = scripted
    data = os.urandom(10_000)
    tag = {"ETag": '"v1"', "Content-Length": "10000"}
    wrong = {"ETag": '"v1"', "Content-Range": "bytes 0-9999/10000", "Content-Length": "10000"}
    h.steps = [
        _answer(200, data, tag, send=4000),  # cut short
        _answer(206, data, wrong),  # the whole object, labelled and sent as a 206
        _answer(200, data, tag),
    ]
    download(url, tmp_path / "o", FAST)
    assert (tmp_path / "o").read_bytes() == data
    assert h.ranges == [None, "bytes=4000-", None]

    h.steps, h.ranges = [_answer(200, data, tag, send=4000), _answer(206, data, wrong)], []
    one_retry = RemoteConfig(connect_timeout=2.0, read_timeout=2.0, retries=1, backoff=0.01)
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o2", one_retry)
    assert e.value.reason == (
        "cannot fetch shard after 2 attempts: "
        "HTTP 206 with Content-Range 'bytes 0-9999/10000' for a resume"
    )


def test_expected_size_detects_a_short_body_without_content_length(
    scripted: tuple[str, type[_Scripted]], tmp_path: Path
) -> None:
    url, h = scripted
    data = os.urandom(5000)
    h.steps = [_answer(200, data, {"ETag": '"v"'}, send=3000) for _ in range(4)]
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o", FAST, expect=RemoteObject(5000, "v"))
    assert e.value.reason == "cannot fetch shard after 4 attempts: short body: 3000 of 5000 bytes"


def test_expect_mismatch_reads_no_body(range_server: FileServer, tmp_path: Path) -> None:
    url = range_server.put("a.bin", os.urandom(BIG))
    before = FETCH_STATS.snapshot()
    with pytest.raises(ShardError, match="shard changed since it was indexed"):
        download(url, tmp_path / "o", FAST, expect=RemoteObject(BIG + 1, None))
    assert delta(before)["bytes"] == 0


def test_fsspec_download_requests_and_open_options(flaky_fs: Any, tmp_path: Path) -> None:
    data = os.urandom(5000)
    flaky_fs.files["/d/a.bin"] = data
    url = "flaky:///d/a.bin"
    for details, per_attempt in ((True, 1), (False, 2)):  # an open, and an info if needed
        flaky_fs.details = details
        flaky_fs.fail_at["/d/a.bin"] = [1000]
        before = FETCH_STATS.snapshot()
        assert download(url, tmp_path / "o", FAST) == RemoteObject(5000, etag_of(data))
        assert delta(before) == {"bytes": 5000, "requests": 2 * per_attempt, "retries": 1}
    opened = flaky_fs.open_kwargs[-1]
    assert (opened["mode"], opened["block_size"]) == ("rb", 8 << 20)  # s3fs's read-ahead

    before = FETCH_STATS.snapshot()
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o2", FAST, expect=RemoteObject(4999, None))
    assert e.value.shard == url and e.value.reason.startswith("shard changed since it was")
    assert delta(before)["bytes"] == 0  # found before reading the body

    flaky_fs.deny_info.add("/d/a.bin")
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o2", FAST)
    assert e.value.shard == url
    assert e.value.reason == "access denied (PermissionError: [Errno 13] Access Denied)"
    assert not (tmp_path / "o2").exists()


def test_fsspec_object_replaced_between_attempts(
    flaky_fs: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = os.urandom(5000), os.urandom(6000)
    flaky_fs.files["/d/a.bin"] = old
    flaky_fs.fail_at["/d/a.bin"] = [1000]
    flaky_fs.replace["/d/a.bin"] = [None, new]
    url = "flaky:///d/a.bin"
    with caplog.at_level("WARNING", logger="mmload.sources.fetch"):
        assert download(url, tmp_path / "o", FAST) == RemoteObject(6000, etag_of(new))
    assert (tmp_path / "o").read_bytes() == new
    assert flaky_fs.seeks == []  # started over, not resumed
    assert f"{url} changed between attempts; fetching it from the start" in [
        r.getMessage() for r in caplog.records
    ]
    assert set(flaky_fs.reads) == {fetch._CHUNK}  # bounded reads


def test_fsspec_unseekable_file_is_read_again(flaky_fs: Any, tmp_path: Path) -> None:
    data = os.urandom(5000)
    flaky_fs.files["/d/a.bin"] = data
    flaky_fs.fail_at["/d/a.bin"] = [1000]
    flaky_fs.unseekable = True
    before = FETCH_STATS.snapshot()
    assert download("flaky:///d/a.bin", tmp_path / "o", FAST).size == 5000
    assert (tmp_path / "o").read_bytes() == data
    assert flaky_fs.seeks == [1000]  # tried, refused, read from the start
    assert delta(before)["retries"] == 1


@pytest.mark.parametrize(
    ("info_size", "reason"),
    [
        (7000, "short read: 5000 of 7000 bytes"),
        (4000, "read 5000 bytes of an object of 4000: it changed"),
    ],
)
def test_fsspec_read_size_differs_from_info(
    flaky_fs: Any, tmp_path: Path, info_size: int, reason: str
) -> None:
    flaky_fs.files["/d/a.bin"] = os.urandom(5000)
    flaky_fs.info_size["/d/a.bin"] = info_size
    with pytest.raises(ShardError) as e:
        download("flaky:///d/a.bin", tmp_path / "o", FAST)
    assert e.value.shard == "flaky:///d/a.bin"
    assert e.value.reason == f"cannot fetch shard after 4 attempts: {reason}"
    assert not (tmp_path / "o").exists()


def test_fsspec_without_size_is_checked_against_expect_after_reading(
    flaky_fs: Any, tmp_path: Path
) -> None:
    data = os.urandom(4000)
    flaky_fs.files["/d/a.bin"] = data
    flaky_fs.info_size["/d/a.bin"] = None
    url = "flaky:///d/a.bin"
    assert download(url, tmp_path / "o", FAST) == RemoteObject(4000, etag_of(data))
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o2", FAST, expect=RemoteObject(5000, etag_of(data)))
    assert e.value.shard == url
    assert e.value.reason == (
        f"shard changed since it was indexed: the manifest has size 5000, version "
        f"{etag_of(data)!r}; the source now reports size 4000, version {etag_of(data)!r}"
    )
    assert not (tmp_path / "o2").exists()


def test_fsspec_read_refused_midway(flaky_fs: Any, tmp_path: Path) -> None:
    flaky_fs.files["/d/a.bin"] = os.urandom(5000)
    flaky_fs.fail_at["/d/a.bin"] = [1000]
    flaky_fs.fail_with = PermissionError
    with pytest.raises(ShardError) as e:
        download("flaky:///d/a.bin", tmp_path / "o", FAST)
    assert e.value.shard == "flaky:///d/a.bin"
    assert e.value.reason == "access denied (PermissionError: injected: connection reset by peer)"


# -- download() ---------------------------------------------------------------------------------


def test_download_writes_through_a_temp_file_beside_dest(tmp_path: Path) -> None:
    dest = tmp_path / "new" / "dirs" / "a.tar"  # parents are made
    # The command lists the destination's directory while its own output is being written.
    download(f"pipe:ls -a {dest.parent}", dest, FAST)
    (listed,) = [n for n in dest.read_text().split() if n not in (".", "..")]
    assert listed.startswith(".fetch-")
    assert os.listdir(dest.parent) == ["a.tar"]  # renamed into place, nothing left


def test_pipe_output_is_checked_against_expect(tmp_path: Path) -> None:
    url = "pipe:printf abc"
    assert download(url, tmp_path / "o", FAST, expect=RemoteObject(3, "any")).size == 3
    with pytest.raises(ShardError) as e:
        download(url, tmp_path / "o2", FAST, expect=RemoteObject(4, None))
    assert e.value.shard == url and e.value.reason.startswith("shard changed since it was")
    assert not (tmp_path / "o2").exists()


def test_http_and_https_use_mmloads_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def stat(url: str, cfg: RemoteConfig) -> RemoteObject:
        calls.append(("stat", url))
        return RemoteObject(1, "v")

    def get(url: str, out: Any, cfg: RemoteConfig, expect: RemoteObject | None) -> RemoteObject:
        calls.append(("get", url))
        out.write(b"x")
        return RemoteObject(1, "v")

    monkeypatch.setattr(fetch, "_http_stat", stat)
    monkeypatch.setattr(fetch, "_http_download", get)
    for url in ("http://h/a.tar", "https://h/a.tar"):
        assert stat_remote(url, FAST) == RemoteObject(1, "v")
        assert download(url, tmp_path / "o", FAST) == RemoteObject(1, "v")
    assert calls == [
        ("stat", "http://h/a.tar"),
        ("get", "http://h/a.tar"),
        ("stat", "https://h/a.tar"),
        ("get", "https://h/a.tar"),
    ]


def test_download_logs_what_it_fetched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "a.tar"
    src.write_bytes(b"x" * 123)
    with caplog.at_level("INFO", logger="mmload.sources.fetch"):
        download(str(src), tmp_path / "o" / "a.tar", FAST)
    assert [r.getMessage() for r in caplog.records] == [
        f"fetched {src} -> {tmp_path / 'o' / 'a.tar'} (123 bytes)"
    ]
