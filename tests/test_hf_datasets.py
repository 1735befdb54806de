"""Hugging Face ``datasets`` on disk, read by mmload directly: a data set saved with
``Dataset.save_to_disk`` (its Arrow stream files) and a Hub-style directory of Parquet files;
every row's values compared with what ``datasets`` itself returns, keys are the row numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mmload

datasets = pytest.importorskip("datasets", reason="datasets is a dev dependency")


@pytest.fixture(scope="module")
def hf() -> Any:
    n = 37
    return datasets.Dataset.from_dict(
        {
            "text": [f"caption number {i}" for i in range(n)],
            "label": [i % 5 for i in range(n)],
            "score": [i / 7 for i in range(n)],
            "ids": [[i * 10 + j for j in range(i % 4)] for i in range(n)],  # ragged, some empty
            "blob": [bytes([i]) * (1 + i % 3) for i in range(n)],
        }
    )


def _rows(loader: mmload.Loader) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for b in loader:
        for j, key in enumerate(b["__key__"]):
            row = {}
            for name, v in b.items():
                if name == "__key__":
                    continue
                if name == "ids":  # a list column: one Jagged (values, offsets) per batch
                    assert isinstance(v, mmload.Jagged) and v.dtype == torch.int64
                x = v[j]
                row[name] = x.item() if isinstance(x, torch.Tensor) and x.dim() == 0 else x
            out[int(key)] = row
    return out


def _check(got: dict[int, dict[str, Any]], hf: Any) -> None:
    assert sorted(got) == list(range(len(hf)))  # keys are the row numbers datasets shows
    for i, want in enumerate(hf):
        row = got[i]
        assert set(row) == set(want), i
        assert row["text"] == want["text"] and row["label"] == want["label"]
        assert row["score"] == pytest.approx(want["score"], rel=1e-6)
        assert row["blob"] == want["blob"]
        assert row["ids"].tolist() == want["ids"]


def test_save_to_disk_directory(hf: Any, tmp_path: Path) -> None:
    hf.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    with mmload.Loader(str(tmp_path / "saved"), batch_size=8, key_column=None) as ld:
        _check(_rows(ld), hf)


def test_hub_style_parquet_directory(hf: Any, tmp_path: Path) -> None:
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    hf.select(range(20)).to_parquet(str(data / "train-00000-of-00002.parquet"))
    hf.select(range(20, len(hf))).to_parquet(str(data / "train-00001-of-00002.parquet"))
    with mmload.Loader(str(data), batch_size=8, key_column=None, shuffle=True) as ld:
        _check(_rows(ld), hf)
