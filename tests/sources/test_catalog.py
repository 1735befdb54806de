"""The catalog on its own: where a manifest is found (the spec, next to the shards, the cache),
when its records are trusted, what is indexed again, how bad shards and entries are listed and
what is saved. Local shards on disk and remote ones on a loopback HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmload.config import RemoteConfig
from mmload.errors import BadEntry, ConfigError, ShardError
from mmload.sources import catalog
from mmload.sources.cache import ShardCache
from mmload.sources.catalog import Catalog, in_cache, resolve
from mmload.sources.index import IndexStore
from mmload.sources.manifest import MANIFEST_NAME, Manifest
from mmload.sources.spec import ShardSpec
from mmload.sources.write import write_tar_shards
from tests.remote import servers
from tests.remote.servers import FileServer, Status

range_server = servers.range_server


def tars(d: Path, n: int = 2, per: int = 3, name: str = "s") -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"__key__": f"{name}{i:03d}", "txt": f"t{i}", "cls": str(i)} for i in range(n * per)]
    return write_tar_shards(rows, str(d / f"{name}-%03d.tar"), maxcount=per)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Env:
    def __init__(self, root: Path, fetchers: int = 8) -> None:
        self.cache_dir = root / "cache"
        self.cfg = RemoteConfig(fetchers=fetchers, retries=0, connect_timeout=5, read_timeout=5)

    def resolve(self, spec: Any, **kw: Any) -> Catalog:
        key_column = kw.pop("key_column", "__key__")
        skip_bad = kw.pop("skip_bad", False)
        use_cache = kw.pop("use_cache", True)
        store = kw.pop("store", IndexStore(self.cache_dir, key_column=key_column, skip=skip_bad))
        cache = kw.pop("cache", self.cache())
        return resolve(
            spec,
            key_column=key_column,
            skip_bad=skip_bad,
            cache_dir=self.cache_dir,
            use_cache=use_cache,
            allow_pipe=kw.pop("allow_pipe", False),
            store=store,
            cache=cache,
            **kw,
        )

    def cache(self) -> ShardCache:
        return ShardCache(self.cache_dir / "shards", self.cfg)


def cache_file(env: Env, urls: list[str], key_column: str | None, skip_bad: bool) -> Path:
    ident = json.dumps([[os.path.normpath(u) for u in urls], key_column, skip_bad])
    return env.cache_dir / "manifests" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("/d/a.tar", False),
        ("file:///d/a.tar", False),
        ("/d/a.tar.gz", True),
        ("/d/a.tgz", True),
        ("http://h/a.tar", True),
        ("s3://b/a.tar", True),
        ("pipe:cat a.tar", True),
    ],
)
def test_in_cache(url: str, want: bool) -> None:
    assert in_cache(ShardSpec(url, "tar")) is want


def test_norm_and_shard_entries() -> None:
    assert catalog._norm("/d/x/../a.tar") == "/d/a.tar"
    assert catalog._norm("file:///d/./a.tar") == "/d/a.tar"
    assert catalog._norm("s3://b/x/../a.tar") == "s3://b/x/../a.tar"
    e = ShardError("truncated member", shard="/d/a.tar", key="k7")
    assert catalog._shard_entry("/d/a.tar", e) == BadEntry(
        "/d/a.tar", None, "shard left out: truncated member (at key 'k7')"
    )
    e = ShardError("shard file not found", shard="/d/a.tar")
    assert catalog._shard_entry("/d/b.tar", e) == BadEntry(
        "/d/b.tar", None, "shard left out: shard file not found"
    )


# ---------------------------------------------------------------- reading a manifest


def test_reading_a_local_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path)
    cache = env.cache()
    url = str(tmp_path / "d" / MANIFEST_NAME)
    assert catalog._read_manifest(url, cache, required=False) is None
    with pytest.raises(ShardError) as e:
        catalog._read_manifest(url, cache, required=True)
    assert e.value.reason == "manifest not found" and e.value.shard == url
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST_NAME).mkdir()  # not a file
    assert catalog._read_manifest(url, cache, required=False) is None
    (tmp_path / "d" / MANIFEST_NAME).rmdir()
    shards = tars(tmp_path / "d")
    env.resolve(shards)
    Manifest.read(str(env_cached(env)), base=None, where="x").write(
        url, relative_to=str(tmp_path / "d")
    )
    got = catalog._read_manifest(url, cache, required=True)
    assert got is not None and [r.url for r in got.records] == shards  # relative to its dir
    got = catalog._read_manifest(f"file://{url}", cache, required=True)
    assert got is not None and [r.url for r in got.records] == shards
    monkeypatch.chdir(tmp_path / "d")
    got = catalog._read_manifest(MANIFEST_NAME, cache, required=True)
    assert got is not None and [r.url for r in got.records] == [
        os.path.join(".", os.path.basename(s)) for s in shards
    ]


def env_cached(env: Env) -> Path:
    (only,) = (env.cache_dir / "manifests").glob("*.json")
    return only


def test_reading_a_remote_manifest(tmp_path: Path, range_server: FileServer) -> None:
    env = Env(tmp_path)
    cache = env.cache()
    url = range_server.url_for(MANIFEST_NAME)
    assert catalog._read_manifest(url, cache, required=False) is None  # 404: none there
    with pytest.raises(ShardError, match="not found"):
        catalog._read_manifest(url, cache, required=True)
    m = Manifest([], "__key__", False)
    (range_server.root / MANIFEST_NAME).write_text(json.dumps(m.to_json()))
    range_server.script(MANIFEST_NAME, Status(500))
    with pytest.raises(ShardError):  # any other failure is not "no manifest"
        catalog._read_manifest(url, cache, required=False)
    got = catalog._read_manifest(url, cache, required=False)
    assert got == m
    name = "remote-" + hashlib.sha256(url.encode()).hexdigest()[:24] + ".json"
    assert (env.cache_dir / "manifests" / name).is_file()  # kept beside the shard cache


# ---------------------------------------------------------------- resolving local shards


def test_local_shards_are_indexed_once_then_read_from_the_cached_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=3)
    cat = env.resolve(shards)
    assert cat.built == 3 and [sp.url for sp in cat.specs] == shards
    assert [r.num_samples for r in cat.manifest.records] == [3, 3, 3]
    assert [r.kind for r in cat.manifest.records] == ["tar"] * 3
    assert [r.size for r in cat.manifest.records] == [os.path.getsize(s) for s in shards]
    st = os.stat(shards[0])
    assert cat.manifest.records[0].version == f"mtime:{st.st_size}:{st.st_mtime_ns}"
    assert cat.manifest.records[0].fields == {"cls": 3, "txt": 3}
    assert cat.manifest.records[0].chunk_rows is None and cat.manifest.records[0].ignored == 0
    assert cat.manifest.records[0].digest is not None
    assert list(cat.manifest.fields) == ["cls", "txt"] and cat.manifest.bad == []
    assert cat.manifest.key_column == "__key__" and cat.manifest.skip is False
    assert cat.cache_file == cache_file(env, shards, "__key__", False)
    assert cat.cache_file.is_file()
    assert Manifest.read(str(cat.cache_file), base=None, where="c") == cat.manifest
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        again = env.resolve(shards)
    assert again.built == 0 and again.manifest == cat.manifest and caplog.records == []
    # the cache is keyed by the shard list, key column and skip_bad
    assert env.resolve(shards[:2]).built == 2
    assert env.resolve(shards, skip_bad=True).built == 3
    assert env.resolve(shards, key_column=None).built == 3
    assert len(list((env.cache_dir / "manifests").glob("*.json"))) == 4


def test_without_the_manifest_cache_nothing_is_read_or_written(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    cat = env.resolve(shards, use_cache=False)
    assert cat.built == 2 and not cat.cache_file.exists()
    env.resolve(shards)
    assert cat.cache_file.exists()
    assert env.resolve(shards, use_cache=False).built == 2  # the cached one is not read


def test_a_changed_local_shard_is_indexed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    env.resolve(shards)
    st = os.stat(shards[1])
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        cat = env.resolve(shards)
    assert cat.built == 1
    assert [r.message for r in caplog.records] == [
        f"shard {shards[1]} changed since it was indexed: indexing it again"
    ]
    assert cat.manifest.records[1].version == f"mtime:{st.st_size}:{st.st_mtime_ns + 10**9}"
    assert env.resolve(shards).built == 0  # the new record was saved


def test_the_spec_may_name_a_shard_differently_from_its_record(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    env.resolve(shards)
    other = [s.replace("/d/", "/d/./") for s in shards]  # the same files
    cat = env.resolve(other)
    assert cat.built == 0 and [r.url for r in cat.manifest.records] == other


def test_a_missing_local_shard(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=3)
    env.resolve(shards)
    os.unlink(shards[1])
    with pytest.raises(ShardError) as e:  # known to the cached manifest: the stat fails
        env.resolve(shards)
    assert e.value.reason == "shard file not found" and e.value.shard == shards[1]
    cat = env.resolve(shards, skip_bad=True)  # not known (another cache key): indexing fails
    assert [sp.url for sp in cat.specs] == [shards[0], shards[2]]
    assert cat.manifest.bad == [BadEntry(shards[1], None, "shard left out: shard file not found")]
    assert cat.built == 3 and len(cat.manifest.records) == 2
    tars(tmp_path / "d", n=3)  # back
    env.resolve(shards, skip_bad=True)
    os.unlink(shards[1])
    cat = env.resolve(shards, skip_bad=True)  # known this time: the stat fails
    assert cat.built == 0 and [sp.url for sp in cat.specs] == [shards[0], shards[2]]
    assert cat.manifest.bad == [BadEntry(shards[1], None, "shard left out: shard file not found")]
    with pytest.raises(ShardError, match="shard file not found") as e:
        env.resolve([shards[1]], key_column=None)  # not known, not skipped: indexing fails
    assert e.value.shard == shards[1]


def test_a_truncated_shard_keeps_its_whole_samples_and_a_broken_one_is_left_out(
    tmp_path: Path,
) -> None:
    env = Env(tmp_path)
    (good,) = tars(tmp_path / "d", n=1)
    cut = tmp_path / "d" / "cut.tar"
    cut.write_bytes(tar_bytes({"k1.txt": b"a" * 1000, "k2.txt": b"b" * 1000})[: 512 * 4])
    with pytest.raises(ShardError) as e:
        env.resolve([good, str(cut)])
    assert (e.value.shard, e.value.key) == (str(cut), "k2")
    assert e.value.reason.startswith("truncated tar: member 'k2.txt'")
    cat = env.resolve([good, str(cut)], skip_bad=True)
    assert [sp.url for sp in cat.specs] == [good, str(cut)]
    assert [r.num_samples for r in cat.manifest.records] == [3, 1]
    assert [(b.shard, b.key) for b in cat.manifest.bad] == [(str(cut), "k2"), (str(cut), None)]
    assert cat.manifest.bad == cat.manifest.records[1].bad
    again = env.resolve([good, str(cut)], skip_bad=True)  # from the cached manifest
    assert again.built == 0 and again.manifest.bad == cat.manifest.bad
    short = tmp_path / "d" / "short.tar"
    short.write_bytes(bytes(100))
    cat = env.resolve([str(short), good], skip_bad=True)
    assert [sp.url for sp in cat.specs] == [good] and cat.built == 2
    assert cat.manifest.bad == [
        BadEntry(
            str(short),
            None,
            "shard left out: not a tar file (shorter than one tar header)",
        )
    ]


def test_members_of_no_sample_and_table_shards_are_recorded(tmp_path: Path) -> None:
    env = Env(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.tar").write_bytes(tar_bytes({"README": b"x", "k1.txt": b"a", "k2.txt": b"b"}))
    table = pa.table({"__key__": ["r0", "r1", "r2", "r3", "r4"], "x": [1, 2, 3, 4, 5]})
    pq.write_table(table, d / "b.parquet", row_group_size=2)
    cat = env.resolve([str(d / "a.tar"), str(d / "b.parquet")])
    a, b = cat.manifest.records
    assert (a.kind, a.num_samples, a.ignored, a.chunk_rows) == ("tar", 2, 1, None)
    assert (b.kind, b.num_samples, b.ignored, b.chunk_rows) == ("parquet", 5, 0, [2, 2, 1])
    assert type(b.chunk_rows[0]) is int
    assert b.fields == {"__key__": "string", "x": "int64"}
    assert list(cat.manifest.fields) == ["txt", "x"]  # the key column is not a field


def test_a_spec_kind_wins_over_the_name(tmp_path: Path) -> None:
    env = Env(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.bin").write_bytes(tar_bytes({"k1.txt": b"a"}))
    cat = env.resolve([str(d / "a.bin")], allow_pipe=False)
    assert cat.manifest.records[0].kind == "tar"  # sniffed
    rec = catalog._record(
        ShardSpec(str(d / "a.bin"), "tar"),
        str(d / "a.bin"),
        IndexStore(None, key_column="__key__", skip=False),
        None,
        size=3,
        version="v",
    )
    assert (rec.kind, rec.size, rec.version) == ("tar", 3, "v")


# ---------------------------------------------------------------- manifests found


def write_manifest_next_to(env: Env, shards: list[str], **kw: Any) -> Manifest:
    cat = env.resolve(shards, use_cache=False, **kw)
    d = os.path.dirname(shards[0])
    cat.manifest.write(os.path.join(d, MANIFEST_NAME), relative_to=d)
    return cat.manifest


def test_a_manifest_next_to_the_shards_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=3)
    m = write_manifest_next_to(env, shards)
    cat = env.resolve(shards)
    assert cat.built == 0 and cat.manifest.records == m.records
    assert not cat.cache_file.exists()  # nothing indexed: nothing saved
    # a broken one is ignored with a warning
    (tmp_path / "d" / MANIFEST_NAME).write_text("{")
    with caplog.at_level(logging.WARNING, "mmload.sources.catalog"):
        cat = env.resolve(shards, use_cache=False)
    assert cat.built == 3
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("ignoring the manifest next to the shards: unreadable manifest")


def test_shards_in_several_directories_or_piped_have_no_manifest_beside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)
    a = tars(tmp_path / "a", n=1, name="a")
    b = tars(tmp_path / "b", n=1, name="b")
    looked: list[str] = []
    real = catalog._read_manifest

    def spy(url: str, cache: ShardCache, *, required: bool) -> Manifest | None:
        looked.append(url)
        return real(url, cache, required=required)

    monkeypatch.setattr(catalog, "_read_manifest", spy)
    env.resolve(a + b)
    assert looked == []
    env.resolve(a)
    assert looked == [os.path.join(str(tmp_path / "a"), MANIFEST_NAME)]
    looked.clear()
    cat = env.resolve([f"pipe:cat {a[0]}"], allow_pipe=True, key_column=None)
    assert looked == [] and cat.built == 1


def test_an_explicit_manifest(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=2)
    m = write_manifest_next_to(env, shards)
    path = str(tmp_path / "d" / MANIFEST_NAME)
    cat = env.resolve(path)
    assert [sp.url for sp in cat.specs] == shards and cat.built == 0
    assert [sp.kind for sp in cat.specs] == ["tar", "tar"]
    assert cat.manifest.records == m.records
    cat = env.resolve(Path(path))  # a PathLike
    assert cat.built == 0
    with pytest.raises(ConfigError) as e:
        env.resolve(path, key_column=None)
    assert str(e.value) == (
        f"manifest {path} was written with key_column='__key__', this loader has "
        "key_column=None: run `mmload index` with it"
    )
    with pytest.raises(ShardError, match="manifest not found"):
        env.resolve(str(tmp_path / "e" / MANIFEST_NAME))
    # the cached manifest is not read for an explicit one: a changed shard is indexed again
    st = os.stat(shards[0])
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert env.resolve(path).built == 1
    assert env.resolve(path).built == 1  # still: the explicit manifest is the one read


def test_a_manifest_of_another_key_column_is_not_used(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    write_manifest_next_to(env, shards, key_column=None)
    assert env.resolve(shards, use_cache=False).built == 2
    assert env.resolve(shards, use_cache=False, key_column=None).built == 0


def manifest_with_bad(env: Env, shards: list[str], bad: list[BadEntry], skip: bool) -> None:
    cat = env.resolve(shards, use_cache=False, skip_bad=skip)
    d = os.path.dirname(shards[0])
    m = Manifest(cat.manifest.records, "__key__", skip, bad, cat.manifest.fields)
    m.write(os.path.join(d, MANIFEST_NAME), relative_to=d)


def test_a_manifest_indexed_with_skip_lists_bad_entries(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=2)
    bad = [BadEntry(shards[0], "s000", "corrupt jpg"), BadEntry(shards[1], None, "x")]
    manifest_with_bad(env, shards, bad, skip=True)
    with pytest.raises(ShardError) as e:
        env.resolve(shards, use_cache=False)
    assert e.value.reason == (
        "the manifest lists 2 bad shards/samples (indexed with on_error='skip'); first: corrupt jpg"
    )
    assert (e.value.shard, e.value.key) == (shards[0], "s000")
    cat = env.resolve(shards, use_cache=False, skip_bad=True)
    assert cat.manifest.bad == bad and cat.built == 0
    # a manifest with no bad entries is fine without skipping
    manifest_with_bad(env, shards, [], skip=True)
    assert env.resolve(shards, use_cache=False).built == 0
    # nor is a manifest indexed without skipping checked
    manifest_with_bad(env, shards, bad, skip=False)
    assert env.resolve(shards, use_cache=False).manifest.bad == bad


def test_bad_entries_are_kept_for_reused_records_only_and_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=3)
    bad = [
        BadEntry(shards[0], "s000", "corrupt"),
        BadEntry(shards[1], "s003", "corrupt"),
        BadEntry(shards[0], "s001", "corrupt"),
    ]
    manifest_with_bad(env, shards, bad, skip=True)
    # the same entries in the cached manifest too: listed once
    cat = env.resolve(shards, skip_bad=True)
    assert cat.manifest.bad == bad and cat.built == 0
    Manifest(cat.manifest.records, "__key__", True, bad, cat.manifest.fields).write(
        str(cat.cache_file)
    )
    assert env.resolve(shards, skip_bad=True).manifest.bad == bad
    # shard 1 changed: indexed again, its old entries go (it indexes clean now)
    st = os.stat(shards[1])
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cat = env.resolve(shards, skip_bad=True)
    assert cat.built == 1 and cat.manifest.bad == [bad[0], bad[2]]
    # a shard not in the spec: its entries go
    cat = env.resolve(shards[1:], skip_bad=True, use_cache=False)
    assert cat.manifest.bad == []


def test_the_cached_manifest_is_ignored_when_broken_or_unwritable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    cat = env.resolve(shards)
    cat.cache_file.write_text("[]")
    with caplog.at_level(logging.WARNING, "mmload.sources.catalog"):
        again = env.resolve(shards)
    assert again.built == 2
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("ignoring the cached manifest: unreadable manifest: AttributeError")
    assert msg.endswith(f"(shard {str(cat.cache_file)!r})")  # names the file
    caplog.clear()
    cat.cache_file.unlink()
    cat.cache_file.mkdir()  # cannot be replaced by a file
    with caplog.at_level(logging.WARNING, "mmload.sources.catalog"):
        again = env.resolve(shards)
    assert again.built == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-1].startswith(f"cannot write the manifest cache {cat.cache_file}: ")
    assert "Is a directory" in msgs[-1]  # the cause


# ---------------------------------------------------------------- remote shards


def serve(server: FileServer, n: int = 3) -> list[str]:
    urls = []
    for i in range(n):
        data = tar_bytes({f"r{i}a.txt": b"a", f"r{i}b.txt": b"b", f"r{i}b.cls": b"1"})
        urls.append(server.put(f"r{i}.tar", data))
    return urls


def test_remote_shards_are_fetched_whole_once_and_recorded(
    tmp_path: Path, range_server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path, fetchers=2)
    urls = serve(range_server)
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        cat = env.resolve(urls)
    assert cat.built == 3 and [sp.url for sp in cat.specs] == urls
    assert [r.message for r in caplog.records] == [
        "no manifest for 3 remote shards: indexing them by fetching each whole, once "
        "(`mmload index` writes a manifest so that the next start reads only it)"
    ]
    rec = cat.manifest.records[0]
    head = [s for s in range_server.log("r0.tar") if s.method == "HEAD"]
    assert rec.size == (range_server.root / "r0.tar").stat().st_size
    assert rec.version is not None and not rec.version.startswith("mtime:")
    assert rec.fields == {"cls": 1, "txt": 2} and rec.num_samples == 2
    assert len(head) >= 1
    gets = [s for s in range_server.log() if s.method == "GET" and s.name.endswith(".tar")]
    assert sorted(s.name for s in gets) == ["r0.tar", "r1.tar", "r2.tar"]
    caplog.clear()
    before = len(range_server.log())
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        again = env.resolve(urls)
    assert again.built == 0 and caplog.records == []
    # only the look for a manifest next to the shards: the cached manifest has them all
    assert [(s.method, s.name) for s in range_server.log()[before:]] == [("GET", MANIFEST_NAME)]


def test_a_missing_remote_shard_is_left_out_or_raised(
    tmp_path: Path, range_server: FileServer
) -> None:
    env = Env(tmp_path)
    urls = serve(range_server)
    missing = range_server.url_for("gone.tar")
    with pytest.raises(ShardError) as e:
        env.resolve([urls[0], missing])
    assert e.value.shard == missing
    cat = env.resolve([urls[0], missing, urls[1]], skip_bad=True)
    assert [sp.url for sp in cat.specs] == [urls[0], urls[1]]
    (entry,) = cat.manifest.bad
    assert entry.shard == missing and entry.reason.startswith("shard left out: ")


def test_remote_records_from_a_manifest_are_trusted_at_start(
    tmp_path: Path, range_server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(tmp_path)
    urls = serve(range_server)
    cat = env.resolve(urls, use_cache=False)
    cat.manifest.write(str(range_server.root / MANIFEST_NAME), relative_to=range_server.url)
    before = len(range_server.log())
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        again = env.resolve(urls, use_cache=False)
    assert again.built == 0 and caplog.records == []
    assert [s.name for s in range_server.log()[before:]] == [MANIFEST_NAME]  # nothing else
    # a remote shard missing from the manifest is indexed; the log says there was one
    extra = range_server.put("r9.tar", tar_bytes({"x.txt": b"x"}))
    with caplog.at_level(logging.INFO, "mmload.sources.catalog"):
        cat = env.resolve([*urls, extra], use_cache=False)
    assert cat.built == 1 and caplog.records == []


def test_fetchers_bound_the_indexing_threads(
    tmp_path: Path, range_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    made: list[int] = []
    real = concurrent.futures.ThreadPoolExecutor

    def pool(n: int) -> Any:
        made.append(n)
        return real(n)

    monkeypatch.setattr(catalog, "ThreadPoolExecutor", pool)
    urls = serve(range_server, n=3)
    Env(tmp_path / "a", fetchers=2).resolve(urls)
    Env(tmp_path / "b", fetchers=8).resolve(urls)
    Env(tmp_path / "c", fetchers=1).resolve(urls)
    assert made == [2, 3, 1]
    tars(tmp_path / "d")
    Env(tmp_path / "e").resolve(str(tmp_path / "d" / "*.tar"))
    assert made == [2, 3, 1]  # local shards: no pool


def test_a_broken_manifest_is_named_by_its_url(tmp_path: Path, range_server: FileServer) -> None:
    env = Env(tmp_path)
    local = tmp_path / "d" / MANIFEST_NAME
    local.parent.mkdir()
    local.write_text("{")
    with pytest.raises(ShardError) as e:
        env.resolve(str(local))
    assert e.value.shard == str(local) and e.value.reason.startswith("unreadable manifest")
    (range_server.root / MANIFEST_NAME).write_text("[]")
    url = range_server.url_for(MANIFEST_NAME)
    with pytest.raises(ShardError) as e:
        env.resolve(url)
    assert e.value.shard == url  # not the copy in the cache
    assert e.value.reason.startswith("unreadable manifest: AttributeError")


def test_an_explicit_remote_manifest(tmp_path: Path, range_server: FileServer) -> None:
    env = Env(tmp_path)
    urls = serve(range_server, n=2)
    m = env.resolve(urls, use_cache=False).manifest
    m.write(str(range_server.root / MANIFEST_NAME), relative_to=range_server.url)
    cat = env.resolve(range_server.url_for(MANIFEST_NAME))
    assert cat.built == 0 and [sp.url for sp in cat.specs] == urls
    assert cat.manifest.records == m.records


def test_a_manifest_of_another_key_column_does_not_hide_a_later_one(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d")
    assert env.resolve(shards).built == 2  # the cached manifest, for key_column="__key__"
    write_manifest_next_to(env, shards, key_column=None)  # looked at first; not this loader's
    assert env.resolve(shards).built == 0  # the cached one still serves


def test_bad_entries_of_every_manifest_are_kept(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=2)
    beside = [BadEntry(shards[0], "s000", "corrupt")]
    manifest_with_bad(env, shards, beside, skip=True)
    cat = env.resolve(shards, skip_bad=True)
    assert cat.manifest.bad == beside
    cached = [BadEntry(shards[1], "s004", "also corrupt")]
    Manifest(cat.manifest.records, "__key__", True, cached, cat.manifest.fields).write(
        str(cat.cache_file)
    )
    assert env.resolve(shards, skip_bad=True).manifest.bad == beside + cached


def test_a_local_compressed_shard_is_checked_by_its_version(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (plain,) = tars(tmp_path / "d", n=1)
    gz = tmp_path / "d" / "z.tar.gz"
    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    cat = env.resolve([str(gz)])
    assert cat.built == 1 and cat.manifest.records[0].num_samples == 3
    assert cat.manifest.records[0].size == gz.stat().st_size
    assert env.resolve([str(gz)]).built == 0  # unchanged: the record is reused
    st = gz.stat()
    os.utime(gz, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert env.resolve([str(gz)]).built == 1  # changed: indexed again


class _NoLength(http.server.BaseHTTPRequestHandler):
    """Answers with bodies that end when the connection closes: no Content-Length."""

    protocol_version = "HTTP/1.0"
    data = b""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("ETag", '"v1"')
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        self.wfile.write(self.data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_remote_shard_served_without_a_length_is_sized_on_disk(tmp_path: Path) -> None:
    data = tar_bytes({"k1.txt": b"a", "k2.txt": b"bb"})
    handler = type("H", (_NoLength,), {"data": data})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.tar"
        cat = Env(tmp_path).resolve([url])
        (rec,) = cat.manifest.records
        assert (rec.size, rec.version, rec.num_samples) == (len(data), "v1", 2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_member_tables_are_kept_under_the_record_version(tmp_path: Path) -> None:
    env = Env(tmp_path)
    shards = tars(tmp_path / "d", n=2)
    store = IndexStore(env.cache_dir, key_column="__key__", skip=False)
    cat = env.resolve(shards, store=store)
    for sp, rec in zip(cat.specs, cat.manifest.records, strict=True):
        assert store.cached(sp.url, rec.index_version) is not None
    assert len(list((env.cache_dir / "index").glob("*.json"))) == 2  # on disk too
    fresh = IndexStore(env.cache_dir, key_column="__key__", skip=False)  # the next process
    assert fresh.cached(shards[0], cat.manifest.records[0].index_version) is not None


def test_indexing_remote_shards_leaves_nothing_pinned_and_no_stale_copy(
    tmp_path: Path, range_server: FileServer
) -> None:
    env = Env(tmp_path)
    urls = serve(range_server, n=2)
    cache = env.cache()
    cat = env.resolve(urls, cache=cache)
    assert cache._pins == {}  # every shard released once indexed
    assert [r.num_samples for r in cat.manifest.records] == [2, 2]
    # the object changes on the server; indexed again (no manifest reuse), the cached copy of
    # the old object is not used: its size and ETag are checked against a HEAD first
    range_server.put("r0.tar", tar_bytes({f"n{i}.txt": b"x" for i in range(5)}))
    again = env.resolve(urls, cache=env.cache(), use_cache=False)
    assert [r.num_samples for r in again.manifest.records] == [5, 2]


def test_a_changed_object_of_a_server_without_etags_is_told_by_its_size(tmp_path: Path) -> None:
    """Without an ETag the version is the Last-Modified date, to the second: an object replaced
    within that second is told from the cached copy by its size."""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, etag=None)
    try:
        url = server.put("a.tar", tar_bytes({"k1.txt": b"a"}))
        os.utime(root / "a.tar", (1_700_000_000, 1_700_000_000))
        env = Env(tmp_path)
        assert env.resolve([url]).manifest.records[0].num_samples == 1
        server.put("a.tar", tar_bytes({f"k{i}.txt": b"a" * 600 for i in range(9)}))
        os.utime(root / "a.tar", (1_700_000_000, 1_700_000_000))  # the same Last-Modified
        again = env.resolve([url], cache=env.cache(), use_cache=False)
        assert again.manifest.records[0].num_samples == 9
    finally:
        server.close()
