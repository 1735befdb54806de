"""Decode a batch of raw samples into a batch dict, replacing bad samples within a budget.

Flow per batch: read errors and missing fields -> value fields (cls/json/txt) -> image header
checks -> one batch decode per media field (image: DALI or PIL; audio; video) -> on a batch
failure, per-sample isolation -> every bad slot takes the next good sample of the same batch
(deterministic), so the batch keeps its shape; each bad sample is counted and listed in
``Stats``. Text fields named by a ``TextConfig`` become ids + attention mask.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from mmload.augment import CropParams, draw_crops
from mmload.config import ErrorPolicy, ImageConfig, TextConfig
from mmload.decode.dali import DaliBatchError
from mmload.decode.fields import FieldKind, ValueClass, collate, conform, decode_value
from mmload.decode.headers import read_header
from mmload.decode.text import Tokenizer, encode_batch
from mmload.errors import BadEntry, DecodeError, ShardError
from mmload.jagged import Jagged
from mmload.stats import Stats

_DataError = ShardError | DecodeError

__all__ = ["BatchDecoder", "FieldDecoder", "FieldPlan", "ImageDecoder", "ImageField"]

log = logging.getLogger(__name__)

# What a decoder raises for bad bytes (PIL: OSError/ValueError/SyntaxError/EOFError; audio, video
# and torchvision decoders turn theirs into ValueError; DALI: DaliBatchError). Anything else (CUDA
# out of memory, a bug) is not blamed on the data: it propagates.
_DECODE_ERRORS = (DaliBatchError, OSError, ValueError, SyntaxError, EOFError)
MEDIA: frozenset[FieldKind] = frozenset({"image", "audio", "video"})


class ImageDecoder(Protocol):
    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class FieldDecoder(Protocol):
    """Decodes one media field for a list of samples; raises if any of them is bad.

    ``meta``: per-sample side information from the checks (image sizes), or None. A decoder may
    also offer ``submit(data, ids, epoch, meta) -> handle`` and ``result(handle)`` to decode
    batches in flight (submission order), which the batch decoder then uses.
    """

    def decode(
        self, data: list[bytes], ids: np.ndarray, epoch: int, meta: list[Any] | None = None
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class ImageField:
    """An image decoder plus the crop/flip draws: ``[n, 3, H, W]``; ``meta`` = (h, w) per image."""

    def __init__(self, decoder: ImageDecoder, cfg: ImageConfig, seed: int) -> None:
        self.decoder = decoder
        self.cfg = cfg
        self.seed = seed

    def _crops(self, ids: np.ndarray, epoch: int, meta: list[Any] | None) -> CropParams:
        hw = np.array(meta, dtype=np.int64).reshape(-1, 2)
        return draw_crops(hw[:, 0], hw[:, 1], self.cfg, seed=self.seed, epoch=epoch, ids=ids)

    def decode(
        self, data: list[bytes], ids: np.ndarray, epoch: int, meta: list[Any] | None = None
    ) -> torch.Tensor:
        return self.decoder.decode(data, list(meta or []), self._crops(ids, epoch, meta))

    def submit(
        self, data: list[bytes], ids: np.ndarray, epoch: int, meta: list[Any] | None = None
    ) -> Any:
        crops = self._crops(ids, epoch, meta)
        submit = getattr(self.decoder, "submit", None)
        if submit is None:
            return (data, list(meta or []), crops)
        return submit(data, crops)

    def result(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, tuple):
            return self.decoder.decode(*handle)
        return self.decoder.collect(handle)  # type: ignore[attr-defined]

    def reset(self) -> None:
        reset = getattr(self.decoder, "reset", None)
        if reset is not None:
            reset()

    def close(self) -> None:
        self.decoder.close()


@dataclass
class Pending:
    """A batch between ``prepare`` (checks done, media submitted) and ``finish``."""

    n: int
    epoch: int
    samples: list[dict[str, Any]]
    errors: dict[int, _DataError]
    values: dict[str, list[Any]]
    media: dict[str, tuple[Any, list[int], list[bytes], np.ndarray, list[Any] | None]]
    seconds: float


@dataclass(frozen=True)
class FieldPlan:
    """The fields every batch has, in output order, and how each is decoded."""

    names: tuple[str, ...]
    kinds: dict[str, FieldKind]
    hidden: frozenset[str] = frozenset()  # decoded (e.g. for a feature key) but not emitted
    # The pinned class of each non-media field (see decode.fields).
    classes: dict[str, ValueClass] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # array fields

    @property
    def image_fields(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if self.kinds[n] == "image")

    @property
    def media_fields(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if self.kinds[n] in MEDIA)


def _repeat(one: dict[str, Any], n: int) -> dict[str, Any]:
    """A batch of one repeated ``n`` times."""
    return {
        k: v.expand(n, *v.shape[1:]).clone()
        if isinstance(v, torch.Tensor)
        else v.repeat(n)
        if isinstance(v, Jagged)
        else v * n
        for k, v in one.items()
    }


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
        media: dict[str, FieldDecoder],
        image: ImageConfig,
        policy: ErrorPolicy,
        stats: Stats,
        text: TextConfig | None = None,
        extract: dict[str, tuple[str, tuple[str, ...], type | tuple[type, ...]]] | None = None,
    ) -> None:
        missing = [f for f in fields.media_fields if f not in media]
        if missing:
            raise ValueError(f"media fields {missing} have no decoder")
        self.fields = fields
        self.media = media
        self.image = image
        self.policy = policy
        self.stats = stats
        self.text = text
        self._tokenizer = Tokenizer(text.tokenizer) if text is not None else None
        # name -> (field, path into its value, accepted types): per-sample scalars pulled out of
        # decoded fields (a feature join's key and timestamp), emitted as batch[name] lists.
        self.extract = extract or {}
        # One good sample as a batch of one: replaces the samples of a batch in which every
        # sample is bad (shapes and types stay those of every other batch). Found once per epoch
        # in ``spare_source``: the rank's own batches from the start of the epoch, so it is a
        # function of the plan (the same for any number of workers, and after a resume).
        self._spare: dict[str, Any] | None = None
        self.spare_source: Callable[[], Iterable[list[dict[str, Any] | ShardError]]] | None = None

    def _bad(self, errors: dict[int, _DataError], j: int, err: _DataError) -> None:
        if self.policy.on_error == "raise":
            raise err
        errors.setdefault(j, err)

    def _media_result(self, name: str, p: Pending) -> tuple[torch.Tensor, dict[int, int]]:
        """The decoded field of its slots and, per slot, its row in that tensor; on a batch
        failure each sample is decoded alone to find (and mark) the bad ones."""
        dec = self.media[name]
        handle, good, data, ids, meta = p.media[name]
        try:
            result = getattr(dec, "result", None)
            out = (
                result(handle)
                if result is not None and handle is not None
                else dec.decode(data, ids, p.epoch, meta)
            )
            return out, {j: i for i, j in enumerate(good)}
        except _DECODE_ERRORS as e:
            log.info("batch decode of field %r failed (%s); isolating the bad sample", name, e)
        rows: list[torch.Tensor] = []
        where: dict[int, int] = {}
        for i, j in enumerate(good):
            try:
                one = dec.decode(
                    [data[i]],
                    ids[i : i + 1],
                    p.epoch,
                    meta[i : i + 1] if meta is not None else None,
                )
            except _DECODE_ERRORS as e:
                s = p.samples[j]
                reason = f"field {name!r}: cannot decode {self.fields.kinds[name]}: {e}"
                self._bad(p.errors, j, DecodeError(reason, shard=s["__shard__"], key=s["__key__"]))
                continue
            where[j] = len(rows)
            rows.append(one[0])
        return (torch.stack(rows) if rows else torch.empty(0)), where

    def _check(
        self, raw: list[dict[str, Any] | ShardError], errors: dict[int, _DataError]
    ) -> tuple[dict[str, list[Any]], dict[str, dict[int, tuple[int, int]]]]:
        """Missing fields, value decode and image header checks: the value columns and, per
        image field, each slot's (height, width)."""
        n = len(raw)
        values: dict[str, list[Any]] = {f: [None] * n for f in self.fields.names}
        sizes: dict[str, dict[int, tuple[int, int]]] = {f: {} for f in self.fields.image_fields}
        text_fields = set(self.text.fields) if self.text is not None else set()
        for j, s in enumerate(raw):
            if isinstance(s, ShardError):
                self._bad(errors, j, s)
                continue
            for f in self.fields.names:
                kind = self.fields.kinds[f]
                v = s.get(f)
                if v is None:
                    absent = f not in s
                    if absent or kind != "value" or f in text_fields:
                        what = "lacks field" if absent else "has a null"
                        err = DecodeError(
                            f"sample {what} {f!r}", shard=s["__shard__"], key=s["__key__"]
                        )
                        self._bad(errors, j, err)
                        break
                try:
                    if kind == "image":
                        h = read_header(
                            cast(bytes, v),  # not None: a null media field is bad above
                            shard=s["__shard__"],
                            key=s["__key__"],
                            max_pixels=self.image.max_pixels,
                            max_side=self.image.max_side,
                        )
                        sizes[f][j] = (h.height, h.width)
                    elif kind not in MEDIA:
                        value = decode_value(kind, v)
                        cls = self.fields.classes.get(f, "any")
                        why = conform(cls, value, self.fields.shapes.get(f))
                        if why is not None:
                            raise ValueError(f"{why} (field {f!r} holds {cls} values)")
                        values[f][j] = value
                except DecodeError as e:
                    self._bad(errors, j, e)
                    break
                except ValueError as e:  # UnicodeDecodeError included
                    err = DecodeError(
                        f"field {f!r}: {type(e).__name__}: {e}",
                        shard=s["__shard__"],
                        key=s["__key__"],
                    )
                    self._bad(errors, j, err)
                    break
            else:
                self._extract(values, j, s, errors)
        return values, sizes

    def _extract(
        self, values: dict[str, list[Any]], j: int, s: dict[str, Any], errors: dict[int, _DataError]
    ) -> None:
        """Pull this sample's extract values (feature key, timestamp) out of decoded fields."""
        for name, (field, path, types) in self.extract.items():
            v = values[field][j]
            for part in path:
                if not isinstance(v, dict) or part not in v:
                    v = None
                    break
                v = v[part]
            if isinstance(v, np.generic):
                v = v.item()
            if v is None or isinstance(v, bool) or not isinstance(v, types):
                where = ".".join((field, *path))
                want = " or ".join(
                    t.__name__ for t in (types if isinstance(types, tuple) else (types,))
                )
                reason = f"{where} is {v!r}: the feature join needs {want}"
                self._bad(errors, j, DecodeError(reason, shard=s["__shard__"], key=s["__key__"]))
                return
            values.setdefault(name, [None] * len(values[field]))[j] = v

    def prepare(
        self, raw: list[dict[str, Any] | ShardError], epoch: int, *, submit: bool = True
    ) -> Pending:
        """Checks and value fields now; media fields submitted to their decoders (``submit``
        False: decoded synchronously in ``finish``)."""
        t0 = time.perf_counter()
        n = len(raw)
        errors: dict[int, _DataError] = {}
        values, sizes = self._check(raw, errors)
        samples: list[dict[str, Any]] = [s if isinstance(s, dict) else {} for s in raw]
        media: dict[str, tuple[Any, list[int], list[bytes], np.ndarray, list[Any] | None]] = {}
        good = [j for j in range(n) if j not in errors]
        if good:
            ids = np.array([samples[j]["__id__"] for j in good], dtype=np.int64)
            for f in self.fields.media_fields:
                dec = self.media[f]
                data = [samples[j][f] for j in good]
                meta = [sizes[f][j] for j in good] if f in sizes else None
                send = getattr(dec, "submit", None) if submit else None
                handle = send(data, ids, epoch, meta) if send is not None else None
                media[f] = (handle, good, data, ids, meta)
        return Pending(n, epoch, samples, errors, values, media, time.perf_counter() - t0)

    def finish(self, p: Pending) -> dict[str, Any]:
        """Collect the media fields, replace bad slots, assemble the batch dict."""
        t0 = time.perf_counter()
        n, errors = p.n, p.errors
        decoded = {f: self._media_result(f, p) for f in self.fields.media_fields if f in p.media}
        ok = np.array([j not in errors for j in range(n)], dtype=bool)
        if errors:
            self.stats.add_bad(
                [BadEntry(e.shard, e.key, e.reason) for e in errors.values()], errors.values()
            )
            # Slots filled with repeats are not throughput: ``samples`` counts unique ones.
            self.stats.add("samples_replaced", int(n - ok.sum()))
            self.stats.add("samples", -int(n - ok.sum()))
            if not ok.any():
                if self._spare is None and self.spare_source is not None:
                    self._spare = self._find_spare(p.epoch)
                if self._spare is not None:
                    self.stats.time("decode", p.seconds + time.perf_counter() - t0)
                    return _repeat(self._spare, n)
                first = next(iter(errors.values()))
                raise type(first)(
                    f"every sample of a {n}-sample batch is bad, and no good sample was found "
                    f"to replace them with; first: {first.reason}",
                    shard=first.shard,
                    key=first.key,
                )
        batch = self._assemble(p, decoded, ok)
        self.stats.time("decode", p.seconds + time.perf_counter() - t0)
        return batch

    def _find_spare(self, epoch: int) -> dict[str, Any] | None:
        """The first good sample ``spare_source`` yields, decoded alone (synchronously, nothing
        counted: those samples are counted when their own batches come), as a batch of one."""
        assert self.spare_source is not None
        for raw in self.spare_source():
            for s in raw:
                if not isinstance(s, dict):
                    continue
                p = self.prepare([s], epoch, submit=False)
                if p.errors:
                    continue
                decoded = {
                    f: self._media_result(f, p) for f in self.fields.media_fields if f in p.media
                }
                if not p.errors:  # owning its memory (decoder outputs may be reused buffers)
                    one = self._assemble(p, decoded, np.ones(1, dtype=bool))
                    return {
                        k: v.clone() if isinstance(v, (torch.Tensor, Jagged)) else v
                        for k, v in one.items()
                    }
        return None

    def _assemble(
        self, p: Pending, decoded: dict[str, tuple[torch.Tensor, dict[int, int]]], ok: np.ndarray
    ) -> dict[str, Any]:
        """The batch dict, every bad slot taking the next good sample of the batch."""
        values, samples = p.values, p.samples
        src = _replacement(ok).tolist()
        batch: dict[str, Any] = {"__key__": [samples[k]["__key__"] for k in src]}
        text_fields = set(self.text.fields) if self.text is not None else set()
        for name in self.extract:
            batch[name] = [values[name][k] for k in src]
        for f in self.fields.names:
            if f in self.fields.hidden:
                continue
            if f in decoded:
                tensor, where = decoded[f]
                rows = [where[k] for k in src]
                identity = len(rows) == len(tensor) and rows == list(range(len(tensor)))
                batch[f] = tensor if identity else tensor[torch.tensor(rows, device=tensor.device)]
            elif f in text_fields:
                assert self._tokenizer is not None
                assert self.text is not None
                ids, mask = encode_batch(
                    [str(values[f][k]) for k in src], self._tokenizer, self.text
                )
                batch[f] = ids
                batch[f"{f}_attention_mask"] = mask
            else:
                batch[f] = collate([values[f][k] for k in src], self.fields.classes.get(f, "any"))
        return batch
