"""mmload.sources.write: tar shards as webdataset's ShardWriter lays them out (read back with
``tarfile``) and Parquet files (read back with pyarrow). Written from the module's mutants
(issue 15)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmload.errors import ConfigError
from mmload.sources.write import encode_field, write_parquet, write_tar_shards


def test_encode_field() -> None:
    assert encode_field("a", b"x") == b"x"
    assert encode_field("a", bytearray(b"xy")) == b"xy"
    assert encode_field("a", memoryview(b"xyz")) == b"xyz"
    assert encode_field("a", "é") == "é".encode()
    assert encode_field("cls", 42) == b"42" and encode_field("cls", -3) == b"-3"
    assert encode_field("j", {"b": 1, "a": [1, "é"]}) == b'{"a": [1, "\\u00e9"], "b": 1}'
    assert encode_field("j", [1, 2]) == b"[1, 2]"
    for bad in (True, 1.5, None, (1,)):
        with pytest.raises(ConfigError) as e:
            encode_field("f", bad)
        assert str(e.value) == f"field 'f': cannot encode a {type(bad).__name__} (give bytes)"


def test_tar_shards_layout(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"dir/s{i}", "txt": f"t{i}", "cls": i, "__url__": "skip", "a.b": b"x"}
        for i in range(5)
    ]
    paths = write_tar_shards(samples, str(tmp_path / "new" / "sh-%03d.tar"), maxcount=2)
    assert paths == [str(tmp_path / "new" / f"sh-{i:03d}.tar") for i in range(3)]
    seen = []
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                assert (m.mtime, m.mode, m.isfile()) == (1_700_000_000, 0o444, True)
                seen.append((m.name, tf.extractfile(m).read()))  # type: ignore[union-attr]
        with open(p, "rb") as f:
            assert f.read(512)[257:263] == b"ustar\x00"  # POSIX ustar headers
    want = []
    for i in range(5):  # fields in sorted order, "__" fields left out
        want += [(f"dir/s{i}.a.b", b"x"), (f"dir/s{i}.cls", str(i).encode())]
        want += [(f"dir/s{i}.txt", f"t{i}".encode())]
    assert seen == want
    again = write_tar_shards(samples, str(tmp_path / "again-%d.tar"), maxcount=2)
    for a, b in zip(paths, again, strict=True):  # reproducible byte for byte
        assert Path(a).read_bytes() == Path(b).read_bytes()
    one = write_tar_shards(samples, str(tmp_path / "one-%d.tar"), maxcount=5)
    assert len(one) == 1
    assert write_tar_shards([], str(tmp_path / "none-%d.tar")) == []


def test_tar_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        write_tar_shards([], str(tmp_path / "x.tar"))
    assert str(e.value) == (
        f"pattern={str(tmp_path / 'x.tar')!r}: needs a %-format for the shard number, e.g. %05d"
    )
    for bad in (0, -1):
        with pytest.raises(ConfigError) as e:
            write_tar_shards([], str(tmp_path / "x-%d.tar"), maxcount=bad)
        assert str(e.value) == f"maxcount={bad!r}: must be >= 1"
    for key in ("", None, 7, "a.b", "d/a.b"):
        with pytest.raises(ConfigError) as e:
            write_tar_shards([{"__key__": key}], str(tmp_path / "k-%d.tar"))
        assert str(e.value) == f"sample key {key!r}: must be a non-empty str without dots"
    # A bad sample mid-way: the shard written so far is closed, a readable tar.
    samples = [{"__key__": "a", "x": b"1"}, {"__key__": "b", "x": 1.5}]
    with pytest.raises(ConfigError):
        write_tar_shards(samples, str(tmp_path / "half-%d.tar"))
    with tarfile.open(tmp_path / "half-0.tar") as tf:
        assert tf.getnames() == ["a.x"]


def test_tar_shards_defaults_keys_and_long_names(tmp_path: Path) -> None:
    # maxcount defaults to 1000 samples a shard.
    samples = [{"__key__": f"s{i:04d}", "x": b"1"} for i in range(1001)]
    paths = write_tar_shards(samples, str(tmp_path / "d-%d.tar"))
    counts = []
    for p in paths:
        with tarfile.open(p) as tf:
            counts.append(len(tf.getnames()))
    assert counts == [1000, 1]
    # Dots are refused in the key's last path component only: a directory may have them.
    (p,) = write_tar_shards([{"__key__": "a/b.c/d", "x": b"1"}], str(tmp_path / "k-%d.tar"))
    with tarfile.open(p) as tf:
        assert tf.getnames() == ["a/b.c/d.x"]
    # A member name over ustar's 100 bytes goes into the ustar prefix field, not into a PAX
    # extended header (typeflag "x") that older tar readers do not know.
    key = "/".join(["d" * 40] * 3)  # 122 bytes
    (p,) = write_tar_shards([{"__key__": key, "x": b"1"}], str(tmp_path / "long-%d.tar"))
    with open(p, "rb") as f:
        h = f.read(512)
    prefix, name = h[345:500].rstrip(b"\0"), h[0:100].rstrip(b"\0")
    assert h[156:157] == b"0" and prefix and prefix + b"/" + name == (key + ".x").encode()
    with tarfile.open(p) as tf:
        assert tf.getnames() == [key + ".x"]
    # An unencodable value names its field.
    with pytest.raises(ConfigError) as e:
        write_tar_shards([{"__key__": "a", "x": 1.5}], str(tmp_path / "f-%d.tar"))
    assert str(e.value) == "field 'x': cannot encode a float (give bytes)"


def test_parquet(tmp_path: Path) -> None:
    rows = [
        {
            "k": f"r{i}",
            "emb": np.arange(3, dtype=np.float32) + i,
            "flags": np.array([i % 2 == 0, True]),
            "ragged": np.arange(i + 1, dtype=np.int16),
            "img": bytes([i]),
        }
        for i in range(5)
    ]
    p = write_parquet(rows, str(tmp_path / "new" / "t.parquet"), row_group_size=2)
    assert p == str(tmp_path / "new" / "t.parquet")
    f = pq.ParquetFile(p)
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [
        2,
        2,
        1,
    ]
    t = f.read()
    assert t.schema.field("emb").type == pa.list_(pa.float32(), 3)  # fixed size: a tensor
    assert t.schema.field("flags").type == pa.list_(pa.bool_(), 2)
    assert t.schema.field("ragged").type == pa.list_(pa.int16())  # variable: a list
    assert t.schema.field("img").type == pa.binary()
    assert t.column("emb").to_pylist()[4] == [4.0, 5.0, 6.0]
    assert t.column("ragged").to_pylist()[2] == [0, 1, 2]
    assert t.column("k").to_pylist() == [f"r{i}" for i in range(5)]
    # Arrays that are not 1-D numbers stay as pyarrow makes them.
    odd = [{"s": np.array(["a", "b"])}, {"s": np.array(["c", "d"])}]
    t = pq.read_table(write_parquet(odd, str(tmp_path / "s.parquet")))
    assert t.schema.field("s").type == pa.list_(pa.string())
    flat2d = [{"m": np.zeros((2, 2), np.float32)}]
    with pytest.raises(pa.ArrowInvalid):
        write_parquet(flat2d, str(tmp_path / "m.parquet"))
    with pytest.raises(ConfigError) as e:
        write_parquet([], str(tmp_path / "e.parquet"))
    assert str(e.value) == f"write_parquet({str(tmp_path / 'e.parquet')!r}): no rows"
    # row_group_size defaults to 1000 rows.
    f = pq.ParquetFile(write_parquet([{"a": i} for i in range(1001)], str(tmp_path / "d.parquet")))
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [
        1000,
        1,
    ]
