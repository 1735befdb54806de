"""Audio crops and log-mel spectrograms against oracles written here from their definitions
(issue 15): a crop is an exact, contiguous window of the decoded signal at the documented
offset; the log-mel is NumPy's FFT of reflect-padded, Hann-windowed frames through HTK mel
triangles, as the torchaudio/librosa definition (``center=True``, power 2, HTK, no norm)."""

from __future__ import annotations

import io
import math
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

import mmload
from mmload.plan import hash_uniform

RATE = 16000
_STREAM = (1 << 48) + 1000  # the audio crop stream documented in mmload/decode/audio.py


def _wav(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def _shard(path: Path, clips: list[np.ndarray]) -> None:
    with tarfile.open(path, "w") as tf:
        for i, pcm in enumerate(clips):
            for ext, data in (("wav", _wav(pcm)), ("cls", b"0")):
                info = tarfile.TarInfo(f"a{i:02d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("crop", ["random", "center", "start"])
def test_audio_crop_is_the_documented_window(tmp_path: Path, crop: str) -> None:
    lengths = [RATE // 2 + 137 * i for i in range(8)] + [RATE // 4]  # longer and shorter
    clips = [np.arange(n) % 30000 for n in lengths]  # a ramp: each value gives its index
    _shard(tmp_path / "a.tar", clips)
    cfg = mmload.AudioConfig(sample_rate=RATE, seconds=0.25, crop=crop)  # type: ignore[arg-type]
    t = RATE // 4
    for epoch in (0, 1):
        with mmload.Loader(
            str(tmp_path / "a.tar"), batch_size=len(clips), audio=cfg, seed=9, epoch=epoch,
            cache_dir=tmp_path / "c",
        ) as ld:  # fmt: skip
            b = next(iter(ld))
        wav = np.round(b["wav"].numpy() * 32768).astype(np.int64)
        u = hash_uniform(9, epoch, _STREAM, np.arange(len(clips)))
        for i, n in enumerate(lengths):
            if n > t:
                start = {
                    "random": math.floor(u[i] * (n - t + 1)),
                    "center": (n - t) // 2,
                    "start": 0,
                }[crop]
            else:
                start = 0
            want = np.zeros(t, np.int64)
            seg = clips[i][start : start + t]
            want[: len(seg)] = seg  # shorter clips are zero-padded at the end
            assert np.array_equal(wav[i], want), (crop, epoch, i)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _reference_logmel(x: np.ndarray, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    pad = n_fft // 2
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    frames = 1 + len(x) // hop
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = np.stack([np.fft.rfft(xp[f * hop : f * hop + n_fft] * win) for f in range(frames)])
    power = np.abs(spec) ** 2  # [frames, bins]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / RATE)
    pts = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(RATE / 2)), n_mels + 2)
    )
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[m] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return np.log(fb @ power.T + 1e-6)  # [n_mels, frames]


def test_log_mel_matches_a_numpy_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    t = np.arange(RATE // 2) / RATE
    clips = [
        (8000 * np.sin(2 * np.pi * (220 + 300 * i) * t) + rng.normal(0, 300, len(t))).astype(
            np.int64
        )
        for i in range(4)
    ]
    _shard(tmp_path / "m.tar", clips)
    cfg = mmload.AudioConfig(
        sample_rate=RATE, seconds=0.5, crop="start", mel=True, n_fft=400, hop_length=160, n_mels=40
    )
    with mmload.Loader(
        str(tmp_path / "m.tar"), batch_size=4, audio=cfg, cache_dir=tmp_path / "c"
    ) as ld:
        mel = next(iter(ld))["wav"].numpy()
    assert mel.shape == (4, 40, 1 + (RATE // 2) // 160)
    for i, pcm in enumerate(clips):
        want = _reference_logmel(pcm / 32768.0, 400, 160, 40)
        # float32 STFT vs float64 here: measured max |diff| 1.4e-5 .. 3.1e-5 over all bins.
        assert np.abs(mel[i] - want).max() < 2e-4
