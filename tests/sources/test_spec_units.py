"""mmload.sources.spec on its own: formats by name and by magic bytes, brace patterns as bash
expands them, globs (local and fsspec's in-memory file system), directories, and the spec's
errors. Written from the module's mutants (issue 15)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from mmload.errors import ConfigError, ShardError
from mmload.sources.spec import ShardSpec, _expand_braces, expand, is_local, kind_of, local_path


def test_kind_by_name() -> None:
    cases = {
        "a.tar": "tar",
        "a.tar.gz": "tar",
        "a.tgz": "tar",
        "a.parquet": "parquet",
        "a.pq": "parquet",
        "a.arrow": "arrow",
        "a.feather": "arrow",
        "a.ipc": "arrow",
        "a.jsonl": "json",
        "a.ndjson": "json",
        "s3://b/A.PARQUET": "parquet",  # case-insensitive
        "https://h/a.tar?sig=x.parquet": "tar",  # the query is not the name
        "https://h/x.parquet/a.jsonl": "json",
    }
    for url, kind in cases.items():
        assert kind_of(url) == kind, url


def test_kind_by_magic_bytes(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"PAR1" + b"\0" * 100)
    (tmp_path / "a").write_bytes(b"ARROW1" + b"\0" * 100)
    with tarfile.open(tmp_path / "t", "w") as tf:
        tf.addfile(tarfile.TarInfo("x"))
    assert [kind_of(str(tmp_path / n)) for n in "pat"] == ["parquet", "arrow", "tar"]
    assert kind_of("file://" + str(tmp_path / "p")) == "parquet"
    short = tmp_path / "short"  # "ustar" where a tar header has it, but not 512 bytes
    short.write_bytes(b"\0" * 257 + b"ustar")
    other = tmp_path / "other"
    other.write_bytes(b"PAR2" + b"\0" * 600)
    for bad in (short, other, tmp_path / "missing", tmp_path):
        with pytest.raises(ShardError) as e:
            kind_of(str(bad))
        assert e.value.reason == (
            "unknown shard format: expected .tar, .tar.gz, .parquet, .arrow or .jsonl "
            "(or a file with their magic bytes)"
        )
        assert e.value.shard == str(bad)
    with pytest.raises(ShardError):
        kind_of(str(tmp_path / "p"), sniff=False)
    with pytest.raises(ShardError):
        kind_of("s3://b/p")  # a remote object is not opened to sniff


def test_local_urls_and_compression() -> None:
    assert is_local("/a/b.tar") and is_local("b.tar") and is_local("file:///a/b.tar")
    assert not is_local("s3://b/a.tar") and not is_local("pipe:cat a.tar")
    assert local_path("file:///a/b.tar") == "/a/b.tar" and local_path("/a/b.tar") == "/a/b.tar"
    assert local_path("s3://b/a.tar") == "s3://b/a.tar"
    assert ShardSpec("a.tar.gz", "tar").compressed and ShardSpec("a.tgz", "tar").compressed
    assert not ShardSpec("a.tar", "tar").compressed
    assert not ShardSpec("a.gz.parquet", "parquet").compressed


def test_brace_patterns_as_bash_expands_them() -> None:
    cases = {
        "x": ["x"],
        "{a,b}": ["a", "b"],
        "p{a,b}s": ["pas", "pbs"],
        "{a,}x": ["ax", "x"],
        "{a,{b,c}}-{1,2}": ["a-1", "a-2", "b-1", "b-2", "c-1", "c-2"],
        "{1..3}": ["1", "2", "3"],
        "{3..1}": ["3", "2", "1"],
        "{8..10}": ["8", "9", "10"],  # no leading zero, lengths differ: no padding
        "{01..3}": ["01", "02", "03"],  # a leading zero pads to its width
        "{10..08}": ["10", "09", "08"],
        "{00..2}": ["00", "01", "02"],
        "{5..5}": ["5"],
        "{x}": ["{x}"],  # one alternative: literal
        "{x}{1..2}": ["{x}1", "{x}2"],
        "a{b{1..2}}c": ["a{b1}c", "a{b2}c"],
        "{a,b}{,}": ["a", "a", "b", "b"],
    }
    for pattern, want in cases.items():
        assert _expand_braces(pattern) == want, pattern
    for bad in ("{a,b", "x-{1..2.tar", "{{a}"):
        with pytest.raises(ConfigError) as e:
            _expand_braces(bad)
        assert str(e.value) == f"shard pattern {bad!r}: unbalanced braces"


def test_expand_directories_and_globs(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for name in ("b.tar", "a.PARQUET", "c.jsonl", ".hidden.tar", "_tmp.tar", "notes.txt"):
        (d / name).write_bytes(b"PAR1" if name.endswith("PARQUET") else b"x")
    (d / "sub.tar").mkdir()  # a directory named like a shard is listed too
    got = [s.url for s in expand(str(d))]
    assert got == [str(d / n) for n in ("a.PARQUET", "b.tar", "c.jsonl", "sub.tar")]
    globbed = [s.url for s in expand(str(d / "*.tar"))]  # a glob is taken as written
    assert globbed == [str(d / n) for n in ("_tmp.tar", "b.tar", "sub.tar")]
    assert [s.url for s in expand(str(d / "[bc].*"))] == [str(d / "b.tar"), str(d / "c.jsonl")]
    assert [s.url for s in expand(str(d / "?.tar"))] == [str(d / "b.tar")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_bytes(b"x")
    with pytest.raises(ShardError) as e:
        expand(str(empty))
    assert e.value.reason == "directory holds no .tar/.parquet/.arrow/.jsonl shards"
    assert e.value.shard == str(empty)
    with pytest.raises(ShardError) as e:
        expand(str(d / "*.arrow"))
    assert (e.value.reason, e.value.shard) == ("glob matched no files", str(d / "*.arrow"))
    # A brace pattern names files: a directory among them is not listed.
    (tmp_path / "s0.tar").write_bytes(b"x")
    with pytest.raises(ShardError, match="unknown shard format"):
        expand(str(tmp_path / "{s0.tar,d}"))
    # Paths that do not exist pass (the reader reports them), and path-like objects work.
    assert [s.url for s in expand([Path(tmp_path / "s0.tar"), "file://" + str(d / "b.tar")])] == [
        str(tmp_path / "s0.tar"),
        str(d / "b.tar"),
    ]
    assert expand(str(tmp_path / "later.tar"))[0].url == str(tmp_path / "later.tar")


def test_expand_remote_globs_with_fsspec() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("b.tar", "a.tar", "c.parquet"):
        fs.pipe(f"/mmload-spec/{name}", b"x")
    try:
        got = [(s.url, s.kind) for s in expand("memory://mmload-spec/*.tar")]
        # fsspec's paths without the protocol, which is put back (the memory file system keeps
        # its root's slash); sorted
        want = ["memory:///mmload-spec/a.tar", "memory:///mmload-spec/b.tar"]
        assert got == [(u, "tar") for u in want]
        assert [fs.cat(u) for u, _ in got] == [b"x", b"x"]
        with pytest.raises(ShardError) as e:
            expand("memory://mmload-spec/*.arrow")
        assert e.value.reason == "glob matched no objects"
        # No glob: passed on unchecked.
        assert expand("s3://bucket/x-{0..1}.tar")[1].url == "s3://bucket/x-1.tar"
    finally:
        fs.rm("/mmload-spec", recursive=True)


def test_expand_errors_and_pipes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        expand([])
    assert str(e.value) == "the shard spec is empty"
    with pytest.raises(ConfigError) as e:
        expand(["a.tar", 3])  # type: ignore[list-item]
    assert str(e.value) == "shard spec entry 3: must be a str or path"
    with pytest.raises(ConfigError) as e:
        expand(["a.tar", "b.tar", "a.tar"])
    assert str(e.value) == "shard 'a.tar' appears twice in the spec"
    with pytest.raises(ConfigError) as e:
        expand("pipe:cat x")
    assert str(e.value) == (
        "shard 'pipe:cat x': 'pipe:' URLs run shell commands and are refused; "
        "pass allow_pipe=True to enable them"
    )
    (spec,) = expand("pipe:cat {a,b}.weird", allow_pipe=True)  # not expanded, always a tar
    assert (spec.url, spec.kind) == ("pipe:cat {a,b}.weird", "tar")
    # A str spec and a list of one give the same.
    assert expand(str(tmp_path / "a.tar")) == expand([str(tmp_path / "a.tar")])


def test_more_spec_forms(tmp_path: Path) -> None:
    # A "?" inside the query (allowed by RFC 3986) is still the query.
    assert kind_of("https://h/a.parquet?sig=ab?cd") == "parquet"
    # A descending range without zero padding: widths as bash gives them.
    assert _expand_braces("{10..8}") == ["10", "9", "8"]
    # Alternatives after a nested group are still alternatives.
    assert _expand_braces("{a{b,c},d}.tar") == ["ab.tar", "ac.tar", "d.tar"]
    # Globs in several brace alternatives: the files of each, in the order of the braces.
    for d, names in (("y", ["1.tar", "0.tar"]), ("x", ["2.tar"])):
        (tmp_path / d).mkdir()
        for n in names:
            (tmp_path / d / n).write_bytes(b"")
    got = [s.url for s in expand(str(tmp_path / "{y,x}" / "*.tar"))]
    assert got == [str(tmp_path / p) for p in ("y/0.tar", "y/1.tar", "x/2.tar")]


def test_remote_globs_in_brace_alternatives() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("x/b.tar", "x/a.tar", "y/c.tar"):
        fs.pipe(f"/mmload-spec2/{name}", b"x")
    try:
        got = [s.url for s in expand("memory://mmload-spec2/{y,x}/*.tar")]
        assert got == [f"memory:///mmload-spec2/{n}" for n in ("y/c.tar", "x/a.tar", "x/b.tar")]
        with pytest.raises(ShardError) as e:
            expand("memory://mmload-spec2/z/*.tar")
        assert e.value.shard == "memory://mmload-spec2/z/*.tar"
    finally:
        fs.rm("/mmload-spec2", recursive=True)
