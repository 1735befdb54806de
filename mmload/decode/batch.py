"""Decode a batch of raw samples into a batch dict, replacing bad samples within a budget.

Flow per batch: read errors and missing fields -> value fields (cls/json/txt) -> image header
checks -> one batch decode per image field (DALI or PIL) -> on a batch failure, per-sample
isolation -> every bad slot takes the next good sample of the same batch (deterministic), so the
batch keeps its shape; each bad sample is counted and listed in ``Stats``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mmload.augment import CropParams, draw_crops
from mmload.config import ErrorPolicy, ImageConfig
from mmload.decode.fields import FieldKind, collate, decode_value
from mmload.decode.headers import read_header
from mmload.errors import BadEntry, DecodeError, ShardError
from mmload.stats import Stats

_DataError = ShardError | DecodeError

__all__ = ["BatchDecoder", "FieldPlan", "ImageDecoder"]

log = logging.getLogger(__name__)


_DECODE_ERRORS = (RuntimeError, OSError, ValueError, SyntaxError)


class ImageDecoder(Protocol):
    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class FieldPlan:
    """The fields every batch has, in output order, and how each is decoded."""

    names: tuple[str, ...]
    kinds: dict[str, FieldKind]

    @property
    def image_fields(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if self.kinds[n] == "image")


def _replacement(good: np.ndarray) -> np.ndarray:
    """For each slot, itself if good, else the next good slot (cyclically)."""
    n = len(good)
    idx = np.flatnonzero(good)
    nxt = np.searchsorted(idx, np.arange(n))
    return np.where(good, np.arange(n), idx[nxt % len(idx)])


class BatchDecoder:
    """Turns ``Dataset.read`` output into ``{"__key__": [...], field: tensor | list, ...}``."""

    def __init__(
        self,
        fields: FieldPlan,
        image: ImageConfig,
        image_decoder: ImageDecoder | None,
        policy: ErrorPolicy,
        stats: Stats,
        seed: int,
    ) -> None:
        if fields.image_fields and image_decoder is None:
            raise ValueError("image fields need an image decoder")
        self.fields = fields
        self.image = image
        self.image_decoder = image_decoder
        self.policy = policy
        self.stats = stats
        self.seed = seed

    def _bad(self, errors: dict[int, _DataError], j: int, err: _DataError) -> None:
        if self.policy.on_error == "raise":
            raise err
        errors.setdefault(j, err)

    def _decode_images(
        self,
        name: str,
        raws: list[dict[str, Any]],
        good: list[int],
        sizes: dict[int, tuple[int, int]],
        epoch: int,
        errors: dict[int, _DataError],
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """The decoded images of the ``good`` slots and, per slot, its row in that tensor."""
        assert self.image_decoder is not None
        ids = np.array([raws[j]["__id__"] for j in good], dtype=np.int64)
        hw = np.array([sizes[j] for j in good], dtype=np.int64).reshape(-1, 2)
        crops = draw_crops(hw[:, 0], hw[:, 1], self.image, seed=self.seed, epoch=epoch, ids=ids)
        data = [raws[j][name] for j in good]
        size_list = [sizes[j] for j in good]
        try:
            out = self.image_decoder.decode(data, size_list, crops)
            return out, {j: i for i, j in enumerate(good)}
        except _DECODE_ERRORS as e:
            log.info("image batch decode failed (%s); isolating the bad sample", e)
        rows: list[torch.Tensor] = []
        where: dict[int, int] = {}
        for i, j in enumerate(good):
            try:
                img = self.image_decoder.decode(
                    [data[i]], [size_list[i]], crops.take(np.array([i]))
                )
            except _DECODE_ERRORS as e:
                s = raws[j]
                reason = f"field {name!r}: cannot decode image: {e}"
                self._bad(errors, j, DecodeError(reason, shard=s["__shard__"], key=s["__key__"]))
                continue
            where[j] = len(rows)
            rows.append(img[0])
        return (torch.stack(rows) if rows else torch.empty(0)), where

    def __call__(self, raw: list[dict[str, Any] | ShardError], epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        n = len(raw)
        errors: dict[int, _DataError] = {}
        values: dict[str, list[Any]] = {f: [None] * n for f in self.fields.names}
        sizes: dict[str, dict[int, tuple[int, int]]] = {f: {} for f in self.fields.image_fields}
        for j, s in enumerate(raw):
            if isinstance(s, ShardError):
                self._bad(errors, j, s)
                continue
            for f in self.fields.names:
                if f not in s:
                    self._bad(
                        errors,
                        j,
                        DecodeError(
                            f"sample lacks field {f!r}", shard=s["__shard__"], key=s["__key__"]
                        ),
                    )
                    break
                kind = self.fields.kinds[f]
                try:
                    if kind == "image":
                        h = read_header(
                            s[f],
                            shard=s["__shard__"],
                            key=s["__key__"],
                            max_pixels=self.image.max_pixels,
                            max_side=self.image.max_side,
                        )
                        sizes[f][j] = (h.height, h.width)
                    else:
                        values[f][j] = decode_value(kind, s[f])
                except DecodeError as e:
                    self._bad(errors, j, e)
                    break
                except (ValueError, UnicodeDecodeError) as e:
                    err = DecodeError(
                        f"field {f!r}: {type(e).__name__}: {e}",
                        shard=s["__shard__"],
                        key=s["__key__"],
                    )
                    self._bad(errors, j, err)
                    break
        samples: list[dict[str, Any]] = [s if isinstance(s, dict) else {} for s in raw]
        images: dict[str, tuple[torch.Tensor, dict[int, int]]] = {}
        for f in self.fields.image_fields:
            good = [j for j in range(n) if j not in errors]
            if good:
                images[f] = self._decode_images(f, samples, good, sizes[f], epoch, errors)
        ok = np.array([j not in errors for j in range(n)], dtype=bool)
        if errors:
            if not ok.any():
                first = next(iter(errors.values()))
                raise type(first)(
                    f"every sample of a batch of {n} is bad; first: {first.reason}",
                    shard=first.shard,
                    key=first.key,
                )
            self.stats.add_bad(
                [BadEntry(e.shard, e.key, e.reason) for e in errors.values()], errors.values()
            )
        src = _replacement(ok)
        batch: dict[str, Any] = {"__key__": [samples[k]["__key__"] for k in src.tolist()]}
        for f in self.fields.names:
            if self.fields.kinds[f] == "image":
                tensor, where = images[f]
                rows = [where[k] for k in src.tolist()]
                identity = rows == list(range(len(tensor))) and len(rows) == len(tensor)
                batch[f] = tensor if identity else tensor[torch.tensor(rows, device=tensor.device)]
            else:
                batch[f] = collate([values[f][k] for k in src.tolist()])
        self.stats.time("decode", time.perf_counter() - t0)
        return batch
