"""DALI image decode, fed by mmload (the only module that imports DALI).

mmload hands DALI whole batches of encoded bytes plus the crop windows and flips it drew itself
(``fn.external_source`` in batch mode); DALI owns decode (``cpu``: libjpeg-turbo with ROI decode;
``cuda``: ``mixed`` nvJPEG with the hardware JPEG decoder), resize, flip and normalize. The
output is copied once into a torch tensor the caller owns: ``[B, 3, H, W]`` of ``cfg.dtype`` on
the CPU, or on ``cuda:<device_id>``.

DALI fails a whole batch when one image is bad; :class:`DaliBatchError` reports that, and the
caller isolates the bad sample (see ``decode.batch``). With the dynamic executor the pipeline
stays usable after such an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from typing import Any, Literal

import numpy as np
import torch

from mmload.augment import CropParams
from mmload.config import ImageConfig
from mmload.errors import MissingDependencyError

__all__ = ["DaliBatchError", "DaliImageDecoder", "dali_available", "import_in_background"]

log = logging.getLogger(__name__)


class DaliBatchError(RuntimeError):
    """DALI failed a batch; which sample caused it is not known yet."""


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def import_in_background() -> None:
    """Start importing DALI in a daemon thread (~0.3 s), to overlap it with shard indexing."""
    if dali_available() and "nvidia.dali.fn" not in sys.modules:
        threading.Thread(target=_warm_import, name="mmload-dali-import", daemon=True).start()


def _warm_import() -> None:
    try:
        importlib.import_module("nvidia.dali.fn")
    except ImportError as e:  # the decode thread imports again and reports it
        log.debug("background DALI import failed: %s", e)


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
    except ImportError:
        raise MissingDependencyError("nvidia.dali", "gpu", "DALI image decode") from None
    return dali


class DaliImageDecoder:
    """A DALI pipeline: encoded bytes + crop windows + flips -> normalised NCHW batch."""

    def __init__(
        self,
        cfg: ImageConfig,
        max_batch: int,
        *,
        device: Literal["cpu", "cuda"] = "cpu",
        device_id: int | None = None,
        threads: int = 2,
        hw_decoder_load: float = 0.65,
    ) -> None:
        self.cfg = cfg
        self.max_batch = max_batch
        self.device = device
        self.device_id = device_id if device == "cuda" else None
        self.threads = max(1, threads)
        self.hw_decoder_load = hw_decoder_load
        self._pipe: Any = None

    def _build(self) -> Any:
        dali = _import_dali()
        fn = dali.fn
        types = dali.types
        cfg = self.cfg
        out_dtype = {
            "uint8": types.UINT8,
            "float16": types.FLOAT16,
            "float32": types.FLOAT,
            "bfloat16": types.FLOAT,  # DALI has no bfloat16: cast in torch
        }[cfg.dtype]
        mean = list(cfg.mean) if cfg.normalize else [0.0, 0.0, 0.0]
        std = list(cfg.std) if cfg.normalize else [1.0, 1.0, 1.0]
        decoder_device = "mixed" if self.device == "cuda" else "cpu"
        decode_kw: dict[str, Any] = {}
        if self.device == "cuda":
            decode_kw["hw_decoder_load"] = self.hw_decoder_load

        @dali.pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipe() -> Any:
            enc = fn.external_source(
                name="enc", batch=True, dtype=types.UINT8, ndim=1, no_copy=True
            )
            anchor = fn.external_source(name="anchor", batch=True, dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", batch=True, dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", batch=True, dtype=types.INT32, ndim=0)
            img = fn.decoders.image_slice(
                enc,
                anchor,
                shape,
                device=decoder_device,
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
                **decode_kw,
            )
            img = fn.resize(
                img,
                resize_x=cfg.size[1],
                resize_y=cfg.size[0],
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            return fn.crop_mirror_normalize(
                img, mirror=flip, mean=mean, std=std, dtype=out_dtype, output_layout="CHW"
            )

        p = pipe()
        p.build()
        return p

    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor:
        """``[len(data), 3, H, W]``; raises :class:`DaliBatchError` if DALI rejects the batch."""
        del sizes  # DALI reads the dimensions itself; the windows are in source pixels
        n = len(data)
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the pipeline's max batch {self.max_batch}")
        if self._pipe is None:
            self._pipe = self._build()
        enc = [np.frombuffer(d, dtype=np.uint8) for d in data]
        anchor = np.stack([crops.x0, crops.y0], axis=1).astype(np.float32)
        shape = np.stack([crops.w, crops.h], axis=1).astype(np.float32)
        flip = crops.flip.astype(np.int32)
        p = self._pipe
        try:
            p.feed_input("enc", enc)
            p.feed_input("anchor", anchor)
            p.feed_input("shape", shape)
            p.feed_input("flip", flip)
            (out,) = p.run()
        except RuntimeError as e:
            raise DaliBatchError(str(e).splitlines()[0] if str(e) else "DALI error") from e
        # The dynamic executor hands out a fresh buffer per iteration, so a zero-copy DLPack view
        # stays valid after the next run (the capsule keeps DALI's buffer alive).
        # On the GPU, torch.from_dlpack passes the consumer's current stream to __dlpack__, so
        # DALI orders its producing work before any kernel the consumer queues on that stream.
        result = torch.from_dlpack(out.as_tensor())
        if self.cfg.dtype == "bfloat16":
            result = result.to(torch.bfloat16)
        return result

    def close(self) -> None:
        self._pipe = None
