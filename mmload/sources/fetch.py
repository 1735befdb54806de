"""Bringing remote and piped shards to local disk, once, so that they can be indexed and pread.

Remote shards (``http(s)://``, ``s3://``, any fsspec URL) and ``pipe:`` commands are streamed
sequentially, exactly once, into ``<cache_dir>/shards/``; a later run finds them there (a size
check guards against a changed remote object). Compressed tars (``.tar.gz``) are decompressed
on the way. Local paths are used in place.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from mmload.errors import ShardError
from mmload.sources.spec import ShardSpec, is_local, local_path

__all__ = ["default_cache_dir", "localize"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$MMLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmload``, else ``~/.cache/mmload``."""
    env = os.environ.get("MMLOAD_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "mmload" if xdg else Path.home() / ".cache" / "mmload"


def _cache_name(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "shard"
    for suffix in (".tar.gz", ".tgz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)] + ".tar"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{safe}"


def _copy(src: IO[bytes], dst: IO[bytes], gunzip: bool) -> None:
    stream: IO[bytes] = gzip.GzipFile(fileobj=src) if gunzip else src  # type: ignore[assignment]
    shutil.copyfileobj(stream, dst, _CHUNK)


def _remote_size(url: str) -> int | None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info: dict[str, Any] = fs.info(path)
    except (OSError, ValueError):
        return None
    size = info.get("size")
    return int(size) if size is not None else None


def localize(shard: ShardSpec, cache_dir: Path) -> str:
    """A local file path holding ``shard``'s bytes (downloading or piping it if needed)."""
    url = shard.url
    if is_local(url) and not shard.compressed:
        return local_path(url)  # a missing file is reported when it is indexed (one stat)
    target = cache_dir / "shards" / _cache_name(url)
    if url.startswith("pipe:"):
        source_version = None
    elif is_local(url):
        try:
            st = os.stat(local_path(url))
        except FileNotFoundError:
            raise ShardError("shard file not found", shard=url) from None
        source_version = st.st_size * 1_000_000_007 + st.st_mtime_ns  # changes with size or mtime
    else:
        source_version = _remote_size(url)
    if target.exists():
        meta = target.with_suffix(target.suffix + ".size")
        recorded = int(meta.read_text()) if meta.exists() else None
        if source_version is None or recorded == source_version:
            return str(target)
        log.info("shard %s changed since it was cached; fetching it again", url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out:
            if url.startswith("pipe:"):
                _run_pipe(url, out, shard.compressed)
            elif is_local(url):
                with open(local_path(url), "rb") as src:
                    _copy(src, out, shard.compressed)
            else:
                import fsspec

                with fsspec.open(url, "rb") as src:
                    _copy(src, out, shard.compressed)
        os.replace(tmp, target)
    except FileNotFoundError:
        raise ShardError("shard not found", shard=url) from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ShardError(f"cannot fetch shard: {type(e).__name__}: {e}", shard=url) from None
    except Exception as e:  # fsspec backends raise their own types (aiohttp, botocore)
        raise ShardError(f"cannot fetch shard: {type(e).__name__}: {e}", shard=url) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if source_version is not None:
        target.with_suffix(target.suffix + ".size").write_text(str(source_version))
    log.info("fetched %s -> %s", url, target)
    return str(target)


def _run_pipe(url: str, out: IO[bytes], gunzip: bool) -> None:
    cmd = url[len("pipe:") :]
    # stderr goes to a file, not a pipe: a chatty command must not block on a full stderr pipe
    # while we read its stdout.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            _copy(proc.stdout, out, gunzip)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0:
            err.seek(0)
            tail = err.read()[-500:].decode(errors="replace").strip()
            raise OSError(f"pipe command exited with {code}: {tail}")
