"""mmload's HTTP client (mmload.sources.http) against a loopback server that records what it
is sent: the headers of every request, Basic auth, redirects (each status, relative, missing,
looping, to another scheme), the read timeout on a stalled body, TLS verification, and the
Content-Range and version parsers."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmload.sources import http as mhttp

pytestmark = pytest.mark.timeout(60)

T = {"connect_timeout": 5.0, "read_timeout": 5.0}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """What the server was sent, and a handler per path (default: 200 with body ``ok``)."""

    seen: list[Seen] = field(default_factory=list)
    routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = field(
        default_factory=dict
    )
    url: str = ""


def _handler(rec: Recorder) -> type[http.server.BaseHTTPRequestHandler]:
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _any(self) -> None:
            rec.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
            route = rec.routes.get(self.path.split("?")[0])
            if route is not None:
                route(self)
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"ok")

        do_GET = do_HEAD = do_POST = _any

    return H


@pytest.fixture
def server() -> Iterator[Recorder]:
    rec = Recorder()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield rec
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def redirect(
    status: int, location: str | None
) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        if location is not None:
            h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def test_request_headers_auth_and_target(server: Recorder) -> None:
    url = server.url.replace("http://", "http://us%40er:p%3Ass@") + "/a/b.tar?x=1&y=2"
    with mhttp.request("GET", url, {"Range": "bytes=0-", "User-Agent": "custom"}, **T) as r:
        assert (r.status, r.reason, r.url) == (200, "OK", url)
        assert r.header("Content-Length") == "2" and r.header("X-None") is None
        assert r.read1(100) == b"ok" and r.read1(100) == b""
    (s,) = server.seen
    assert (s.method, s.path) == ("GET", "/a/b.tar?x=1&y=2")
    assert sorted(s.headers) == sorted(  # these and nothing else
        ["Host", "Accept-Encoding", "Connection", "User-Agent", "Range", "Authorization"]
    )
    assert s.headers["Accept-Encoding"] == "identity"
    assert s.headers["Connection"] == "close"
    assert s.headers["User-Agent"] == "custom"  # the caller's headers win
    assert s.headers["Range"] == "bytes=0-"
    assert s.headers["Authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()

    with mhttp.request("HEAD", server.url, None, **T) as r:
        assert r.status == 200
    s = server.seen[-1]
    assert (s.method, s.path) == ("HEAD", "/")
    assert s.headers["User-Agent"] == "mmload" and "Authorization" not in s.headers
    with mhttp.request("GET", server.url.replace("http://", "http://only@") + "/x", **T):
        pass
    auth = server.seen[-1].headers["Authorization"]
    assert auth == "Basic " + base64.b64encode(b"only:").decode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed(server: Recorder, status: int) -> None:
    server.routes["/old/a.tar"] = redirect(status, "../new/a.tar?v=2")  # relative
    with mhttp.request("POST", server.url + "/old/a.tar", {"X-Keep": "1"}, **T) as r:
        assert r.status == 200 and r.url == server.url + "/new/a.tar?v=2"
        assert r.read1(10) == b"ok"
    first, second = server.seen
    assert (first.method, first.path) == ("POST", "/old/a.tar")
    # 303 turns the request into a GET; the others repeat it; headers are sent again.
    assert second.method == ("GET" if status == 303 else "POST")
    assert second.path == "/new/a.tar?v=2" and second.headers["X-Keep"] == "1"


def test_head_stays_head_through_a_303(server: Recorder) -> None:
    server.routes["/a"] = redirect(303, "/b")
    with mhttp.request("HEAD", server.url + "/a", **T) as r:
        assert r.status == 200
    assert [(s.method, s.path) for s in server.seen] == [("HEAD", "/a"), ("HEAD", "/b")]


def test_bad_redirects(server: Recorder) -> None:
    server.routes["/none"] = redirect(302, None)
    with pytest.raises(mhttp.RedirectError) as e:
        mhttp.request("GET", server.url + "/none", **T)
    assert str(e.value) == f"HTTP 302 without a Location header from {server.url + '/none'!r}"

    server.routes["/loop"] = redirect(307, "/loop")
    server.seen.clear()
    with pytest.raises(mhttp.RedirectError, match=r"^more than 5 redirects$"):
        mhttp.request("GET", server.url + "/loop", **T)
    assert len(server.seen) == 6  # the request and five redirects
    server.seen.clear()
    with pytest.raises(mhttp.RedirectError, match=r"^more than 2 redirects$"):
        mhttp.request("GET", server.url + "/loop", max_redirects=2, **T)
    assert len(server.seen) == 3

    server.routes["/ftp"] = redirect(301, "ftp://127.0.0.1/a.tar")
    with pytest.raises(mhttp.RedirectError) as e:
        mhttp.request("GET", server.url + "/ftp", **T)
    assert str(e.value) == "not an http(s) URL: 'ftp://127.0.0.1/a.tar'"
    for bad in ("file:///etc/passwd", "http:///nohost"):
        with pytest.raises(mhttp.RedirectError, match="not an http"):
            mhttp.request("GET", bad, **T)


def test_non_redirect_statuses_are_returned(server: Recorder) -> None:
    for code in (206, 304, 404, 503):
        server.routes[f"/{code}"] = redirect(code, "/elsewhere")
        with mhttp.request("GET", f"{server.url}/{code}", **T) as r:
            assert r.status == code
    assert [s.path for s in server.seen] == ["/206", "/304", "/404", "/503"]


def test_read_timeout_bounds_each_body_read(server: Recorder) -> None:
    release = threading.Event()

    def stall(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "10")
        h.end_headers()
        h.wfile.write(b"12345")
        h.wfile.flush()
        release.wait(30)

    server.routes["/stall"] = stall
    try:
        r = mhttp.request("GET", server.url + "/stall", connect_timeout=5.0, read_timeout=0.3)
        with r:
            assert r.read1(100) == b"12345"
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                r.read1(100)
            assert time.monotonic() - t0 < 20  # the read timeout, not the server's 30 s
    finally:
        release.set()


def test_connection_refused_is_a_network_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(mhttp.NETWORK_ERRORS):
        mhttp.request("GET", f"http://127.0.0.1:{port}/a", **T)


def test_close_closes_the_connection(server: Recorder) -> None:
    r = mhttp.request("GET", server.url, **T)
    r.close()
    assert r._conn.sock is None and r._resp.isclosed()


# -- TLS ----------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmload test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_verifies_the_server_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    rec = Recorder()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec))
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{srv.server_address[1]}/a.tar"
    try:
        monkeypatch.setattr(mhttp, "_ssl_context", None)
        with pytest.raises(ssl.SSLCertVerificationError):  # a NETWORK_ERRORS member
            mhttp.request("GET", url, **T)
        assert mhttp._ssl_context is not None
        # The same server, trusted: the default context honours SSL_CERT_FILE.
        monkeypatch.setattr(mhttp, "_ssl_context", None)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with mhttp.request("GET", url, **T) as r:
            assert r.status == 200 and r.read1(10) == b"ok"
        assert [s.path for s in rec.seen] == ["/a.tar"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


# -- parsers ------------------------------------------------------------------------------------


def test_content_range() -> None:
    assert mhttp.content_range("bytes 0-99/1000") == (0, 99, 1000)
    assert mhttp.content_range("  Bytes  5-9/*  ") == (5, 9, None)
    assert mhttp.content_range("BYTES 10-19/20") == (10, 19, 20)
    for bad in (
        None,
        "",
        "bytes */1000",
        "bytes 0-99",
        "items 0-9/10",
        "bytes 0-9/10 x",
        "x bytes 0-9/10",
    ):
        assert mhttp.content_range(bad) is None, bad


def test_version_of(server: Recorder) -> None:
    def answer(headers: dict[str, str]) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
        def route(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()

        return route

    cases = [
        ({"ETag": '"abc"', "Last-Modified": "Mon"}, "abc"),
        ({"ETag": 'W/"abc"'}, "W/abc"),
        ({"ETag": "W/abc"}, "W/abc"),  # unquoted (not RFC 9110, but servers send it)
        ({"ETag": '"XyzX"'}, "XyzX"),  # only quotes and spaces are stripped
        ({"ETag": " plain "}, "plain"),
        ({"Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT"}, "Tue, 01 Dec 2026 00:00:00 GMT"),
        ({"Last-Modified": ""}, None),
        ({}, None),
    ]
    for i, (headers, want) in enumerate(cases):
        server.routes[f"/{i}"] = answer(headers)
        with mhttp.request("GET", f"{server.url}/{i}", **T) as r:
            assert mhttp.version_of(r) == want, headers


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_connect_timeout_bounds_the_connection(scheme: str) -> None:
    """A server whose listen backlog is full never accepts: the connect timeout ends the wait
    (without one, the connection would wait out the test's own timeout)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=5)  # the backlog is full now
    url = f"{scheme}://127.0.0.1:{srv.getsockname()[1]}/a.bin"
    try:
        with pytest.raises(TimeoutError):
            mhttp.request("GET", url, connect_timeout=0.3, read_timeout=30.0)
    finally:
        filler.close()
        srv.close()
