"""Variable-length lists of numbers collate to one ``Jagged`` ``(values, offsets)`` per batch:
checked against the rows pyarrow reads, through worker processes, a DataLoader, an
``EmbeddingBag`` and the ``KeyedJaggedTensor`` layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mmload
from mmload import Jagged, kjt_parts

N = 40


def _ids(i: int) -> list[int]:
    return [i * 100 + j for j in range(i % 5)]  # lengths 0..4, some empty


def _write(tmp: Path) -> Path:
    p = tmp / "lists.parquet"
    ids = pa.array([_ids(i) for i in range(N)], pa.list_(pa.int32()))
    w = pa.array([None if i % 7 == 3 else [i / 2, -i] for i in range(N)], pa.list_(pa.float64()))
    flags = pa.array([[j % 2 == 0 for j in range(i % 3)] for i in range(N)], pa.list_(pa.bool_()))
    words = pa.array([[f"w{i}"] * (i % 2) for i in range(N)], pa.list_(pa.string()))
    keys = pa.array([f"r{i:03d}" for i in range(N)])
    pq.write_table(
        pa.table({"__key__": keys, "ids": ids, "w": w, "flags": flags, "words": words}),
        p,
        row_group_size=8,
    )
    return p


def test_jagged_rows_take_and_repeat() -> None:
    j = Jagged.from_rows([np.array([1, 2]), None, [3], []], torch.int64)
    assert j.offsets.tolist() == [0, 2, 2, 3, 3] and j.lengths().tolist() == [2, 0, 1, 0]
    assert j.tolist() == [[1, 2], [], [3], []] and j[-2].tolist() == [3] and len(j) == 4
    assert j.take([2, 0, 0, 1]).tolist() == [[3], [1, 2], [1, 2], []]
    assert j.take([]).tolist() == [] and j.take([]).offsets.tolist() == [0]
    assert j.repeat(2).tolist() == [[1, 2], [], [3], [], [1, 2], [], [3], []]
    with pytest.raises(IndexError):
        j[4]
    with pytest.raises(ValueError, match="offsets"):
        Jagged(torch.zeros(2), torch.zeros(3, dtype=torch.int32))


def test_list_columns_collate_to_jagged_with_the_values_pyarrow_reads(tmp_path: Path) -> None:
    p = _write(tmp_path)
    want = {r["__key__"]: r for r in pq.read_table(p).to_pylist()}
    seen = 0
    with mmload.Loader(str(p), batch_size=8, shuffle=True, seed=3) as ld:
        for b in ld:
            assert isinstance(b["ids"], Jagged) and b["ids"].dtype == torch.int64
            assert isinstance(b["w"], Jagged) and b["w"].dtype == torch.float32
            assert isinstance(b["flags"], Jagged) and b["flags"].dtype == torch.bool
            assert isinstance(b["words"], list)  # strings: no tensor for them
            for j, key in enumerate(b["__key__"]):
                row = want[key]
                assert b["ids"][j].tolist() == row["ids"]
                assert b["w"][j].tolist() == ([] if row["w"] is None else row["w"])  # null: empty
                assert b["flags"][j].tolist() == row["flags"]
                assert list(b["words"][j]) == row["words"]
                seen += 1
    assert seen == N


def test_workers_and_dataloader_pass_jagged_fields_unchanged(tmp_path: Path) -> None:
    p = _write(tmp_path)

    def flat(batches: Any) -> list[tuple[str, list[int]]]:
        return [(k, b["ids"][j].tolist()) for b in batches for j, k in enumerate(b["__key__"])]

    with mmload.Loader(str(p), batch_size=8, shuffle=True) as ld:
        ref = flat(list(ld))
    with mmload.Loader(str(p), batch_size=8, shuffle=True, workers=2) as ld:
        assert flat(list(ld)) == ref
    ds = mmload.IterableDataset(str(p), batch_size=8, shuffle=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = flat(list(dl))
    assert sorted(got) == sorted(ref)


def test_null_elements_in_an_int_list_are_bad_samples_and_floats_are_nan(tmp_path: Path) -> None:
    p = tmp_path / "nulls.parquet"
    ids = pa.array([[1, None] if i == 5 else [i] for i in range(16)], pa.list_(pa.int64()))
    w = pa.array([[1.0, None]] * 16, pa.list_(pa.float32()))
    pq.write_table(pa.table({"__key__": [f"k{i}" for i in range(16)], "ids": ids, "w": w}), p)
    with mmload.Loader(str(p), batch_size=8) as ld, pytest.raises(mmload.DecodeError, match="k5"):
        list(ld)
    with mmload.Loader(str(p), batch_size=8, on_error="skip", max_bad_samples=1) as ld:
        batches = list(ld)
        st = ld.stats()
    assert st["bad_samples"] == 1 and st["bad"][0]["key"] == "k5"
    assert "null elements" in st["bad"][0]["reason"]
    w0 = batches[0]["w"][0].tolist()
    assert w0[0] == 1.0 and np.isnan(w0[1])


def test_jsonl_arrays_are_jagged(tmp_path: Path) -> None:
    p = tmp_path / "part-0.jsonl"
    rows = [{"__key__": f"e{i}", "hist": _ids(i), "label": i % 2} for i in range(12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with mmload.Loader(str(p), batch_size=4) as ld:
        got = {k: b["hist"][j].tolist() for b in ld for j, k in enumerate(b["__key__"])}
    assert got == {r["__key__"]: r["hist"] for r in rows}


def test_embedding_bag_and_kjt_layout(tmp_path: Path) -> None:
    p = _write(tmp_path)
    with mmload.Loader(str(p), batch_size=8) as ld:
        b = next(iter(ld))
    ids = b["ids"]
    emb = torch.nn.EmbeddingBag(N * 100, 4, mode="sum")
    pooled = emb(ids.values, ids.offsets[:-1])
    for j in range(len(ids)):  # the same as pooling each row's list by hand
        row = torch.tensor(_ids(int(b["__key__"][j][1:])), dtype=torch.int64)
        assert torch.allclose(pooled[j], emb.weight[row].sum(0))
    other = Jagged.from_rows([[7]] * len(ids), torch.int64)
    keys, values, lengths = kjt_parts({"ids": ids, "other": other}, ["ids", "other"])
    assert keys == ["ids", "other"] and lengths.tolist() == [*ids.lengths().tolist(), *[1] * 8]
    assert values.tolist() == [*ids.values.tolist(), *[7] * 8]  # key-major
    with pytest.raises(ValueError, match="not a Jagged"):
        kjt_parts(b, ["__key__"])
