"""Issue 9's decode-side fixes, checked without a GPU: device selection for Numba launches (with
fakes), DALI failures told apart from device failures, NVDEC errors as bad clips, and one EXIF
behaviour for every image backend (a real rotated JPEG through DALI's CPU decoder and PIL)."""

from __future__ import annotations

import io
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmload.augment import draw_crops
from mmload.config import ImageConfig, VideoConfig
from mmload.decode import gpu
from mmload.decode.dali import DaliBatchError, DaliImageDecoder, as_batch_error
from mmload.decode.image import PilImageDecoder
from mmload.decode.video import VideoDecoder

ROOT = Path(__file__).resolve().parents[2]


def test_numba_on_selects_the_device_and_makes_the_stream_inside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numba.cuda

    selected: list[str] = []
    made: list[tuple[int, list[str]]] = []

    @contextmanager
    def torch_device(i: int) -> Any:
        selected.append(f"torch:{i}")
        yield
        selected.pop()

    class Gpus:
        def __getitem__(self, i: int) -> Any:
            @contextmanager
            def ctx() -> Any:
                selected.append(f"numba:{i}")
                yield
                selected.pop()

            return ctx()

    class Stream:
        cuda_stream = 0xBEEF

    monkeypatch.setattr(torch.cuda, "device", torch_device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda i: Stream())
    monkeypatch.setattr(numba.cuda, "gpus", Gpus())
    monkeypatch.setattr(numba.cuda, "external_stream", lambda p: made.append((p, list(selected))))
    with gpu.numba_on(torch.device("cuda", 1)):
        assert selected == ["torch:1", "numba:1"], "launches run with cuda:1 selected"
    assert made == [(0xBEEF, ["torch:1", "numba:1"])], "the stream is made in cuda:1's context"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gpu.device_index(torch.device("cuda")) == 3  # LOCAL_RANK's device under torchrun
    with pytest.raises(ValueError, match="not a CUDA device"):
        gpu.device_index(torch.device("cpu"))


def test_every_numba_launch_in_decode_goes_through_numba_on() -> None:
    """Structural: no decode module makes a Numba stream or selects a device by itself."""
    for path in sorted((ROOT / "mmload" / "decode").glob("*.py")):
        if path.name == "gpu.py":
            continue
        text = path.read_text()
        assert not re.search(r"external_stream|cuda\.gpus", text), path.name
    for name in ("text.py", "spectrogram.py", "nvjpeg.py"):
        assert "numba_on(" in (ROOT / "mmload" / "decode" / name).read_text(), name


def test_dali_errors_are_bad_data_unless_the_device_failed() -> None:
    bad = RuntimeError("[/opt/dali/dali/operators/decoder] Error in thread 0: nvdec: bad bitstream")
    assert isinstance(as_batch_error(bad), DaliBatchError)
    for text in (
        "CUDA error: out of memory",
        "Critical error in pipeline: CUDA_ERROR_ILLEGAL_ADDRESS",
        "cudaErrorLaunchFailure",
    ):
        e = RuntimeError(text)
        assert as_batch_error(e) is e, text


class _FailingPipe:
    def __init__(self, message: str) -> None:
        self.message = message

    def feed_input(self, name: str, data: Any) -> None:
        pass

    def run(self) -> Any:
        raise RuntimeError(self.message)


def test_a_bad_clip_on_nvdec_is_a_bad_sample_and_oom_propagates() -> None:
    dec = VideoDecoder(VideoConfig(), 4, seed=0, device=torch.device("cpu"), threads=1)
    dec._pipe = _FailingPipe("Error in thread 2: nvdec: unsupported or corrupt stream")
    with pytest.raises(DaliBatchError, match="corrupt stream"):
        dec._decode_gpu([b"\x00" * 8], [np.zeros(8, np.int32)])
    assert dec._pipe is None, "rebuilt after a failed run"
    dec._pipe = _FailingPipe("CUDA error: out of memory")
    with pytest.raises(RuntimeError, match="out of memory") as e:
        dec._decode_gpu([b"\x00" * 8], [np.zeros(8, np.int32)])
    assert not isinstance(e.value, DaliBatchError), "the device failing is not blamed on data"


def _rotated_jpeg() -> tuple[bytes, bytes]:
    """A 96x64 (WxH) JPEG with a left-to-right colour ramp, with and without EXIF orientation 6
    (display rotated by 90 degrees)."""
    from PIL import Image

    x = np.linspace(0, 255, 96, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (64, 1)), np.tile(x[::-1], (64, 1)), np.full((64, 96), 128)], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    plain, rotated = io.BytesIO(), io.BytesIO()
    img.save(plain, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    return plain.getvalue(), rotated.getvalue()


def test_exif_orientation_is_ignored_by_every_backend() -> None:
    """DALI used to apply EXIF rotation while the header check, PIL and torchvision did not:
    the crop was drawn for one geometry and applied to another."""
    cfg = ImageConfig(size=(32, 48), crop="resize", flip=False, normalize=False, dtype="uint8")
    plain, rotated = _rotated_jpeg()
    crops = draw_crops(
        np.array([64, 64]), np.array([96, 96]), cfg, seed=0, epoch=0, ids=np.arange(2)
    )
    dali = DaliImageDecoder(cfg, 2, device="cpu", threads=1, depth=1)
    pil = PilImageDecoder(cfg, threads=1)
    try:
        d = dali.decode([plain, rotated], [(64, 96), (64, 96)], crops).float()
        p = pil.decode([plain, rotated], [(64, 96), (64, 96)], crops).float()
    finally:
        dali.close()
    assert (d[0] - d[1]).abs().mean() < 2, "DALI decodes the stored pixels, EXIF or not"
    assert (d - p).abs().mean() < 6, "DALI and PIL agree on the rotated JPEG"
    ramp = d[1, 0, 16]  # red rises left to right in the stored image, not top to bottom
    assert float(ramp[-1] - ramp[0]) > 150


def test_cuda_means_the_torchrun_ranks_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmload.device import parse_device
    from mmload.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parse_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert parse_device("cuda") == torch.device("cuda", 2), "rank 2 of a node uses GPU 2"
    assert parse_device("cuda:1") == torch.device("cuda", 1), "an explicit index wins"
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(DeviceError, match="only 4 GPUs"):
        parse_device("cuda")
