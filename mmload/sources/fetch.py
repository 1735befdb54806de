"""Bringing remote and piped shards to local disk, whole, robustly, once.

:func:`download` writes one object to a local file atomically (a ``.fetch-*`` temp file in the
destination's directory, then :func:`os.replace`): ``http(s)://`` through our own client
(:mod:`mmload.sources.http`: connect and read timeouts, retries with exponential backoff,
resume with ``Range`` where the server supports it), ``s3://`` and other fsspec URLs (retries,
reopening at the offset reached), ``file://`` and local paths (a copy) and ``pipe:CMD`` (the
command's stdout, once). Compressed tars (``.tar.gz``) are downloaded raw, then decompressed.
:func:`stat_remote` reports an object's size and version, to tell a changed object from the
one a manifest indexed. The node's shard cache (:mod:`mmload.sources.cache`) decides what is
fetched, when, and where.

Failures about the object raise :class:`~mmload.errors.ShardError` naming the URL; failures
writing the local file (a full disk) raise :class:`OSError` unchanged and are not retried.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import random
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from mmload.config import RemoteConfig
from mmload.errors import ShardError
from mmload.sources import http
from mmload.sources.http import NETWORK_ERRORS
from mmload.sources.spec import is_local, local_path

__all__ = [
    "FETCH_STATS",
    "FetchStats",
    "RemoteObject",
    "default_cache_dir",
    "download",
    "stat_remote",
]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_FS_BLOCK = 8 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteObject:
    """What a server reports about an object: its stored size (before any gunzip) and its
    version (ETag without quotes, else a Last-Modified or mtime token); None if unknown."""

    size: int | None
    version: str | None


class FetchStats:
    """Thread-safe counters of this process's downloads: raw bytes read, requests (HTTP
    requests, fsspec opens and infos, local opens, pipe runs) and retries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0
        self.retries = 0

    def add(self, *, nbytes: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.requests += requests
            self.retries += retries

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"bytes": self.bytes, "requests": self.requests, "retries": self.retries}

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.requests = self.retries = 0


FETCH_STATS = FetchStats()


def default_cache_dir() -> Path:
    """``$MMLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmload``, else ``~/.cache/mmload``."""
    env = os.environ.get("MMLOAD_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "mmload" if xdg else Path.home() / ".cache" / "mmload"


# -- retries ------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failed attempt worth retrying (network error, 5xx, 429, short body, stall)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _retrying(url: str, cfg: RemoteConfig, what: str, attempt: Callable[[], T]) -> T:
    """``attempt()`` until it returns, sleeping with exponential backoff after each
    :class:`_Transient`; ShardError once ``cfg.retries`` retries have failed."""
    attempts = cfg.retries + 1
    delay = cfg.backoff
    failed = 0
    while True:
        try:
            return attempt()
        except _Transient as e:
            failed += 1
            if failed == attempts:
                tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
                raise ShardError(f"cannot {what} after {tries}: {e}", shard=url) from e
            wait = min(delay, cfg.backoff_max) * random.uniform(0.8, 1.0)
            if e.retry_after is not None:
                wait = max(wait, min(e.retry_after, cfg.backoff_max))
            log.warning(
                "%s: attempt %d of %d failed (%s); retrying in %.2fs",
                url,
                failed,
                attempts,
                e,
                wait,
            )
            FETCH_STATS.add(retries=1)
            time.sleep(wait)
            delay *= 2


def _differs(a: RemoteObject, b: RemoteObject) -> bool:
    """Whether ``a`` and ``b`` are different objects: a size or a version known to both differs."""
    return (None not in (a.size, b.size) and a.size != b.size) or (
        None not in (a.version, b.version) and a.version != b.version
    )


def _check_expect(url: str, expect: RemoteObject | None, got: RemoteObject) -> None:
    if expect is not None and _differs(expect, got):
        raise ShardError(
            "shard changed since it was indexed: the manifest has "
            f"size {expect.size}, version {expect.version!r}; the source now reports "
            f"size {got.size}, version {got.version!r}",
            shard=url,
        )


@dataclass
class _Progress:
    """One download's state across attempts: bytes written and what the source reported."""

    offset: int = 0
    size: int | None = None
    version: str | None = None
    etag: str | None = None  # the raw ETag header, for If-Range

    def changed(self, got: RemoteObject) -> bool:
        return _differs(RemoteObject(self.size, self.version), got)

    def reset(self) -> None:
        self.offset, self.size, self.version, self.etag = 0, None, None, None


def _restart(out: IO[bytes], p: _Progress) -> None:
    p.offset = 0
    out.seek(0)
    out.truncate()


# -- http(s) ------------------------------------------------------------------------------------


def _http_open(
    method: str, url: str, cfg: RemoteConfig, headers: dict[str, str], accept: frozenset[int]
) -> http.Response:
    """The response if its status is in ``accept``; else a ShardError (404, 410: not found;
    401, 403: access denied; other 4xx) or a :class:`_Transient` (5xx, 429, network error)."""
    FETCH_STATS.add(requests=1)
    try:
        resp = http.request(
            method,
            url,
            headers,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
        )
    except http.RedirectError as e:
        raise ShardError(f"cannot fetch shard: {e}", shard=url) from None
    except NETWORK_ERRORS as e:
        raise _Transient(_describe(e)) from e
    status = resp.status
    if status in accept:
        return resp
    resp.close()
    what = f"HTTP {status} {resp.reason}".rstrip()
    if status in (404, 410):
        raise ShardError(f"shard not found ({what})", shard=url)
    if status in (401, 403):
        raise ShardError(f"access denied ({what})", shard=url)
    if status == 429 or status >= 500:
        raise _Transient(what, _retry_after(resp.header("Retry-After")))
    raise ShardError(f"cannot fetch shard: {what}", shard=url)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: ignored, the backoff applies


def _content_length(resp: http.Response) -> int | None:
    value = resp.header("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _http_download(
    url: str, out: IO[bytes], cfg: RemoteConfig, expect: RemoteObject | None
) -> RemoteObject:
    p = _Progress()

    def attempt() -> RemoteObject:
        headers = {}
        if p.offset:
            headers["Range"] = f"bytes={p.offset}-"
            if p.etag and not p.etag.startswith("W/"):
                headers["If-Range"] = p.etag  # a changed object comes back whole (200)
        with _http_open("GET", url, cfg, headers, frozenset({200, 206, 416})) as resp:
            if resp.status == 416:  # the object is now shorter than what we have
                msg = f"HTTP 416 for bytes from {p.offset}: the object changed"
                p.reset()
                raise _Transient(msg)
            if resp.status == 206:
                cr = http.content_range(resp.header("Content-Range"))
                if cr is None or cr[0] != p.offset:
                    value = resp.header("Content-Range")
                    p.reset()
                    raise _Transient(f"HTTP 206 with Content-Range {value!r} for a resume")
                size = cr[2]
            else:
                size = _content_length(resp)
            got = RemoteObject(size, http.version_of(resp))
            _check_expect(url, expect, got)
            if p.offset and p.changed(got):
                log.warning("%s changed between attempts; fetching it from the start", url)
                if resp.status == 206:
                    p.reset()
                    raise _Transient("the object changed between attempts")
            if resp.status == 200:  # whole object: a first attempt, or no Range support
                _restart(out, p)
            p.size, p.version, p.etag = got.size, got.version, resp.header("ETag")
            if p.size is None and expect is not None:
                p.size = expect.size
            while True:
                try:
                    chunk = resp.read1(_CHUNK)
                except NETWORK_ERRORS as e:
                    raise _Transient(f"{_describe(e)} after {p.offset} bytes") from e
                if not chunk:
                    break
                out.write(chunk)
                p.offset += len(chunk)
                FETCH_STATS.add(nbytes=len(chunk))
        if p.size is not None and p.offset < p.size:
            raise _Transient(f"short body: {p.offset} of {p.size} bytes")
        return RemoteObject(p.offset, p.version)

    got = _retrying(url, cfg, "fetch shard", attempt)
    _check_expect(url, expect, got)
    return got


def _http_stat(url: str, cfg: RemoteConfig) -> RemoteObject:
    def attempt() -> RemoteObject:
        with _http_open("HEAD", url, cfg, {}, frozenset({200, 403, 405, 501})) as resp:
            if resp.status == 200:
                return RemoteObject(_content_length(resp), http.version_of(resp))
        # HEAD refused (a presigned GET URL, a server without HEAD): ask for the first byte.
        ok = frozenset({200, 206})
        with _http_open("GET", url, cfg, {"Range": "bytes=0-0"}, ok) as resp:
            if resp.status == 206:
                cr = http.content_range(resp.header("Content-Range"))
                size = cr[2] if cr is not None else None
            else:
                size = _content_length(resp)
            return RemoteObject(size, http.version_of(resp))

    return _retrying(url, cfg, "stat shard", attempt)


# -- fsspec (s3:// and others) ------------------------------------------------------------------


def _fs(url: str, cfg: RemoteConfig) -> tuple[Any, str]:
    import fsspec

    options: dict[str, Any] = {}
    if url.split("://", 1)[0] in ("s3", "s3a"):
        timeouts = {"connect_timeout": cfg.connect_timeout, "read_timeout": cfg.read_timeout}
        options["config_kwargs"] = timeouts
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ValueError, ImportError) as e:
        raise ShardError(f"cannot open shard URL: {_describe(e)}", shard=url) from None


def _fs_object(info: Mapping[str, Any]) -> RemoteObject:
    size = info.get("size")
    version = None
    keys = ("ETag", "etag", "generation", "LastModified", "last_modified", "mtime", "updated")
    for key in (*keys, "created"):
        value = info.get(key)
        if value is not None and value != "":
            text = value.isoformat() if hasattr(value, "isoformat") else str(value)
            version = text.strip().strip('"')
            break
    return RemoteObject(int(size) if size is not None else None, version)


def _fs_call(url: str, fn: Callable[[], T], done: int = 0) -> T:
    """``fn()``, with a missing object or refused access as ShardError, anything else (the
    backends raise their own types: botocore, aiohttp, ...) as :class:`_Transient`."""
    try:
        return fn()
    except FileNotFoundError:
        raise ShardError("shard not found", shard=url) from None
    except PermissionError as e:
        raise ShardError(f"access denied ({_describe(e)})", shard=url) from None
    except Exception as e:
        where = f" after {done} bytes" if done else ""
        raise _Transient(f"{_describe(e)}{where}") from e


def _fs_stat(url: str, cfg: RemoteConfig) -> RemoteObject:
    fs, path = _fs(url, cfg)

    def attempt() -> RemoteObject:
        FETCH_STATS.add(requests=1)
        fs.invalidate_cache(path)  # a listing cached by a glob may be stale
        return _fs_object(_fs_call(url, lambda: fs.info(path)))

    return _retrying(url, cfg, "stat shard", attempt)


def _fs_download(
    url: str, out: IO[bytes], cfg: RemoteConfig, expect: RemoteObject | None
) -> RemoteObject:
    fs, path = _fs(url, cfg)
    p = _Progress()

    def attempt() -> RemoteObject:
        FETCH_STATS.add(requests=1)
        fs.invalidate_cache(path)
        f = _fs_call(url, lambda: fs.open(path, "rb", block_size=_FS_BLOCK))
        with contextlib.closing(f):
            details = getattr(f, "details", None)  # s3fs: the info its open fetched
            if isinstance(details, Mapping):
                info = details
            else:
                FETCH_STATS.add(requests=1)
                info = _fs_call(url, lambda: fs.info(path))
            got = _fs_object(info)
            _check_expect(url, expect, got)
            if p.offset and p.changed(got):
                log.warning("%s changed between attempts; fetching it from the start", url)
                p.offset = 0
            if p.offset:
                try:
                    f.seek(p.offset)
                except (OSError, ValueError):  # not seekable: read it all again
                    p.offset = 0
            if not p.offset:
                _restart(out, p)
            p.size, p.version = got.size, got.version
            while True:
                chunk: bytes = _fs_call(url, lambda: f.read(_CHUNK), p.offset)
                if not chunk:
                    break
                out.write(chunk)
                p.offset += len(chunk)
                FETCH_STATS.add(nbytes=len(chunk))
        if p.size is not None and p.offset < p.size:
            raise _Transient(f"short read: {p.offset} of {p.size} bytes")
        if p.size is not None and p.offset > p.size:
            msg = f"read {p.offset} bytes of an object of {p.size}: it changed"
            p.reset()
            raise _Transient(msg)
        return RemoteObject(p.offset, p.version)

    got = _retrying(url, cfg, "fetch shard", attempt)
    _check_expect(url, expect, got)
    return got


# -- local files and pipes ----------------------------------------------------------------------


def _local_object(path: str, url: str) -> RemoteObject:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError("shard not found", shard=url) from None
    except PermissionError as e:
        raise ShardError(f"access denied ({_describe(e)})", shard=url) from None
    return RemoteObject(st.st_size, str(st.st_mtime_ns))


def _local_download(url: str, out: IO[bytes], expect: RemoteObject | None) -> RemoteObject:
    path = local_path(url)
    FETCH_STATS.add(requests=1)
    try:
        src = open(path, "rb")  # noqa: SIM115 (closed below; errors here are the source's)
    except FileNotFoundError:
        raise ShardError("shard not found", shard=url) from None
    except OSError as e:  # PermissionError, IsADirectoryError, ...
        raise ShardError(f"cannot open shard: {_describe(e)}", shard=url) from None
    with src:
        st = os.fstat(src.fileno())
        got = RemoteObject(st.st_size, str(st.st_mtime_ns))
        _check_expect(url, expect, got)
        n = 0
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            n += len(chunk)
            FETCH_STATS.add(nbytes=len(chunk))
    return RemoteObject(n, got.version)


def _run_pipe(url: str, out: IO[bytes]) -> RemoteObject:
    """The stdout of ``pipe:CMD`` into ``out``; ShardError if the command fails."""
    cmd = url[len("pipe:") :]
    FETCH_STATS.add(requests=1)
    # stderr goes to a file, not a pipe: a chatty command must not block on a full stderr pipe
    # while we read its stdout.
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=err)
        except OSError as e:
            raise ShardError(f"cannot run pipe command: {_describe(e)}", shard=url) from None
        n = 0
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(_CHUNK):
                out.write(chunk)
                n += len(chunk)
                FETCH_STATS.add(nbytes=len(chunk))
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if code != 0:
            err.seek(0)
            tail = err.read()[-500:].decode(errors="replace").strip()
            raise ShardError(f"pipe command exited with {code}: {tail}", shard=url)
    return RemoteObject(n, None)


def _gunzip(src: str, out: IO[bytes], url: str) -> None:
    with open(src, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
        while True:
            try:
                chunk = gz.read(_CHUNK)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise ShardError(f"corrupt gzip stream: {_describe(e)}", shard=url) from None
            if not chunk:
                return
            out.write(chunk)


# -- public API ---------------------------------------------------------------------------------


def stat_remote(url: str, cfg: RemoteConfig) -> RemoteObject:
    """Size and version of the object at ``url``, without fetching it.

    ``http(s)``: a HEAD request (a ranged GET of one byte where HEAD is refused), retried like
    :func:`download`; other URLs: fsspec ``info()``; local paths: size and ``st_mtime_ns``.
    A missing object raises ShardError ``shard not found``.
    """
    if url.startswith("pipe:"):
        return RemoteObject(None, None)
    if is_local(url):
        return _local_object(local_path(url), url)
    if url.startswith(("http://", "https://")):
        return _http_stat(url, cfg)
    return _fs_stat(url, cfg)


def download(
    url: str,
    dest: str | os.PathLike[str],
    cfg: RemoteConfig,
    *,
    compressed: bool = False,
    expect: RemoteObject | None = None,
) -> RemoteObject:
    """Write the object at ``url`` (gunzipped if ``compressed``) to ``dest``, atomically.

    Returns what was fetched: the raw (stored) size and the version. With ``expect``, an
    object whose size or version differs raises ShardError (it changed since it was
    indexed). A failed download leaves ``dest`` as it was and removes its temp files.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []

    def temp() -> tuple[int, str]:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
        temps.append(name)
        return fd, name

    try:
        fd, raw = temp()
        with os.fdopen(fd, "w+b") as out:
            if url.startswith("pipe:"):
                got = _run_pipe(url, out)
                _check_expect(url, expect, got)
            elif is_local(url):
                got = _local_download(url, out, expect)
            elif url.startswith(("http://", "https://")):
                got = _http_download(url, out, cfg, expect)
            else:
                got = _fs_download(url, out, cfg, expect)
        if compressed:
            fd, plain = temp()
            with os.fdopen(fd, "wb") as dst:
                _gunzip(raw, dst, url)
            os.replace(plain, dest)
        else:
            os.replace(raw, dest)
    finally:
        for name in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    log.info("fetched %s -> %s (%s bytes)", url, dest, got.size)
    return got
