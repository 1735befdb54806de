"""JSON-lines shards (what Flink's row-format FileSink writes with a JSON encoder): one row per
line, one chunk per file; bad JSON is a ShardError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mmload
from mmload.errors import ShardError


def _write(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_rows_are_samples_in_order(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [{"__key__": f"a{i}", "u": i, "s": f"x{i}"} for i in range(5)])
    b = _write(
        tmp_path / "b.ndjson", [{"__key__": f"b{i}", "u": 10 + i, "s": "y"} for i in range(3)]
    )
    with mmload.Loader([a, b], batch_size=3) as ld:
        batches = list(ld)
    assert [k for bt in batches for k in bt["__key__"]] == [f"a{i}" for i in range(5)] + [
        f"b{i}" for i in range(3)
    ]
    assert batches[0]["u"].tolist() == [0, 1, 2] and batches[0]["s"] == ["x0", "x1", "x2"]


def test_bad_jsonl_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"__key__": "x", "a": 1}\n{"__key__": "y", "a": \n')
    with pytest.raises(ShardError, match="JSON-lines") as ei:
        mmload.Loader(str(bad), batch_size=2)
    assert ei.value.shard == str(bad)
    good = _write(tmp_path / "good.jsonl", [{"__key__": "g", "a": 1}])
    with mmload.Loader([good, str(bad)], batch_size=2, on_error="skip", max_bad_samples=5) as ld:
        keys = [k for bt in ld for k in bt["__key__"]]
        st = ld.stats()
    assert keys == ["g"] and any(e["shard"] == str(bad) for e in st["bad"])
