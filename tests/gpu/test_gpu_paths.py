"""GPU paths of the loader: DALI ``mixed`` decode, the torchvision fallback, audio/video/text on
the GPU, bad data on the GPU path, and CPU/GPU agreement. Marked ``gpu``: they skip themselves
without a GPU and run through ``benchmarks/gpu_check.sh`` on a GPU host."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from mmload import AudioConfig, ImageConfig, Loader, TextConfig, VideoConfig

pytestmark = pytest.mark.gpu

# DALI CPU (libjpeg-turbo) and DALI GPU (nvJPEG) differ by IDCT/upsampling rounding only:
# documented tolerance for normalised float32 outputs of the same crop windows.
CPU_GPU_MEAN_ABS = 0.03
CPU_GPU_MAX_ABS = 0.6


def _batches(
    paths: list[str], tmp_path: Path, device: str, **kw: object
) -> list[dict[str, object]]:
    with Loader(
        paths, batch_size=8, device=device, shuffle=True, seed=3, cache_dir=tmp_path / "c", **kw
    ) as L:  # type: ignore[arg-type]
        return list(L)


def test_cpu_gpu_agreement(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([9, 7])
    cfg = ImageConfig(size=48, dtype="float32", backend="dali")
    cpu = _batches(paths, tmp_path, "cpu", image=cfg)
    gpu = _batches(paths, tmp_path, "cuda", image=cfg)
    assert [b["__key__"] for b in cpu] == [b["__key__"] for b in gpu], "same keys, same order"
    assert list(cpu[0]) == list(gpu[0]), "same batch keys in the same order"
    for c, g in zip(cpu, gpu, strict=True):
        gi, ci = g["jpg"], c["jpg"]
        assert isinstance(gi, torch.Tensor) and isinstance(ci, torch.Tensor)
        assert gi.device.type == "cuda" and g["cls"].device.type == "cuda"  # type: ignore[union-attr]
        assert torch.equal(c["cls"], g["cls"].cpu())  # type: ignore[union-attr]
        diff = (gi.cpu() - ci).abs()
        per_image = diff.mean(dim=(1, 2, 3))  # per image: no wrong image hides in the mean
        assert per_image.max() < CPU_GPU_MEAN_ABS, per_image
        assert diff.max() < CPU_GPU_MAX_ABS, diff.max()
        # the bound has power: a GPU path that flipped other images than the CPU would fail
        mirror = (gi.cpu() - ci.flip(-1)).abs().mean(dim=(1, 2, 3))
        assert (mirror > CPU_GPU_MEAN_ABS).any(), mirror


def test_torchvision_fallback_matches_dali_gpu(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torchvision  # noqa: F401  (on the GPU host; a missing one is a failure, not a skip)

    paths, _ = make_shards([8])
    # Upscaling crops (small images -> 96 px): no antialiasing difference between the paths.
    dali = _batches(
        paths, tmp_path, "cuda", image=ImageConfig(size=96, dtype="float32", backend="dali")
    )
    tv = _batches(
        paths, tmp_path, "cuda", image=ImageConfig(size=96, dtype="float32", backend="torchvision")
    )
    for a, b in zip(dali, tv, strict=True):
        assert a["__key__"] == b["__key__"]
        x, y = a["jpg"], b["jpg"]
        assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        # per image, not over the batch: one wrong image cannot hide behind seven right ones
        per_image = (x - y).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < 0.1, per_image
        # the bound has power: some images differ from their mirror by more than it, so a
        # path that does not flip (or flips other images) fails
        mirror = (x - y.flip(-1)).abs().mean(dim=(1, 2, 3))
        assert (mirror > 0.1).any(), mirror


def test_bad_jpeg_on_gpu_is_replaced_and_counted(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import tarfile

    paths, keys = make_shards([8])
    with tarfile.open(paths[0]) as t:
        m = [m for m in t.getmembers() if m.name.endswith(".jpg")][3]
    data = bytearray(Path(paths[0]).read_bytes())
    dht = data.find(b"\xff\xc4", m.offset_data)
    data[dht + 5 : dht + 21] = b"\xff" * 16  # passes the header check, fails in nvJPEG
    Path(paths[0]).write_bytes(bytes(data))
    with Loader(
        paths,
        batch_size=8,
        device="cuda",
        image=ImageConfig(size=32),
        on_error="skip",
        max_bad_samples=1,
        cache_dir=tmp_path / "c",
    ) as L:
        b = next(iter(L))
        stats = L.stats()
    assert b["jpg"].shape == (8, 3, 32, 32) and b["jpg"].device.type == "cuda"
    assert keys[3] not in b["__key__"]
    assert stats["bad_samples"] == 1 and stats["bad"][0]["key"] == keys[3]


def test_audio_mel_gpu_matches_cpu(tmp_path: Path) -> None:
    import webdataset as wds

    from mmload.demo import make_wav

    p = str(tmp_path / "a.tar")
    with wds.TarWriter(p) as w:
        for i in range(4):
            w.write({"__key__": f"a{i}", "wav": make_wav(200.0 + 100 * i, seconds=0.7)})
    cfg = AudioConfig(seconds=0.5, mel=True, n_mels=40)
    out = {}
    for dev in ("cpu", "cuda"):
        with Loader([p], batch_size=4, device=dev, audio=cfg, cache_dir=tmp_path / "c") as L:
            out[dev] = next(iter(L))["wav"]
    assert out["cuda"].device.type == "cuda"
    assert torch.allclose(out["cuda"].cpu(), out["cpu"], atol=1e-3, rtol=1e-3)


def test_video_nvdec_matches_pyav(tmp_path: Path) -> None:
    import av
    import webdataset as wds

    def mp4(frames: int) -> bytes:
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as c:
            s = c.add_stream("h264", rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            for i in range(frames):
                img = np.full((48, 64, 3), (i * 20) % 256, np.uint8)
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
        return buf.getvalue()

    p = str(tmp_path / "v.tar")
    with wds.TarWriter(p) as w:
        for i in range(3):
            w.write({"__key__": f"v{i}", "mp4": mp4(12)})
    cfg = VideoConfig(frames=4, stride=2, size=(32, 32), sampling="center")
    out = {}
    for dev in ("cpu", "cuda"):
        with Loader([p], batch_size=3, device=dev, video=cfg, cache_dir=tmp_path / "c") as L:
            out[dev] = next(iter(L))["mp4"]
    assert out["cuda"].shape == out["cpu"].shape == (3, 4, 3, 32, 32)
    assert (out["cuda"].cpu().float() - out["cpu"].float()).abs().mean() < 4.0


def test_text_packing_gpu_matches_cpu() -> None:
    from mmload.decode.text import pack

    seqs = [list(range(1, n + 1)) for n in (5, 3, 9, 1, 4)]
    cpu = pack(seqs, 8)
    gpu = pack(seqs, 8, device=torch.device("cuda"))
    for k in cpu:
        assert torch.equal(cpu[k], gpu[k].cpu()), k


def test_text_field_on_gpu(tmp_path: Path) -> None:
    import webdataset as wds

    p = str(tmp_path / "t.tar")
    with wds.TarWriter(p) as w:
        w.write({"__key__": "t", "txt": "hello"})
    with Loader(
        [p], batch_size=1, device="cuda", text=TextConfig(max_length=6), cache_dir=tmp_path / "c"
    ) as L:
        b = next(iter(L))
    assert b["txt"].device.type == "cuda" and b["txt"].tolist() == [[105, 102, 109, 109, 112, 0]]


def test_workers_read_and_the_gpu_decodes(make_shards, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """device='cuda' with worker processes: the workers only read (bytes), this process decodes
    with DALI ``mixed``, joins and copies; the batches equal workers=0's on the same GPU."""
    paths, _ = make_shards([9, 7, 8])
    cfg = ImageConfig(size=48, dtype="float16", backend="dali")
    want = _batches(paths, tmp_path, "cuda", image=cfg)
    with Loader(
        paths,
        batch_size=8,
        device="cuda",
        shuffle=True,
        seed=3,
        cache_dir=tmp_path / "c",
        image=cfg,
        workers=2,
    ) as L:
        got = list(L)
        assert L._pool is not None and not L._pool.decoded
    assert [b["__key__"] for b in got] == [b["__key__"] for b in want]
    for g, w in zip(got, want, strict=True):
        assert g["jpg"].device.type == "cuda"
        assert torch.equal(g["jpg"], w["jpg"])
        assert torch.equal(g["cls"].cpu(), w["cls"].cpu())
