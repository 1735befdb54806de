"""Loopback servers for remote-shard tests: a Range-capable file server with scripted faults,
Python's plain ``http.server`` (no Range), moto's S3 server and a flaky fsspec filesystem.

Import what a test module needs (``from tests.remote.servers import range_server, ...``);
every server listens on 127.0.0.1 port 0 in daemon threads and is stopped at teardown.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import pytest

__all__ = [
    "Drop",
    "Fault",
    "FileServer",
    "FlakyFS",
    "Redirect",
    "Replace",
    "Served",
    "Short",
    "Stall",
    "Status",
    "flaky_fs",
    "moto_s3",
    "plain_server",
    "range_server",
]


# -- faults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Send the headers and ``after`` body bytes, then reset the connection (RST)."""

    after: int


@dataclass(frozen=True)
class Short:
    """Announce the whole Content-Length, send ``after`` body bytes, then close cleanly."""

    after: int


@dataclass(frozen=True)
class Stall:
    """Send ``after`` body bytes, stop for ``seconds``, then send the rest (if still wanted)."""

    after: int
    seconds: float


@dataclass(frozen=True)
class Status:
    """Answer ``code`` with an empty body (and ``Retry-After`` if given)."""

    code: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Replace:
    """Replace the file's content (so its ETag changes), then serve the request normally."""

    data: bytes


@dataclass(frozen=True)
class Redirect:
    """Answer 302 with ``Location: location``."""

    location: str


Fault = Drop | Short | Stall | Status | Replace | Redirect


@dataclass
class Served:
    """One request the file server answered: the range asked for, the status and the body
    bytes handed to the socket so far."""

    method: str
    name: str
    range: str | None
    if_range: str | None
    status: int
    sent: int


# -- the file server ----------------------------------------------------------------------------


def etag_of(data: bytes) -> str:
    """The (unquoted) ETag the file server gives ``data``."""
    return hashlib.sha1(data).hexdigest()[:16]


class FileServer(http.server.ThreadingHTTPServer):
    """Serves files under ``root`` with ETag, Last-Modified, Content-Length and, if ``ranges``,
    ``Accept-Ranges``/206 partial responses (honouring ``If-Range``). Each request to a name
    first takes the next fault from that name's script (:meth:`script`); every answer is
    recorded (:meth:`log`, :meth:`sent`). ``etag``: ``"strong"`` (the default), ``"weak"``
    (``W/"..."``, which ``If-Range`` never matches) or ``None`` (no ETag header)."""

    daemon_threads = True

    def __init__(self, root: Path, *, ranges: bool = True, etag: str | None = "strong") -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.root = root
        self.ranges = ranges
        self.etag = etag
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._scripts: dict[str, list[Fault | None]] = {}
        self._log: list[Served] = []
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def put(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``name``; returns its URL."""
        (self.root / name).write_bytes(data)
        return self.url_for(name)

    def script(self, name: str, *faults: Fault | None) -> None:
        """The faults for the next requests to ``name``, in order (None: serve normally)."""
        with self._lock:
            self._scripts[name] = list(faults)

    def log(self, name: str | None = None) -> list[Served]:
        """Copies of the requests answered (to ``name``), in the order they arrived."""
        with self._lock:
            return [dataclasses.replace(s) for s in self._log if name is None or s.name == name]

    def sent(self, name: str) -> int:
        """Body bytes sent for ``name`` over all requests."""
        return sum(s.sent for s in self.log(name))

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(10)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up mid-body (a test's timeout) is expected here

    def _next_fault(self, name: str) -> Fault | None:
        with self._lock:
            script = self._scripts.get(name)
            return script.pop(0) if script else None

    def _record(self, served: Served) -> Served:
        with self._lock:
            self._log.append(served)
        return served

    def _count(self, served: Served, n: int) -> None:
        with self._lock:
            served.sent += n


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        fault = self.server._next_fault(name)
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")

        def record(status: int) -> Served:
            return self.server._record(Served(self.command, name, rng, if_range, status, 0))

        # Each answer is logged before its first byte goes out, and bytes are counted before
        # they are written: a client that has its answer always finds it in the log.
        if isinstance(fault, Status):
            record(fault.code)
            self.send_response(fault.code)
            if fault.retry_after is not None:
                self.send_header("Retry-After", fault.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(fault, Redirect):
            record(302)
            self.send_response(302)
            self.send_header("Location", fault.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.server.root / name
        if isinstance(fault, Replace):
            path.write_bytes(fault.data)
        if not name or not path.is_file():
            record(404)
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = {"strong": f'"{etag_of(data)}"', "weak": f'W/"{etag_of(data)}"'}.get(
            self.server.etag or ""
        )
        start, end, status = 0, len(data), 200
        strong = etag is not None and not etag.startswith("W/")
        if rng and self.server.ranges and (if_range is None or (strong and if_range == etag)):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
                if start >= end:
                    record(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        served = record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if etag is not None:
            self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        body = memoryview(data)[start:end]
        if not isinstance(fault, (Drop, Short, Stall)):
            self._send(body, served)
            return
        self._send(body[: fault.after], served)
        if isinstance(fault, Stall):
            self.server.stopping.wait(fault.seconds)
            self._send(body[fault.after :], served)
        if isinstance(fault, Drop):
            time.sleep(0.05)  # let the client read what was sent before the reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _send(self, body: memoryview, served: Served) -> None:
        try:
            for i in range(0, len(body), 1 << 16):
                piece = body[i : i + (1 << 16)]
                self.server._count(served, len(piece))
                self.wfile.write(piece)
        except OSError:  # the client went away
            self.close_connection = True


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class PlainServer:
    """Python's ``SimpleHTTPRequestHandler`` over ``root``: no Range, no ETag."""

    root: Path
    url: str

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def range_server(tmp_path: Path) -> Iterator[FileServer]:
    """A Range-capable, fault-scriptable file server over a fresh directory."""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[PlainServer]:
    """``python -m http.server`` on loopback over a fresh directory."""
    root = tmp_path / "plain"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield PlainServer(root, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 server on loopback with an empty bucket ``remote``; yields a boto3 client."""
    import boto3  # dev dependencies: s3fs, moto[server] (a missing one is a failure)
    import fsspec
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
    fsspec.filesystem("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="remote")
    try:
        yield client
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


# -- a flaky fsspec filesystem ------------------------------------------------------------------


class _FlakyFile(io.BytesIO):
    def __init__(self, data: bytes, fail_at: int | None, seeks: list[int]) -> None:
        super().__init__(data)
        self.fail_at = fail_at
        self.seeks = seeks

    def seek(self, pos: int, whence: int = 0) -> int:
        self.seeks.append(pos)
        if FlakyFS.unseekable:
            raise io.UnsupportedOperation("seek")
        return super().seek(pos, whence)

    def read(self, n: int | None = -1) -> bytes:
        FlakyFS.reads.append(n)
        pos = self.tell()
        if self.fail_at is not None:
            if pos >= self.fail_at:
                raise FlakyFS.fail_with("injected: connection reset by peer")
            room = self.fail_at - pos
            n = room if n is None or n < 0 else min(n, room)
        return super().read(n)


class FlakyFS:
    """An fsspec filesystem (protocol ``flaky://``) over :attr:`files`; an open of a path
    whose :attr:`fail_at` list is not empty fails its reads at the next byte offset listed.
    With :attr:`details`, open files carry their info (as s3fs files do); :attr:`deny_info`
    paths refuse ``info()``; :attr:`open_kwargs` records each open's options, :attr:`reads`
    each read's size. :attr:`replace` scripts new contents per open (None: unchanged),
    :attr:`info_size` overrides the size ``info()`` reports (None: no size),
    :attr:`unseekable` makes seeks fail, :attr:`fail_with` is what a failing read raises."""

    files: ClassVar[dict[str, bytes]] = {}
    fail_at: ClassVar[dict[str, list[int]]] = {}
    seeks: ClassVar[list[int]] = []
    opens: ClassVar[int] = 0
    details: ClassVar[bool] = False
    deny_info: ClassVar[set[str]] = set()
    open_kwargs: ClassVar[list[dict[str, Any]]] = []
    reads: ClassVar[list[int | None]] = []
    replace: ClassVar[dict[str, list[bytes | None]]] = {}
    info_size: ClassVar[dict[str, int | None]] = {}
    unseekable: ClassVar[bool] = False
    fail_with: ClassVar[type[Exception]] = ConnectionResetError


def _flaky_fs_class() -> type:
    from fsspec.spec import AbstractFileSystem

    class _FS(AbstractFileSystem):
        protocol = "flaky"
        cachable = False

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            path = self._strip_protocol(path)
            if path in FlakyFS.deny_info:
                raise PermissionError(13, "Access Denied")
            if path not in FlakyFS.files:
                raise FileNotFoundError(path)
            data = FlakyFS.files[path]
            size = FlakyFS.info_size.get(path, len(data))
            return {"name": path, "size": size, "type": "file", "ETag": etag_of(data)}

        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> _FlakyFile:
            path = self._strip_protocol(path)
            if path not in FlakyFS.files:
                raise FileNotFoundError(path)
            FlakyFS.opens += 1
            FlakyFS.open_kwargs.append({"mode": mode, **kwargs})
            new = FlakyFS.replace.get(path)
            if new:
                data = new.pop(0)
                if data is not None:
                    FlakyFS.files[path] = data
            script = FlakyFS.fail_at.get(path)
            data = FlakyFS.files[path]
            f = _FlakyFile(data, script.pop(0) if script else None, FlakyFS.seeks)
            if FlakyFS.details:
                size = FlakyFS.info_size.get(path, len(data))
                f.details = {"name": path, "size": size, "ETag": etag_of(data)}
            return f

    return _FS


@pytest.fixture
def flaky_fs() -> Iterator[type[FlakyFS]]:
    """Registers ``flaky://``; yields :class:`FlakyFS` (fill ``files``, script ``fail_at``)."""
    import fsspec

    fsspec.register_implementation("flaky", _flaky_fs_class(), clobber=True)
    FlakyFS.files.clear()
    FlakyFS.fail_at.clear()
    FlakyFS.seeks.clear()
    FlakyFS.opens = 0
    FlakyFS.details = False
    FlakyFS.deny_info = set()
    FlakyFS.open_kwargs = []
    FlakyFS.reads = []
    FlakyFS.replace = {}
    FlakyFS.info_size = {}
    FlakyFS.unseekable = False
    FlakyFS.fail_with = ConnectionResetError
    try:
        yield FlakyFS
    finally:
        FlakyFS.files.clear()
        FlakyFS.fail_at.clear()
