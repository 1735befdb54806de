"""Shard sources: spec expansion, fetching, WebDataset tar and Arrow/Parquet indexes and reads."""

from __future__ import annotations

from mmload.sources.dataset import Dataset, RawSample
from mmload.sources.spec import ShardSpec, expand

__all__ = ["Dataset", "RawSample", "ShardSpec", "expand"]
