"""Video fields: ``F`` frames per clip, resized, as ``[B, F, 3, H, W]`` on the batch device.

Which frames: ``frame_indices`` (a pure function of the clip's frame count, the config and
(seed, epoch, sample id)). Decode: on the CPU with PyAV (``pip install "mmload[video]"``; DALI's
CPU video decoder has no H.264); with ``device="cuda"`` DALI's ``fn.decoders.video`` on NVDEC
(``mixed``) decodes exactly those frame indices, then resizes and normalises on the GPU. The
frame count comes from the container header (PyAV, no decode) in both cases.
"""

from __future__ import annotations

import io
import math
from collections import deque
from typing import Any

import numpy as np
import torch

from mmload.config import VideoConfig
from mmload.decode.dali import as_batch_error
from mmload.decode.gpu import torch_owned
from mmload.decode.image import torch_dtype
from mmload.errors import MissingDependencyError
from mmload.plan import hash_uniform

__all__ = ["VideoDecoder", "count_frames", "frame_indices"]

_STREAM = (1 << 48) + 2000


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise MissingDependencyError("av", "video", "video decode") from None
    return av


def count_frames(data: bytes, max_frames: int) -> int:
    """Frames in the clip's first video stream, from the container header when it says."""
    av = _av()
    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            n = int(s.frames or 0)
            if n <= 0 and s.duration and s.average_rate:
                n = int(float(s.duration * s.time_base) * float(s.average_rate))
            if n <= 0:
                n = sum(1 for _ in c.decode(video=0))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video container: {e}") from None
    if n <= 0:
        raise ValueError("video has no frames")
    if n > max_frames:
        raise ValueError(f"video of {n} frames exceeds max_frames={max_frames}")
    return n


def frame_indices(
    n_frames: int, cfg: VideoConfig, *, seed: int, epoch: int, sample_id: int
) -> np.ndarray:
    """``int64 [F]`` frame numbers; clips shorter than the span repeat their last frame."""
    span = (cfg.frames - 1) * cfg.stride + 1
    if n_frames >= span:
        room = n_frames - span
        if cfg.sampling == "random":
            u = float(hash_uniform(seed, epoch, _STREAM, np.array([sample_id]))[0])
            start = math.floor(u * (room + 1))
        else:
            start = room // 2
    else:
        start = 0
    return np.minimum(start + np.arange(cfg.frames, dtype=np.int64) * cfg.stride, n_frames - 1)


def _decode_cpu(data: bytes, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [F, H, W, 3]``: decode in order up to the last wanted frame, resize with swscale."""
    av = _av()
    want = {int(i) for i in indices}
    last = int(indices.max())
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for n, frame in enumerate(c.decode(stream)):
                if n in want:
                    frames[n] = frame.to_ndarray(width=size[1], height=size[0], format="rgb24")
                if n >= last:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video: {e}") from None
    if not frames:
        raise ValueError("video decoded to no frames")
    got = max(frames)
    return np.stack(
        [frames[min(int(i), got)] if int(i) in frames else frames[got] for i in indices]
    )


class VideoDecoder:
    """Decodes one video field of a batch into ``[B, F, 3, H, W]`` on the batch device."""

    def __init__(
        self, cfg: VideoConfig, max_batch: int, *, seed: int, device: torch.device, threads: int
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.device = device
        self.max_batch = max_batch
        self.threads = threads
        self._pipe: Any = None
        self._holds: deque[tuple[torch.Tensor, Any]] = deque()  # DALI views until copied

    def _indices(self, data: list[bytes], ids: np.ndarray, epoch: int) -> list[np.ndarray]:
        return [
            frame_indices(
                count_frames(d, self.cfg.max_frames),
                self.cfg,
                seed=self.seed,
                epoch=epoch,
                sample_id=int(ids[i]),
            )
            for i, d in enumerate(data)
        ]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, F, H, W, 3]`` -> ``[B, F, 3, H, W]`` in the configured dtype."""
        x = x.permute(0, 1, 4, 2, 3)
        if not self.cfg.normalize:
            return x.contiguous()
        dev = x.device
        mean = torch.tensor(self.cfg.mean, dtype=torch.float32, device=dev).view(1, 1, 3, 1, 1)
        inv = 1.0 / torch.tensor(self.cfg.std, dtype=torch.float32, device=dev).view(1, 1, 3, 1, 1)
        return (x.to(torch.float32) - mean).mul_(inv).to(torch_dtype(self.cfg.dtype)).contiguous()

    def decode(
        self, data: list[bytes], ids: np.ndarray, epoch: int, meta: list[Any] | None = None
    ) -> torch.Tensor:
        indices = self._indices(data, ids, epoch)
        if self.device.type == "cuda":
            return self._finish(self._decode_gpu(data, indices))
        frames = np.stack(
            [_decode_cpu(d, idx, self.cfg.size) for d, idx in zip(data, indices, strict=True)]
        )
        return self._finish(torch.from_numpy(frames))

    def _decode_gpu(self, data: list[bytes], indices: list[np.ndarray]) -> torch.Tensor:
        """NVDEC decode of the chosen frames, resized on the GPU: ``uint8 [B, F, H, W, 3]``."""
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        try:
            p.feed_input("enc", [np.frombuffer(d, np.uint8) for d in data])
            p.feed_input("idx", [i.astype(np.int32) for i in indices])
            (out,) = p.run()
        except RuntimeError as e:
            self._pipe = None  # rebuilt for the next batch: a failed NVDEC run leaves no state
            err = as_batch_error(e)
            if err is e:  # out of memory, a CUDA or driver error: not the clip's fault
                raise
            raise err from e  # a bad clip: the batch decoder isolates and counts it
        return torch_owned(torch.from_dlpack(out.as_tensor()), self._holds)

    def _build(self) -> Any:
        from mmload.decode.dali import _import_dali

        dali = _import_dali()
        fn, types = dali.fn, dali.types
        h, w = self.cfg.size

        @dali.pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=self.device.index or 0,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipe() -> Any:
            enc = fn.external_source(name="enc", batch=True, dtype=types.UINT8, ndim=1)
            idx = fn.external_source(name="idx", batch=True, dtype=types.INT32, ndim=1)
            frames = fn.decoders.video(enc, device="mixed", frames=idx)
            return fn.resize(
                frames,
                resize_x=w,
                resize_y=h,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
                dtype=types.UINT8,
            )

        p = pipe()
        p.build()
        return p

    def close(self) -> None:
        self._pipe = None
