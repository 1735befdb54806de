"""Decoding: per-field decoders, image batch decode (DALI or PIL), bad-sample replacement.

See README.md in this folder for the flow.
"""

from __future__ import annotations

import logging
from typing import Literal

from mmload.config import ImageConfig
from mmload.decode.batch import BatchDecoder, FieldDecoder, FieldPlan, ImageDecoder, ImageField
from mmload.errors import ConfigError

__all__ = [
    "BatchDecoder",
    "FieldDecoder",
    "FieldPlan",
    "ImageDecoder",
    "ImageField",
    "make_image_decoder",
]


def make_image_decoder(
    cfg: ImageConfig,
    max_batch: int,
    *,
    device: Literal["cpu", "cuda"],
    device_id: int | None,
    threads: int,
    depth: int = 1,
) -> ImageDecoder:
    """The image decoder for ``cfg.backend``.

    ``auto``: DALI when installed (CPU or ``mixed`` GPU decode), else PIL on the CPU or the
    torchvision nvJPEG + fused-kernel fallback on a CUDA device.
    """
    from mmload.decode.dali import DaliImageDecoder, dali_available

    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else ("torchvision" if device == "cuda" else "pil")
        if backend != "dali":
            _note_no_dali(backend)
    if backend == "torchvision":
        if device != "cuda":
            raise ConfigError("image backend 'torchvision' decodes on the GPU: use device='cuda'")
        from mmload.decode.nvjpeg import TorchvisionGpuDecoder

        return TorchvisionGpuDecoder(cfg, device_id=device_id)
    if backend == "dali":
        if not dali_available():
            raise ConfigError(
                "image backend 'dali' needs NVIDIA DALI, which is not installed: "
                'pip install "mmload[dali]" (or nvidia-dali-cuda130)'
            )
        return DaliImageDecoder(
            cfg, max_batch, device=device, device_id=device_id, threads=threads, depth=depth
        )
    from mmload.decode.image import PilImageDecoder

    return PilImageDecoder(cfg, threads)


_noted = False


def _note_no_dali(backend: str) -> None:
    """Say once per process that images decode without DALI, and how to get it."""
    global _noted
    if not _noted:
        _noted = True
        logging.getLogger("mmload").info(
            'images decode with %s: DALI is not installed (pip install "mmload[dali]" for '
            "the faster decoder; see the README's Install section)",
            backend,
        )
