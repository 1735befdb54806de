"""Shard specs: lists, braces, globs, directories, file://, pipe: refusal, HTTP on loopback."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmload.errors import ConfigError, ShardError
from mmload.sources import Dataset, expand
from mmload.sources.spec import _expand_braces


def test_brace_expansion() -> None:
    assert _expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert _expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert _expand_braces("x-{8..10}.tar") == ["x-8.tar", "x-9.tar", "x-10.tar"]
    with pytest.raises(ConfigError, match="unbalanced"):
        _expand_braces("x-{1..2.tar")


def test_expand_forms(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([1, 1, 1])
    assert [s.url for s in expand(paths)] == paths
    assert [s.url for s in expand(str(tmp_path / "data-{0000..0002}.tar"))] == paths
    assert [s.url for s in expand(str(tmp_path / "data-*.tar"))] == paths
    assert [s.url for s in expand(str(tmp_path))] == paths
    assert [s.url for s in expand("file://" + paths[0])] == [paths[0]]
    assert all(s.kind == "tar" for s in expand(paths))
    with pytest.raises(ShardError, match="glob matched no files"):
        expand(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ConfigError, match="twice"):
        expand([paths[0], paths[0]])
    with pytest.raises(ConfigError, match="empty"):
        expand([])


def test_pipe_is_refused_unless_enabled(make_shards) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([3])
    with pytest.raises(ConfigError, match="allow_pipe"):
        expand(f"pipe:cat {paths[0]}")
    ds = Dataset.open(f"pipe:cat {paths[0]}", allow_pipe=True, cache_dir=paths[0] + ".cache")
    assert [s["__key__"] for s in ds.read(np.arange(3))] == keys  # type: ignore[index]
    with pytest.raises(ShardError, match="exited with"):
        Dataset.open("pipe:false", allow_pipe=True, cache_dir=paths[0] + ".cache")


def test_gzip_tar(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import gzip

    paths, keys = make_shards([4])
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(Path(paths[0]).read_bytes()))
    ds = Dataset.open(str(gz), cache_dir=tmp_path / "cache")
    assert [s["__key__"] for s in ds.read(np.arange(4))] == keys  # type: ignore[index]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on loopback serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_shards_over_http(make_shards, http_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, base = http_root
    paths, keys = make_shards([3, 2])
    for p in paths:
        (root / Path(p).name).write_bytes(Path(p).read_bytes())
    url = base + "/data-{0000..0001}.tar"
    cache = tmp_path / "cache"
    ds = Dataset.open(url, cache_dir=cache)
    got = ds.read(np.arange(5))
    local = Dataset.open(paths, index_cache=False).read(np.arange(5))
    assert [s["__key__"] for s in got] == keys  # type: ignore[index]
    for g, ref in zip(got, local, strict=True):
        assert isinstance(g, dict)
        assert isinstance(ref, dict)
        assert g["jpg"] == ref["jpg"]
        assert g["__shard__"].startswith("http://")
    # Fetched once: a second open finds the cached copy even with the server's file gone.
    for p in paths:
        (root / Path(p).name).unlink()
    again = Dataset.open(url, cache_dir=cache)
    assert again.num_samples == 5


def test_a_glob_over_http(http_root) -> None:  # type: ignore[no-untyped-def]
    # fsspec lists the server's directory page and gives whole URLs: kept as they are.
    root, base = http_root
    for name in ("b.tar", "a.tar", "c.parquet"):
        (root / name).write_bytes(b"x")
    assert [s.url for s in expand(base + "/*.tar")] == [base + "/a.tar", base + "/b.tar"]


def test_http_404_names_the_url(http_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, base = http_root
    with pytest.raises(ShardError) as e:
        Dataset.open(base + "/missing.tar", cache_dir=tmp_path / "cache")
    assert "missing.tar" in str(e.value)


def test_chatty_pipe_does_not_deadlock(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, keys = make_shards([3])
    cmd = f"pipe:python3 -c \"import sys; sys.stderr.write('x' * 300000)\"; cat {paths[0]}"
    ds = Dataset.open(cmd, allow_pipe=True, cache_dir=tmp_path / "c")
    assert [s["__key__"] for s in ds.read(np.arange(3))] == keys  # type: ignore[index]


def test_rewritten_local_targz_is_fetched_again(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import os

    paths, _ = make_shards([4, 9])
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(Path(paths[0]).read_bytes()))
    assert Dataset.open(str(gz), cache_dir=tmp_path / "c").num_samples == 4
    gz.write_bytes(gzip.compress(Path(paths[1]).read_bytes()))
    os.utime(gz, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    assert Dataset.open(str(gz), cache_dir=tmp_path / "c").num_samples == 9
