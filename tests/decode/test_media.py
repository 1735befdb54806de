"""Audio, video and text fields through the Loader (CPU paths), and their bad-input handling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mmload import AudioConfig, DecodeError, Loader, TextConfig, VideoConfig
from mmload.decode.audio import decode_audio, resample
from mmload.decode.text import pack
from mmload.decode.video import frame_indices
from mmload.demo import make_wav


def _write(path: Path, samples: list[dict[str, bytes | str]]) -> str:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _flac(seconds: float, rate: int, freq: float) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def _mp4(frames: int, w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("h264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full(
                (h, w, 3), (i * 20) % 256, np.uint8
            )  # brightness encodes the frame number
            img[: h // 4, : w // 4] = rng.integers(0, 255, 3)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_resample_keeps_the_tone() -> None:
    rate, target, f = 44100, 16000, 440.0
    x = np.sin(2 * np.pi * f * np.arange(rate) / rate).astype(np.float32)
    y = resample(x, rate, target)
    assert len(y) == target
    peak = np.argmax(np.abs(np.fft.rfft(y))) * target / len(y)
    assert abs(peak - f) < 2


def test_wav_and_flac_decode() -> None:
    x, rate = decode_audio(make_wav(300.0, seconds=0.25, rate=8000), max_seconds=10)
    assert rate == 8000 and len(x) == 2000 and x.min() >= -1 and x.max() <= 1
    y, r2 = decode_audio(_flac(0.5, 22050, 500.0), max_seconds=10)
    assert r2 == 22050 and len(y) == 11025
    with pytest.raises(ValueError, match="exceeds max_seconds"):
        decode_audio(_flac(0.5, 22050, 500.0), max_seconds=0.1)


def test_audio_field_waveforms_and_mel(tmp_path: Path) -> None:
    samples = [
        {
            "__key__": f"a{i}",
            "wav": make_wav(200.0 + 50 * i, seconds=0.3 + 0.2 * i, rate=8000),
            "flac": _flac(1.0, 22050, 300.0),
        }
        for i in range(4)
    ]
    p = _write(tmp_path / "a.tar", samples)
    cfg = AudioConfig(sample_rate=16000, seconds=0.5)
    with Loader([p], batch_size=4, audio=cfg, cache_dir=tmp_path / "c") as L:
        b = next(iter(L))
    assert b["wav"].shape == (4, 8000) and b["wav"].dtype == torch.float32
    assert b["flac"].shape == (4, 8000)
    assert torch.all(b["wav"][0, 4800:] == 0), "0.3 s clip zero-padded to 0.5 s"
    mel_cfg = AudioConfig(sample_rate=16000, seconds=0.5, mel=True, n_mels=40)
    with Loader([p], batch_size=4, audio=mel_cfg, fields=["wav"], cache_dir=tmp_path / "c") as L:
        m = next(iter(L))["wav"]
    assert m.shape == (4, 40, 1 + 8000 // 160) and torch.isfinite(m).all()


def test_audio_random_crop_is_deterministic(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "a.tar",
        [{"__key__": f"a{i}", "wav": make_wav(300.0, seconds=2.0)} for i in range(3)],
    )
    cfg = AudioConfig(seconds=0.25)
    runs = []
    for _ in range(2):
        with Loader([p], batch_size=3, audio=cfg, seed=5, cache_dir=tmp_path / "c") as L:
            runs.append(next(iter(L))["wav"])
    assert torch.equal(runs[0], runs[1])


def test_corrupt_audio_names_key(tmp_path: Path) -> None:
    samples = [{"__key__": f"a{i}", "wav": make_wav(300.0)} for i in range(4)]
    samples[2]["wav"] = b"RIFF....not really a wav"
    p = _write(tmp_path / "a.tar", samples)
    with (
        Loader([p], batch_size=4, audio=AudioConfig(), cache_dir=tmp_path / "c") as L,
        pytest.raises(DecodeError) as e,
    ):
        next(iter(L))
    assert e.value.key == "a2" and "audio" in str(e.value)
    with Loader(
        [p],
        batch_size=4,
        audio=AudioConfig(),
        on_error="skip",
        max_bad_samples=1,
        cache_dir=tmp_path / "c",
    ) as L:
        b = next(iter(L))
        assert b["__key__"] == ["a0", "a1", "a3", "a3"]
        assert L.stats()["bad"][0]["key"] == "a2"


def test_audio_passes_through_without_config(tmp_path: Path) -> None:
    wav = make_wav(300.0)
    p = _write(tmp_path / "a.tar", [{"__key__": "a0", "wav": wav}])
    with Loader([p], batch_size=1, cache_dir=tmp_path / "c") as L:
        assert next(iter(L))["wav"] == [wav]


def test_frame_indices() -> None:
    cfg = VideoConfig(frames=4, stride=3)
    a = frame_indices(100, cfg, seed=1, epoch=0, sample_id=7)
    assert np.array_equal(np.diff(a), [3, 3, 3]) and a[0] >= 0 and a[-1] < 100
    assert np.array_equal(a, frame_indices(100, cfg, seed=1, epoch=0, sample_id=7))
    short = frame_indices(5, cfg, seed=1, epoch=0, sample_id=7)
    assert short.tolist() == [0, 3, 4, 4]
    center = frame_indices(
        11, VideoConfig(frames=4, stride=3, sampling="center"), seed=0, epoch=0, sample_id=0
    )
    assert center.tolist() == [0, 3, 6, 9]


def test_video_field_cpu(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"v{i}", "mp4": _mp4(12 + 4 * i, seed=i), "cls": str(i)} for i in range(3)
    ]
    p = _write(tmp_path / "v.tar", samples)
    cfg = VideoConfig(frames=4, stride=2, size=(32, 40), sampling="center")
    with Loader([p], batch_size=3, video=cfg, cache_dir=tmp_path / "c") as L:
        b = next(iter(L))
    v = b["mp4"]
    assert v.shape == (3, 4, 3, 32, 40) and v.dtype == torch.uint8
    # Brightness encodes the frame number (i * 20): center sampling of 12 frames, stride 2 -> 2,4,6,8.
    got = v[0, :, :, 20:, 20:].float().mean(dim=(1, 2, 3))
    assert torch.allclose(got, torch.tensor([40.0, 80.0, 120.0, 160.0]), atol=6)
    norm = VideoConfig(frames=2, size=16, normalize=True, dtype="float16")
    with Loader([p], batch_size=3, video=norm, fields=["mp4"], cache_dir=tmp_path / "c") as L:
        assert next(iter(L))["mp4"].dtype == torch.float16


def test_corrupt_video_names_key(tmp_path: Path) -> None:
    samples = [{"__key__": f"v{i}", "mp4": _mp4(6, seed=i)} for i in range(3)]
    samples[1]["mp4"] = samples[1]["mp4"][:300]  # type: ignore[index]
    p = _write(tmp_path / "v.tar", samples)
    with (
        Loader(
            [p], batch_size=3, video=VideoConfig(frames=2, size=16), cache_dir=tmp_path / "c"
        ) as L,
        pytest.raises(DecodeError) as e,
    ):
        next(iter(L))
    assert e.value.key == "v1" and "video" in str(e.value)


def test_text_tokenization(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "t.tar", [{"__key__": f"t{i}", "txt": "héllo" * (i + 1)} for i in range(3)]
    )
    with Loader([p], batch_size=3, text=TextConfig(max_length=8), cache_dir=tmp_path / "c") as L:
        b = next(iter(L))
    assert list(b) == ["__key__", "txt", "txt_attention_mask"]
    assert b["txt"].shape == (3, 8) and b["txt"].dtype == torch.int64
    assert b["txt"][0, :6].tolist() == [b + 1 for b in "héllo".encode()]
    assert b["txt_attention_mask"][0].tolist() == [1] * 6 + [0, 0]
    assert b["txt_attention_mask"][2].tolist() == [1] * 8
    words = {"a": 5, "b": 6}
    tok = TextConfig(max_length=4, tokenizer=lambda s: [words[w] for w in s.split()])
    p2 = _write(tmp_path / "w.tar", [{"__key__": "w", "txt": "a b a"}])
    with Loader([p2], batch_size=1, text=tok, cache_dir=tmp_path / "c") as L:
        assert next(iter(L))["txt"].tolist() == [[5, 6, 5, 0]]


def test_hf_tokenizer_missing_is_a_clear_error() -> None:
    """Run where ``tokenizers`` cannot be imported (blocked in a child process)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['tokenizers'] = None\n"
        "from mmload.decode.text import Tokenizer\n"
        "from mmload.errors import MissingDependencyError\n"
        "try:\n"
        "    Tokenizer('/nonexistent/tokenizer.json')('hi')\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'pip install "mmload[text]"' in r.stdout


def test_real_hf_tokenizer_in_a_loader_and_its_workers(tmp_path: Path) -> None:
    """A WordPiece tokenizer trained with Hugging Face ``tokenizers`` and saved as JSON: the
    Loader's ids (in process and in 2 worker processes, which rebuild it) are exactly what
    ``tokenizers`` itself encodes, truncated and padded to ``max_length``."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is a dev dependency")
    from tokenizers import models, pre_tokenizers, trainers

    corpus = [
        f"a photo of a {w} on the {p}" for w in ("cat", "dog", "bird") for p in ("grass", "sofa")
    ]
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"])
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    texts = [*corpus, "an unseen zebra photo of a cat"]
    shard = _write(
        tmp_path / "t.tar", [{"__key__": f"t{i:02d}", "txt": t} for i, t in enumerate(texts)]
    )
    cfg = TextConfig(max_length=6, tokenizer=str(path), pad_id=0)
    ref = tokenizers.Tokenizer.from_file(str(path))
    for workers in (0, 2):
        got = {}
        with Loader(
            [shard], batch_size=4, text=cfg, workers=workers, cache_dir=tmp_path / f"c{workers}"
        ) as L:
            for b in L:
                for j, key in enumerate(b["__key__"]):
                    got[key] = (b["txt"][j].tolist(), b["txt_attention_mask"][j].tolist())
        for i, t in enumerate(texts):
            ids = ref.encode(t).ids[:6]
            assert got[f"t{i:02d}"] == (
                ids + [0] * (6 - len(ids)),
                [1] * len(ids) + [0] * (6 - len(ids)),
            )
    assert any(ref.token_to_id("[UNK]") in v[0] for v in got.values())  # the unseen word


def test_pack_on_cpu() -> None:
    out = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]], seq_len=5)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]]
    assert out["attention_mask"].tolist() == [[1] * 5, [1] * 5]


def test_text_config_decodes_any_bytes_field_as_utf8(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.tar", [{"__key__": "c0", "caption": "hi"}])
    with Loader(
        [p],
        batch_size=1,
        text=TextConfig(fields=("caption",), max_length=3),
        cache_dir=tmp_path / "c",
    ) as L:
        assert next(iter(L))["caption"].tolist() == [[105, 106, 0]]  # not the repr "b'hi'"
    p2 = _write(tmp_path / "j.tar", [{"__key__": "j0", "json": b'{"t": 1}'}])
    from mmload import ConfigError

    with pytest.raises(ConfigError, match="json field"):
        Loader([p2], batch_size=1, text=TextConfig(fields=("json",)), cache_dir=tmp_path / "c")
