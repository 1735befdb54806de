"""Writing shards: WebDataset tars (the layout ``webdataset.ShardWriter`` writes) and Parquet.

Used by ``mmload write``, ``mmload demo`` and tests. Members of a sample are written in sorted
field order as ``<key>.<field>``; mtimes are fixed so that shards are reproducible byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmload.errors import ConfigError

__all__ = ["encode_field", "write_parquet", "write_tar_shards"]

_MTIME = 1_700_000_000


def encode_field(name: str, value: Any) -> bytes:
    """Bytes for a field value: bytes as is, str as UTF-8, int for ``cls``, dict/list as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool) or not isinstance(value, (int, dict, list)):
        raise ConfigError(f"field {name!r}: cannot encode a {type(value).__name__} (give bytes)")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return json.dumps(value, sort_keys=True).encode("utf-8")


def write_tar_shards(
    samples: Iterable[Mapping[str, Any]], pattern: str, *, maxcount: int = 1000
) -> list[str]:
    """Write samples (dicts with ``__key__``) into tar shards ``pattern % i``; returns paths."""
    if "%" not in pattern:
        raise ConfigError(f"pattern={pattern!r}: needs a %-format for the shard number, e.g. %05d")
    if maxcount < 1:
        raise ConfigError(f"maxcount={maxcount!r}: must be >= 1")
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    count = 0
    try:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
                raise ConfigError(f"sample key {key!r}: must be a non-empty str without dots")
            if tar is None or count >= maxcount:
                if tar is not None:
                    tar.close()
                path = pattern % len(paths)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
                paths.append(path)
                count = 0
            for field in sorted(k for k in sample if not k.startswith("__")):
                data = encode_field(field, sample[field])
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                info.mtime = _MTIME
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
            count += 1
    finally:
        if tar is not None:
            tar.close()
    return paths


def write_parquet(
    rows: Iterable[Mapping[str, Any]], path: str, *, row_group_size: int = 1000
) -> str:
    """Write rows (dicts with the same keys) to one Parquet file; bytes become binary columns."""
    rows = list(rows)
    if not rows:
        raise ConfigError(f"write_parquet({path!r}): no rows")
    columns: dict[str, Any] = {name: [r[name] for r in rows] for name in rows[0]}
    for name, vals in columns.items():
        # Equal-shape 1-D numeric arrays: a fixed-size list, which mmload batches as a tensor
        # (a variable-length list stays a list of arrays in every batch).
        arrays = all(
            isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iufb" for v in vals
        )
        if arrays and len({v.shape for v in vals}) == 1:
            flat = pa.array(np.concatenate(vals))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, len(vals[0]))
    table = pa.table(columns)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
