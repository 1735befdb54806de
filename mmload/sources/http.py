"""A minimal HTTP(S) client for whole-object shard downloads, on :mod:`http.client`.

One connection per request (``Connection: close``), a connect timeout and a separate per-read
timeout on the socket (a body that stalls longer fails), redirects followed, no transparent
compression (``Accept-Encoding: identity``: the bytes are the object as stored), Basic auth
from ``user:password@`` in the URL. Retries, resume and validation are the caller's
(:mod:`mmload.sources.fetch`).
"""

from __future__ import annotations

import base64
import http.client
import re
import ssl
from types import TracebackType
from urllib.parse import unquote, urljoin, urlsplit

__all__ = [
    "NETWORK_ERRORS",
    "RedirectError",
    "Response",
    "content_range",
    "request",
    "version_of",
]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_ssl_context: ssl.SSLContext | None = None

#: What a failed connection, request or body read raises.
NETWORK_ERRORS: tuple[type[Exception], ...] = (OSError, http.client.HTTPException)


class RedirectError(ValueError):
    """A redirect loop, a redirect without ``Location``, or one to a non-HTTP URL."""


class Response:
    """An open HTTP response and its connection; closing it closes both."""

    def __init__(
        self, url: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
    ) -> None:
        self.url = url  # the final URL, after redirects
        self.status = resp.status
        self.reason = resp.reason
        self._conn = conn
        self._resp = resp

    def header(self, name: str) -> str | None:
        return self._resp.getheader(name)

    def read1(self, n: int) -> bytes:
        """Up to ``n`` body bytes with at most one socket read; ``b""`` at the end of the body
        (or when the peer closed early: compare the count with the expected length)."""
        return self._resp.read1(n)

    def close(self) -> None:
        try:
            self._resp.close()
        finally:
            self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    connect_timeout: float,
    read_timeout: float,
    max_redirects: int = 5,
) -> Response:
    """Send ``method url`` and return the response once its headers have arrived.

    Network failures raise :class:`OSError` (``TimeoutError``, ``ConnectionError``, ...) or
    :class:`http.client.HTTPException`; a bad redirect raises :class:`RedirectError`. Any
    status is returned except a redirect, which is followed (``headers`` are sent again).
    """
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RedirectError(f"not an http(s) URL: {url!r}")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=connect_timeout, context=_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout)
        hdrs = {"Accept-Encoding": "identity", "Connection": "close", "User-Agent": "mmload"}
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            hdrs["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        hdrs.update(headers or {})
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)  # every later socket read, not only the first
            conn.request(method, target, headers=hdrs)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        location = resp.getheader("Location")
        if resp.status not in _REDIRECTS:
            return Response(url, conn, resp)
        resp.close()
        conn.close()
        if not location:
            raise RedirectError(f"HTTP {resp.status} without a Location header from {url!r}")
        url = urljoin(url, location)
        if resp.status == 303 and method != "HEAD":
            method = "GET"
    raise RedirectError(f"more than {max_redirects} redirects")


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, total)`` of a ``Content-Range: bytes first-last/total`` header
    (``total`` None for ``*``); None if absent or malformed."""
    m = _CONTENT_RANGE.match(value or "")
    if m is None:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def version_of(resp: Response) -> str | None:
    """The object's version token: its ETag without quotes, else its Last-Modified date."""
    etag = resp.header("ETag")
    if etag:
        weak = etag.startswith("W/")
        tag = etag[2:] if weak else etag
        return ("W/" if weak else "") + tag.strip().strip('"')
    return resp.header("Last-Modified") or None
