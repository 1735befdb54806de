"""Image batch decode on the CPU with PIL (the fallback when DALI is absent) and normalisation.

``PilImageDecoder.decode`` returns ``[B, 3, H, W]`` in the configured dtype on the CPU, with
the crop windows and flips of :class:`~mmload.augment.CropParams` applied.
"""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mmload.augment import CropParams
from mmload.config import ImageConfig

__all__ = ["PilImageDecoder", "normalize_nhwc"]

_TORCH_DTYPES = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def normalize_nhwc(batch: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ``[B, 3, H, W]`` in ``cfg.dtype`` (normalised if configured)."""
    x = batch.permute(0, 3, 1, 2)
    if not cfg.normalize:
        return x.to(torch_dtype(cfg.dtype)).contiguous()
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    inv = 1.0 / torch.tensor(cfg.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    y = x.to(torch.float32).sub_(mean).mul_(inv)
    return y.to(torch_dtype(cfg.dtype)).contiguous(memory_format=torch.contiguous_format)


class PilImageDecoder:
    """Decodes a batch of encoded images with PIL in a thread pool (PIL releases the GIL)."""

    def __init__(self, cfg: ImageConfig, threads: int) -> None:
        self.cfg = cfg
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="mmload-pil")

    def _one(
        self, data: bytes, src_hw: tuple[int, int], c: tuple[int, int, int, int, bool]
    ) -> np.ndarray:
        from PIL import Image

        try:
            return self._decode_one(data, src_hw, c)
        except (struct.error, IndexError, TypeError, ZeroDivisionError) as e:
            # PIL's plugins raise these, too, on corrupt bytes (not only OSError/ValueError).
            raise ValueError(f"corrupt image: {type(e).__name__}: {e}") from None
        except Image.DecompressionBombError as e:
            raise ValueError(str(e)) from None

    def _decode_one(
        self, data: bytes, src_hw: tuple[int, int], c: tuple[int, int, int, int, bool]
    ) -> np.ndarray:
        from PIL import Image
        from PIL.JpegImagePlugin import JpegImageFile

        y0, x0, h, w, flip = c
        out_h, out_w = self.cfg.size
        im: Image.Image = Image.open(io.BytesIO(data))
        full_w, full_h = src_hw[1], src_hw[0]
        if isinstance(im, JpegImageFile):
            im.draft("RGB", (max(1, -(-full_w * out_w // w)), max(1, -(-full_h * out_h // h))))
        if im.mode != "RGB":
            im = im.convert("RGB")
        fx, fy = im.width / full_w, im.height / full_h
        box = (x0 * fx, y0 * fy, (x0 + w) * fx, (y0 + h) * fy)
        im = im.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(im)

    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor:
        """``[B, 3, H, W]`` of ``cfg.dtype``; raises the first image's decode exception."""
        params = [
            (
                int(crops.y0[i]),
                int(crops.x0[i]),
                int(crops.h[i]),
                int(crops.w[i]),
                bool(crops.flip[i]),
            )
            for i in range(len(data))
        ]
        arrays = list(self._pool.map(self._one, data, sizes, params))
        batch = (
            torch.from_numpy(np.stack(arrays))
            if arrays
            else torch.zeros((0, *self.cfg.size, 3), dtype=torch.uint8)
        )
        return normalize_nhwc(batch, self.cfg)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
