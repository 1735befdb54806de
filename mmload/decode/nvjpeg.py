"""GPU image decode without DALI: torchvision's batched ``decode_jpeg(device="cuda")`` (nvJPEG)
followed by mmload's fused crop + resize + flip + normalize kernel.

The fallback when DALI is not installed (``ImageConfig(backend="torchvision")``, or ``"auto"`` on
a CUDA device without DALI). JPEGs decode on the GPU; other formats decode on the CPU with PIL
and are uploaded. Output ``[B, 3, H, W]`` of ``cfg.dtype`` on ``cuda:<device_id>``. The fused
kernel resizes bilinearly **without antialiasing** (``kernels/README.md``), so on downscale its
pixels differ from DALI's antialiased resize by more than DALI CPU vs DALI GPU do.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from mmload.augment import CropParams
from mmload.config import ImageConfig
from mmload.decode.image import torch_dtype
from mmload.errors import MissingDependencyError

__all__ = ["TorchvisionGpuDecoder"]


class TorchvisionGpuDecoder:
    """nvJPEG decode via torchvision, then ``mmload.kernels.crop_resize_normalize``."""

    def __init__(self, cfg: ImageConfig, *, device_id: int | None) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda", device_id or 0)

    def _decode_hwc(self, data: list[bytes]) -> list[torch.Tensor]:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise MissingDependencyError(
                "torchvision", "gpu", "the torchvision GPU decode fallback"
            ) from None
        out: list[torch.Tensor | None] = [None] * len(data)
        jpeg = [i for i, d in enumerate(data) if d[:3] == b"\xff\xd8\xff"]
        if jpeg:
            encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpeg]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as e:
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                raise ValueError(f"nvJPEG: {e}") from None
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img.permute(1, 2, 0)
        for i, d in enumerate(data):
            if out[i] is None:
                from PIL import Image

                arr = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
                out[i] = torch.from_numpy(arr).to(self.device, non_blocking=True)
        return [o for o in out if o is not None]

    def decode(
        self, data: list[bytes], sizes: list[tuple[int, int]], crops: CropParams
    ) -> torch.Tensor:
        """``[B, 3, H, W]`` on the GPU; raises RuntimeError/ValueError on a bad image."""
        from mmload.decode.gpu import numba_on
        from mmload.kernels.crop_resize_normalize import crop_resize_normalize

        images = self._decode_hwc(data)
        heights = np.array([im.shape[0] for im in images], dtype=np.int32)
        widths = np.array([im.shape[1] for im in images], dtype=np.int32)
        if [tuple(s) for s in zip(heights.tolist(), widths.tolist(), strict=True)] != [
            tuple(s) for s in sizes
        ]:
            raise ValueError("decoded image sizes differ from their headers")
        flat = torch.cat([im.reshape(-1) for im in images])
        offsets = np.concatenate(
            [[0], np.cumsum(heights.astype(np.int64) * widths * 3)[:-1]]
        ).astype(np.int64)
        h, w = self.cfg.size
        out = torch.empty(
            (len(images), 3, h, w), dtype=torch_dtype(self.cfg.dtype), device=self.device
        )
        kw: dict[str, Any] = {}
        if self.cfg.normalize:
            kw = {"mean": self.cfg.mean, "std": self.cfg.std}
        with numba_on(self.device) as stream:
            crop_resize_normalize(
                flat,
                offsets,
                heights,
                widths,
                crops,
                out,
                dtype=self.cfg.dtype,
                stream=stream,
                **kw,
            )
        return out

    def close(self) -> None:
        return None
