"""What a loader will do, decided at construction: its validated options and its field plan.

``LoaderOptions`` holds everything ``Loader``/``IterableDataset`` take besides the source;
``field_plan`` decides which fields every batch has, how each is decoded (by name for tar members
and binary columns, by type for typed columns) and what a feature join extracts (a key and a
timestamp, possibly from inside a JSON field).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmload.config import (
    AudioConfig,
    ErrorPolicy,
    FeatureJoin,
    ImageConfig,
    ShuffleConfig,
    TextConfig,
    VideoConfig,
)
from mmload.decode import FieldPlan
from mmload.decode.batch import MEDIA
from mmload.decode.fields import FieldKind, field_kind, fixed_shape, kind_class
from mmload.errors import ConfigError
from mmload.sources import Dataset
from mmload.sources.dataset import FieldInfo

__all__ = [
    "FEATURE_KEY",
    "FEATURE_TS",
    "LoaderOptions",
    "default_partitions",
    "default_threads",
    "divisors",
    "field_plan",
    "validate_fields",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderOptions:
    """Everything ``Loader``/``IterableDataset`` take besides the source, validated."""

    batch_size: int
    device: torch.device
    shuffle: ShuffleConfig | None
    seed: int
    drop_last: bool
    fields: tuple[str, ...] | None
    image_fields: frozenset[str] | None
    image: ImageConfig
    features: FeatureJoin | None
    audio: AudioConfig | None
    video: VideoConfig | None
    text: TextConfig | None
    key_column: str | None
    policy: ErrorPolicy
    threads: int
    prefetch: int
    partitions: int | None = None
    ragged: str = "jagged"  # variable-length lists of numbers: "jagged" (Jagged) or "list"

    def __post_init__(self) -> None:
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(f"batch_size={self.batch_size!r}: must be a positive int")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: must be a non-negative int")
        if self.threads < 1:
            raise ConfigError(f"threads={self.threads!r}: must be >= 1")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch={self.prefetch!r}: must be >= 1")
        if self.ragged not in ("jagged", "list"):
            raise ConfigError(f"ragged={self.ragged!r}: must be 'jagged' or 'list'")
        p = self.partitions
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"partitions={p!r}: must be a positive int or None")


def default_partitions(num_shards: int, world_size: int) -> int:
    """``2 * world_size`` when that leaves every partition >= 8 shards, else ``world_size``.

    A rank reads ``P / world_size`` partitions at once, each through a group of ``interleave``
    chunks, so its working set (and the shards fetched before its first batch) grows with
    ``P / world_size``: the default keeps it at one or two groups, and elastic resume works on
    any divisor of ``P`` (half the ranks, or twice as many with ``2 * world_size``). Pass
    ``partitions=`` for more world sizes."""
    return 2 * world_size if 2 * world_size * 8 <= num_shards else world_size


def _split_path(spec: str, available: set[str], what: str) -> tuple[str, tuple[str, ...]]:
    """``"json.user_id"`` -> (``"json"``, ``("user_id",)``): the longest dotted prefix that is a
    field; the rest is a path into its (JSON) value."""
    parts = spec.split(".")
    for cut in range(len(parts), 0, -1):
        field = ".".join(parts[:cut])
        if field in available:
            return field, tuple(parts[cut:])
    raise ConfigError(
        f"FeatureJoin.{what}={spec!r}: no field of the data set matches "
        f"(fields: {sorted(available)})"
    )


def field_plan(ds: Dataset, opts: LoaderOptions) -> tuple[FieldPlan, dict[str, Any]]:
    """Fields of every batch (``opts.fields``, else every field of the data set's schema: the
    union over all shards, read from the indexes) and what the feature join extracts."""
    schema = ds.field_schema()
    names = opts.fields
    if names is None:
        names = tuple(sorted(k for k in schema if not k.startswith("__")))
        log.info("batch fields (every field of the data set): %s", ", ".join(names))
    else:
        unknown = [f for f in names if f not in schema]
        if unknown:
            raise ConfigError(
                f"fields={list(names)}: {unknown} are in no shard of the data set "
                f"(fields: {sorted(schema)})"
            )
    for n in names:
        fi = schema[n]
        if fi.samples < ds.num_samples:
            log.warning(
                "field %r is missing from %d of %d samples (first shard with it: %s); samples "
                "without it are bad samples. Pass fields=[...] to choose the batch fields",
                n,
                ds.num_samples - fi.samples,
                ds.num_samples,
                fi.first_shard,
            )
    hidden: set[str] = set()
    extract: dict[str, Any] = {}
    if opts.features is not None:
        available = {k for k in schema if not k.startswith("__")} | set(names)
        for name, spec, types in (
            (FEATURE_KEY, opts.features.key, (int, str)),
            (FEATURE_TS, opts.features.timestamp, int),
        ):
            field, path = _split_path(
                spec, available, "key" if name == FEATURE_KEY else "timestamp"
            )
            if field not in names:
                names = (*names, field)
                hidden.add(field)
            extract[name] = (field, path, types)
    kinds = {n: _kind(n, schema[n], opts.image_fields) for n in names}
    for n, k in kinds.items():  # audio/video are decoded when configured, else passed as bytes
        if (k == "audio" and opts.audio is None) or (k == "video" and opts.video is None):
            kinds[n] = "bytes"
    if opts.text is not None:
        absent = [f for f in opts.text.fields if f not in names]
        if absent:
            raise ConfigError(
                f"TextConfig.fields {absent} are not fields of this data set {list(names)}"
            )
        for f in opts.text.fields:
            if kinds[f] in ("bytes", "text"):
                kinds[f] = "text"  # UTF-8 text whatever the extension (a bad byte: a bad sample)
            elif kinds[f] != "value":
                raise ConfigError(f"TextConfig field {f!r} is a {kinds[f]} field, not text")
    for name, (field, _, _) in extract.items():
        if kinds[field] in ("image", "audio", "video", "bytes"):
            raise ConfigError(
                f"the feature join reads {name} from field {field!r}, a {kinds[field]} field"
            )
    if opts.features is not None:
        clash = set(opts.features.table.column_names) & (set(names) - hidden)
        if clash:
            raise ConfigError(
                f"feature columns {sorted(clash)} clash with batch fields of the same name"
            )
    classes = {n: kind_class(k, schema[n].arrow_type) for n, k in kinds.items() if k not in MEDIA}
    for n, cls in classes.items():
        for shard, t in schema[n].other_types:
            other = kind_class("value", t)
            widened = (cls, other) in (("float", "int"), ("jagged_float", "jagged_int"))
            if other != cls and not widened:
                log.warning(
                    "column %r is %s in shard %s but %s (%s) in %s: its values there are bad "
                    "samples",
                    n,
                    t,
                    shard,
                    schema[n].arrow_type,
                    cls,
                    schema[n].first_shard,
                )
    shapes: dict[str, tuple[int, ...]] = {}
    for n, cls in classes.items():
        if cls == "array":  # a fixed-size list: its (nested) row shape is in its Arrow type
            shape = fixed_shape(schema[n].arrow_type or "")
            if shape is None:
                classes[n] = "ragged"  # fixed-size lists of something that is not a number
            else:
                shapes[n] = shape
        elif cls.startswith("jagged_") and opts.ragged == "list":
            classes[n] = "ragged"  # Python lists of arrays, as before Jagged
    return FieldPlan(tuple(names), kinds, frozenset(hidden), classes, shapes), extract


def _kind(name: str, fi: FieldInfo, image_fields: frozenset[str] | None) -> FieldKind:
    """A tar member or a binary column is decoded by its name; a typed column is a value."""
    t = fi.arrow_type
    binary = t is None or kind_class("value", t) == "bytes"
    return field_kind(name, b"" if binary else None, image_fields)


FEATURE_KEY = "__feature_key__"
FEATURE_TS = "__feature_ts__"


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def default_threads(num_workers: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def validate_fields(fields: Sequence[str] | None) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        return (fields,)
    out = tuple(fields)
    if not out or not all(isinstance(f, str) and f for f in out):
        raise ConfigError(f"fields={fields!r}: must be a non-empty sequence of field names")
    return out
