"""A loopback HTTP object store for benchmarks: serves a directory, counts what it sends.

``GET``/``HEAD`` of files under the root, with ``Content-Length``, ``ETag``, ``Last-Modified``
and single-range ``Range`` requests (``206``, ``Content-Range``; ``416`` when unsatisfiable;
``If-Range`` honoured). Bodies go out with ``sendfile`` in 1 MiB pieces, each counted as it is
sent, so a client that hangs up early is charged only for what it got. With ``--no-range`` the
server ignores ``Range`` and sends no ``Accept-Ranges``, like ``python -m http.server``.

The counter (body bytes, requests by method and status, distinct paths) is thread-safe and can
be read and reset in-process (:class:`LoopbackServer`) or over HTTP by another process:
``GET /__loopback__/stats`` (JSON) and ``GET /__loopback__/reset`` (returns the stats before
the reset). Control requests are never counted.

    python benchmarks/loopback.py DIR [--port 8000] [--no-range]
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import sys
import threading
import urllib.parse
import urllib.request
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["LoopbackServer", "RequestCounter", "fetch_stats", "reset_stats"]

CONTROL = "/__loopback__/"
_PIECE = 1 << 20


class RequestCounter:
    """Body bytes and requests served, by method, status and path; safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0
        self._requests: Counter[str] = Counter()
        self._status: Counter[int] = Counter()
        self._path_bytes: Counter[str] = Counter()

    def reset(self) -> dict[str, Any]:
        """Zero the counts; returns the snapshot taken just before."""
        with self._lock:
            before = self._snapshot_locked()
            self._bytes = 0
            self._requests.clear()
            self._status.clear()
            self._path_bytes.clear()
        return before

    def request(self, method: str, status: int, path: str) -> None:
        with self._lock:
            self._requests[method] += 1
            self._status[status] += 1
            self._path_bytes[path] += 0

    def sent(self, path: str, n: int) -> None:
        with self._lock:
            self._bytes += n
            self._path_bytes[path] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {
            "bytes": self._bytes,
            "requests": sum(self._requests.values()),
            "by_method": dict(self._requests),
            "by_status": {str(k): v for k, v in sorted(self._status.items())},
            "paths": len(self._path_bytes),
            "path_bytes": dict(self._path_bytes),
        }


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end_exclusive)`` for one satisfiable range; None: ignore the header (serve
    the whole file: malformed or several ranges); ``"unsatisfiable"``: answer 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not all(p.isdigit() for p in (first, last) if p):
        return None
    if not first:  # a suffix: the last N bytes
        n = int(last)
        return (max(0, size - n), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # last < first: an invalid range, ignored
    if start >= size:
        return "unsatisfiable"
    return (start, min(end, size))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        if self.path.startswith(CONTROL):
            self._control()
            return
        self._serve(body=True)

    def _control(self) -> None:
        what = self.path[len(CONTROL) :].split("?", 1)[0]
        counter = self.server.counter
        if what == "stats":
            payload = counter.snapshot()
        elif what == "reset":
            payload = counter.reset()
        else:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = json.dumps(payload).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _file(self) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = (self.server.root / rel).resolve()
        if path != self.server.root and self.server.root not in path.parents:
            return None
        return path if path.is_file() else None

    def _serve(self, body: bool) -> None:
        path = self._file()
        name = urllib.parse.urlsplit(self.path).path
        counter = self.server.counter
        if path is None:
            counter.request(self.command, 404, name)
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size, etag = st.st_size, _etag(st)
            start, end, status = 0, size, HTTPStatus.OK
            header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if self.server.ranges and header and (if_range is None or if_range.strip() == etag):
                rng = _parse_range(header, size)
                if rng == "unsatisfiable":
                    counter.request(self.command, 416, name)
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if isinstance(rng, tuple):
                    start, end = rng
                    status = HTTPStatus.PARTIAL_CONTENT
            counter.request(self.command, int(status), name)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            if self.server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()  # flushes the headers: the body can go out by sendfile
            if not body:
                return
            sock = self.connection.fileno()
            pos = start
            try:
                while pos < end:
                    n = os.sendfile(sock, f.fileno(), pos, min(_PIECE, end - pos))
                    if n == 0:
                        break
                    pos += n
                    counter.sent(name, n)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], root: Path, ranges: bool) -> None:
        super().__init__(addr, _Handler)
        self.root = root.resolve()
        self.ranges = ranges
        self.counter = RequestCounter()


class LoopbackServer:
    """Serve ``root`` on ``host:port`` (0: any free port) from a background thread.

    ``with LoopbackServer(dir) as srv: srv.url, srv.counter.reset(), srv.counter.snapshot()``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ranges: bool = True,
    ) -> None:
        self._server = _Server((host, port), Path(root), ranges)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def counter(self) -> RequestCounter:
        return self._server.counter

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _control(url: str, what: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + CONTROL + what, timeout=10) as r:
        return json.loads(r.read())


def fetch_stats(url: str) -> dict[str, Any]:
    """The counter of the server at ``url`` (another process)."""
    return _control(url, "stats")


def reset_stats(url: str) -> dict[str, Any]:
    """Reset the counter of the server at ``url``; returns the counts before the reset."""
    return _control(url, "reset")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="directory to serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port")
    ap.add_argument(
        "--no-range", action="store_true", help="ignore Range headers (always 200, whole file)"
    )
    args = ap.parse_args()
    srv = LoopbackServer(args.root, host=args.host, port=args.port, ranges=not args.no_range)
    # The first line is the URL: a parent process reads it to find the port.
    print(f"serving {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stats = srv.counter.snapshot()
        stats.pop("path_bytes")
        print(json.dumps(stats), file=sys.stderr)
        srv._server.server_close()


if __name__ == "__main__":
    main()
