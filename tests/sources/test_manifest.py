"""The manifest on its own: the field summary, URL helpers, the columnar JSON both ways (and
every way it can be malformed), files local and remote, and sample counts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from mmload.errors import BadEntry, ShardError
from mmload.sources import manifest as mf
from mmload.sources.manifest import (
    MANIFEST_NAME,
    FieldInfo,
    Manifest,
    ShardRecord,
    field_summary,
)


def tar(url: str, n: int, fields: dict[str, int], **kw: Any) -> ShardRecord:
    return ShardRecord(url, "tar", 100 + n, kw.pop("version", f"v{n}"), n, None, fields, **kw)


def table(url: str, rows: list[int], fields: dict[str, str], kind: str = "parquet") -> ShardRecord:
    return ShardRecord(url, kind, 10 * sum(rows), "etag", sum(rows), rows, fields)


def test_the_manifest_name() -> None:
    assert MANIFEST_NAME == "mmload.index.json"


# ---------------------------------------------------------------- fields


def test_field_summary_unions_fields_in_order_of_first_appearance() -> None:
    recs = [
        tar("s/a.tar", 4, {"jpg": 4, "cls": 3}),
        tar("s/b.tar", 5, {"cls": 5, "txt": 2}),  # txt first seen here
        table("s/c.parquet", [2, 3], {"key": "string", "jpg": "binary", "score": "float"}),
        table("s/d.parquet", [6], {"key": "string", "score": "double", "jpg": "binary"}),
        table("s/e.parquet", [1], {"score": "int64", "key": "string"}),
    ]
    got = field_summary(recs, "key")
    assert list(got) == ["jpg", "cls", "txt", "score"]  # the key column left out
    assert got["jpg"] == FieldInfo("jpg", "binary", 4 + 5 + 6, "s/a.tar", [])
    assert got["cls"] == FieldInfo("cls", None, 8, "s/a.tar", [])
    assert got["txt"] == FieldInfo("txt", None, 2, "s/b.tar", [])
    assert got["score"] == FieldInfo(
        "score",
        "float",
        5 + 6 + 1,
        "s/c.parquet",
        [("s/d.parquet", "double"), ("s/e.parquet", "int64")],
    )


def test_field_summary_keeps_a_tar_member_named_like_the_key_column() -> None:
    got = field_summary([tar("a.tar", 3, {"key": 3})], "key")
    assert got == {"key": FieldInfo("key", None, 3, "a.tar", [])}
    t = field_summary([table("a.parquet", [3], {"key": "string"})], None)
    assert t == {"key": FieldInfo("key", "string", 3, "a.parquet", [])}
    assert field_summary([], "key") == {}


def test_field_summary_counts_members_as_integers() -> None:
    got = field_summary([tar("a.tar", 3, {"jpg": "3"})], None)  # type: ignore[dict-item]
    assert got["jpg"].samples == 3 and type(got["jpg"].samples) is int


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("base", "name", "want"),
    [
        ("/data/set", "a.tar", "/data/set/a.tar"),
        ("/data/set", "sub/a.tar", "/data/set/sub/a.tar"),
        ("s3://b/set", "a.tar", "s3://b/set/a.tar"),
        ("s3://b/set/", "a.tar", "s3://b/set/a.tar"),
        ("s3://b/set//", "a.tar", "s3://b/set/a.tar"),
        ("/data/set", "/elsewhere/a.tar", "/elsewhere/a.tar"),
        ("s3://b/set", "/elsewhere/a.tar", "/elsewhere/a.tar"),  # absolute under a URL base
        ("s3://b/BOX/", "a.tar", "s3://b/BOX/a.tar"),  # only slashes are cut from the base
        ("/data/set", "gs://c/a.tar", "gs://c/a.tar"),
        ("s3://b/set", "pipe:cat a.tar", "pipe:cat a.tar"),
        ("s3://b/set", "http://h/a.tar", "http://h/a.tar"),
    ],
)
def test_join(base: str, name: str, want: str) -> None:
    assert mf.join(base, name) == want


@pytest.mark.parametrize(
    ("urls", "want"),
    [
        (["/d/a.tar", "/d/b.tar"], "/d"),
        (["s3://b/d/a.tar", "s3://b/d/e/b.tar"], None),
        (["a.tar", "b.tar"], "."),
        (["a.tar", "d/b.tar"], None),
        (["/x/y/z/a.tar"], "/x/y/z"),
        ([], None),
    ],
)
def test_common_base(urls: list[str], want: str | None) -> None:
    assert mf.common_base(urls) == want


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("s3://b/set/mmload.index.json", "s3://b/set"),
        ("/data/set/mmload.index.json", "/data/set"),
    ],
)
def test_manifest_base(url: str, want: str) -> None:
    assert mf.manifest_base(url) == want


def test_manifest_base_of_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert mf.manifest_base("set/mmload.index.json") == str(tmp_path / "set")
    assert mf.manifest_base("mmload.index.json") == str(tmp_path)


def test_index_version() -> None:
    assert tar("a", 1, {}, version="etag-1").index_version == "etag-1"
    assert tar("a", 1, {}, version=None).index_version == "size:101"


# ---------------------------------------------------------------- JSON


def sample_manifest(base: str) -> Manifest:
    recs = [
        tar(f"{base}/a.tar", 3, {"jpg": 3}, digest="d1", ignored=2),
        table(f"{base}/sub/b.parquet", [2, 1], {"id": "string", "x": "int64"}),
        ShardRecord("s3://other/c.arrow", "arrow", 9, None, 0, [], {"x": "double"}),
    ]
    bad = [BadEntry(f"{base}/a.tar", "k1", "corrupt"), BadEntry("s3://other/c.arrow", None, "gone")]
    return Manifest(recs, "id", True, bad, field_summary(recs, "id"))


def test_to_json_is_columnar_and_relative_to_its_base() -> None:
    got = sample_manifest("s3://b/set").to_json("s3://b/set/")
    assert got == {
        "format": "mmload.manifest",
        "version": 1,
        "key_column": "id",
        "skip_bad": True,
        "num_shards": 3,
        "num_samples": 6,
        "shards": {
            "url": ["a.tar", "sub/b.parquet", "s3://other/c.arrow"],
            "kind": ["tar", "parquet", "arrow"],
            "size": [103, 30, 9],
            "version": ["v3", "etag", None],
            "samples": [3, 3, 0],
            "chunk_rows": [None, [2, 1], []],
            "fields": [{"jpg": 3}, {"id": "string", "x": "int64"}, {"x": "double"}],
            "digest": ["d1", None, None],
            "ignored": [2, 0, 0],
        },
        "fields": [
            {
                "name": "jpg",
                "arrow_type": None,
                "samples": 3,
                "first_shard": "a.tar",
                "other_types": [],
            },
            {
                "name": "x",
                "arrow_type": "int64",
                "samples": 3,
                "first_shard": "sub/b.parquet",
                "other_types": [["s3://other/c.arrow", "double"]],
            },
        ],
        "bad": [
            {"shard": "a.tar", "key": "k1", "reason": "corrupt"},
            {"shard": "s3://other/c.arrow", "key": None, "reason": "gone"},
        ],
    }
    assert type(got["num_samples"]) is int
    json.dumps(got)  # JSON-safe


def test_to_json_without_a_base_keeps_urls_and_a_base_needs_a_whole_directory() -> None:
    m = sample_manifest("/d/set")
    assert m.to_json()["shards"]["url"] == [
        "/d/set/a.tar",
        "/d/set/sub/b.parquet",
        "s3://other/c.arrow",
    ]
    assert m.to_json()["bad"][0]["shard"] == "/d/set/a.tar"
    assert m.to_json()["fields"][1]["other_types"] == [["s3://other/c.arrow", "double"]]
    # "/d/se" is a prefix of the URLs as strings, not a directory that holds them
    assert m.to_json("/d/se")["shards"]["url"][0] == "/d/set/a.tar"
    assert m.to_json("/d/set")["shards"]["url"][:2] == ["a.tar", "sub/b.parquet"]
    assert m.to_json("/d")["shards"]["url"][:2] == ["set/a.tar", "set/sub/b.parquet"]
    boxed = sample_manifest("s3://b/BOX")  # a base ending in a letter slashes are cut from
    assert boxed.to_json("s3://b/BOX//")["shards"]["url"][:2] == ["a.tar", "sub/b.parquet"]


def test_json_round_trips_against_any_base() -> None:
    m = sample_manifest("s3://b/set")
    back = Manifest.from_json(json.loads(json.dumps(m.to_json("s3://b/set"))), "s3://b/set", "w")
    assert back == m
    moved = Manifest.from_json(m.to_json("s3://b/set"), "/mirror", "w")
    assert [r.url for r in moved.records] == [
        "/mirror/a.tar",
        "/mirror/sub/b.parquet",
        "s3://other/c.arrow",
    ]
    assert moved.fields["jpg"].first_shard == "/mirror/a.tar"
    assert moved.fields["x"].other_types == [("s3://other/c.arrow", "double")]
    assert [b.shard for b in moved.bad] == ["/mirror/a.tar", "s3://other/c.arrow"]
    # no base: the URLs as written
    raw = Manifest.from_json(m.to_json("s3://b/set"), None, "w")
    assert [r.url for r in raw.records][:2] == ["a.tar", "sub/b.parquet"]
    assert raw.fields["jpg"].first_shard == "a.tar" and raw.bad[0].shard == "a.tar"
    assert raw.key_column == "id" and raw.skip is True


def test_from_json_converts_types_and_fills_old_columns() -> None:
    d = Manifest([tar("a.tar", 2, {"jpg": 2})], None, False).to_json()
    s = d["shards"]
    s["size"], s["samples"], s["version"] = ["7"], ["2"], [12345]
    s["chunk_rows"] = [["1", 1.0]]
    del s["digest"], s["ignored"]  # a manifest written before these columns
    d["skip_bad"] = 0
    m = Manifest.from_json(d, None, "w")
    (r,) = m.records
    assert (r.size, r.num_samples, r.version, r.chunk_rows) == (7, 2, "12345", [1, 1])
    assert type(r.size) is int and type(r.num_samples) is int and type(r.chunk_rows[0]) is int
    assert (r.digest, r.ignored) == (None, 0) and m.skip is False and m.key_column is None
    assert m.bad == [] and m.fields == {}
    d["fields"] = [
        {"name": "f", "arrow_type": None, "samples": "4", "first_shard": "a.tar", "other_types": []}
    ]
    assert Manifest.from_json(d, None, "w").fields["f"].samples == 4


def test_every_shard_kind_reads_back() -> None:
    recs = [
        ShardRecord(f"x.{k}", k, 1, None, 1, None if k == "tar" else [1], {})
        for k in ("tar", "parquet", "arrow", "json")
    ]
    back = Manifest.from_json(Manifest(recs, None, False).to_json(), None, "w")
    assert [r.kind for r in back.records] == ["tar", "parquet", "arrow", "json"]
    empty = ShardRecord("e.tar", "tar", 0, None, 0, None, {})
    assert Manifest.from_json(Manifest([empty], None, False).to_json(), None, "w").records == [
        empty
    ]


def _broken(change: Any) -> dict[str, Any]:
    d = copy.deepcopy(sample_manifest("/d").to_json("/d"))
    change(d)
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(format="other"),
            "ValueError: not an mmload manifest of version 1 (format='other', version=1)",
        ),
        (
            lambda d: d.update(version=2),
            "ValueError: not an mmload manifest of version 1 (format='mmload.manifest', version=2)",
        ),
        (
            lambda d: d.pop("version"),
            "ValueError: not an mmload manifest of version 1 (format='mmload.manifest', version=None)",
        ),
        (lambda d: d["shards"]["kind"].pop(), "ValueError: shard columns of different lengths"),
        (lambda d: d["shards"]["size"].pop(), "ValueError: shard columns of different lengths"),
        (lambda d: d["shards"]["version"].pop(), "ValueError: shard columns of different lengths"),
        (lambda d: d["shards"]["samples"].pop(), "ValueError: shard columns of different lengths"),
        (
            lambda d: d["shards"]["chunk_rows"].pop(),
            "ValueError: shard columns of different lengths",
        ),
        (
            lambda d: d["shards"]["fields"].append({}),
            "ValueError: shard columns of different lengths",
        ),
        (
            lambda d: d["shards"]["kind"].__setitem__(1, "zip"),
            "ValueError: shard 1: bad kind or sample count",
        ),
        (
            lambda d: d["shards"]["samples"].__setitem__(0, -1),
            "ValueError: shard 0: bad kind or sample count",
        ),
        (
            lambda d: d["shards"]["chunk_rows"].__setitem__(1, [2, 2]),
            "ValueError: shard 1: chunk rows do not add up to its samples",
        ),
        (
            lambda d: d["shards"]["chunk_rows"].__setitem__(0, [2]),
            "ValueError: shard 0: chunk rows do not add up to its samples",
        ),
        (lambda d: d["shards"].pop("url"), "KeyError: 'url'"),
        (lambda d: d.pop("fields"), "KeyError: 'fields'"),
        (lambda d: d.pop("bad"), "KeyError: 'bad'"),
        (lambda d: d.pop("key_column"), "KeyError: 'key_column'"),
        (lambda d: d.pop("skip_bad"), "KeyError: 'skip_bad'"),
        (lambda d: d["fields"][0].pop("samples"), "KeyError: 'samples'"),
        (lambda d: d["shards"]["size"].__setitem__(0, "big"), "ValueError: invalid literal"),
        (lambda d: d["shards"]["size"].__setitem__(0, None), "TypeError: int() argument"),
        (lambda d: d["shards"]["fields"].__setitem__(0, 5), "TypeError: "),
        (lambda d: d["bad"].__setitem__(0, {"shard": "a", "why": "x"}), "TypeError: "),
        (lambda d: d["shards"].__setitem__("url", 3), "TypeError: object of type 'int'"),
        (lambda d: d.__setitem__("fields", [["x"]]), "TypeError: list indices"),
    ],
)
def test_a_malformed_manifest_is_a_shard_error_naming_it(change: Any, message: str) -> None:
    with pytest.raises(ShardError) as e:
        Manifest.from_json(_broken(change), "/d", "s3://b/set/mmload.index.json")
    assert e.value.shard == "s3://b/set/mmload.index.json"
    assert e.value.reason.startswith("unreadable manifest: " + message), e.value.reason
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_manifest_that_is_not_an_object_is_a_shard_error() -> None:
    with pytest.raises(ShardError, match="unreadable manifest: AttributeError"):
        Manifest.from_json([1, 2], None, "w")  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


def test_write_is_atomic_compact_and_makes_the_directory(tmp_path: Path) -> None:
    m = sample_manifest(str(tmp_path))
    target = tmp_path / "out" / "deeper" / MANIFEST_NAME
    m.write(str(target), relative_to=str(tmp_path))
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == m.to_json(str(tmp_path))
    assert ", " not in text and ": " not in text  # compact separators
    assert os.listdir(target.parent) == [MANIFEST_NAME]  # no temporary file left
    assert Manifest.read(str(target), base=str(tmp_path), where="m") == m
    # written again: replaced whole
    Manifest([], None, False).write(str(target))
    assert json.loads(target.read_text())["num_shards"] == 0
    assert os.listdir(target.parent) == [MANIFEST_NAME]


def test_write_to_a_file_url_and_a_replace_failure_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = sample_manifest(str(tmp_path))
    m.write(f"file://{tmp_path}/m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == m.to_json()
    seen: list[tuple[str, str, str]] = []

    def replace(src: str, dst: str) -> None:
        doc = json.loads(Path(src).read_text())
        seen.append((os.path.dirname(src), os.path.basename(src)[:10], doc["format"]))
        raise OSError("disk gone")

    monkeypatch.setattr(mf.os, "replace", replace)
    for target in (str(tmp_path / "m.json"), f"file://{tmp_path}/m.json"):  # both atomic
        with pytest.raises(OSError, match="disk gone"):
            Manifest([], None, False).write(target)
        assert json.loads((tmp_path / "m.json").read_text())["num_shards"] == 3
    # written whole beside the target first (a rename within one file system)
    assert seen == [(str(tmp_path), ".manifest-", "mmload.manifest")] * 2


def test_write_to_an_object_store_url() -> None:
    m = sample_manifest("memory://set")
    m.write("memory://set/mmload.index.json", relative_to="memory://set")
    with fsspec.open("memory://set/mmload.index.json", "r", encoding="utf-8") as f:
        text = f.read()
    assert json.loads(text) == m.to_json("memory://set") and ": " not in text
    fsspec.filesystem("memory").rm("/set", recursive=True)


def test_reading_a_missing_or_broken_file_is_a_shard_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError) as e:
        Manifest.read(str(tmp_path / "nope.json"), base=None, where="s3://b/m.json")
    assert e.value.shard == "s3://b/m.json"
    assert e.value.reason.startswith("unreadable manifest: [Errno 2]")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ShardError, match="unreadable manifest: Expecting property name"):
        Manifest.read(str(tmp_path / "bad.json"), base=None, where="w")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ShardError, match="unreadable manifest: 'utf-8' codec"):
        Manifest.read(str(tmp_path / "bad.json"), base=None, where="w")
    (tmp_path / "old.json").write_text(json.dumps({"format": "mmload.manifest", "version": 0}))
    with pytest.raises(ShardError, match="of version 1") as e:
        Manifest.read(str(tmp_path / "old.json"), base=None, where="s3://b/old.json")
    assert e.value.shard == "s3://b/old.json"


def test_a_manifest_with_non_ascii_names_reads_under_any_locale(tmp_path: Path) -> None:
    """Another tool may write the manifest as UTF-8 (not ASCII-escaped); it reads the same in
    a process whose locale encoding is ASCII (the C locale, coercion and UTF-8 mode off)."""
    m = Manifest([ShardRecord("/d/données-é.tar", "tar", 1, None, 1, None, {})], None, False)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m.to_json(), ensure_ascii=False), encoding="utf-8")
    code = (
        "import sys, locale; from mmload.sources.manifest import Manifest; "
        "print(locale.getpreferredencoding(False)); "
        "print(ascii(Manifest.read(sys.argv[1], base=None, where='w').records[0].url))"
    )
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert out.returncode == 0, out.stderr
    enc, url = out.stdout.split()
    assert enc.lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")  # the locale this needs
    assert url == ascii("/d/données-é.tar")


def test_counts() -> None:
    m = sample_manifest("/d")
    got = m.counts()
    assert got.dtype == np.int64 and got.tolist() == [3, 3, 0]
    assert Manifest([], None, False).counts().tolist() == []
