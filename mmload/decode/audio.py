"""Audio fields: WAV/FLAC/OGG decode, resample, fixed-length crop/pad, optional log-mel.

Output per audio field: waveforms ``float32 [B, T]`` (``T = round(seconds * sample_rate)``) or,
with ``AudioConfig.mel``, log-mel spectrograms ``float32 [B, n_mels, 1 + T // hop_length]``; on
the batch device. Decode and resampling run on the CPU (soundfile when installed —
``pip install "mmload[audio]"`` — else the standard library's ``wave`` for PCM WAV); the mel
spectrogram runs on the batch device (:mod:`mmload.decode.spectrogram`: ``torch.stft``, then the
``logmel.mel`` kernel on CUDA or a filterbank matmul on the CPU). Crop offsets are a pure function
of (seed, epoch, sample id).
"""

from __future__ import annotations

import io
import math
import struct
import wave
from typing import Any

import numpy as np
import torch

from mmload.config import AudioConfig
from mmload.plan import hash_uniform

__all__ = ["AudioDecoder", "decode_audio", "resample"]

_STREAM = (1 << 48) + 1000  # crop offsets; apart from augment's streams


def _wave_decode(data: bytes) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, rate, n = (
                w.getsampwidth(),
                w.getnchannels(),
                w.getframerate(),
                w.getnframes(),
            )
            raw = w.readframes(n)
    except (wave.Error, EOFError, struct.error) as e:
        raise ValueError(f"cannot decode WAV: {e}") from None
    if channels < 1 or rate < 1:
        raise ValueError(f"WAV header says {channels} channels at {rate} Hz")
    if len(raw) < n * width * channels:
        raise ValueError(f"WAV is truncated: {len(raw)} of {n * width * channels} data bytes")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported WAV sample width {width} bytes")
    return x.reshape(-1, channels), rate


def _check_riff(data: bytes) -> None:
    """A RIFF/WAVE file whose ``data`` chunk claims more bytes than are present is truncated.

    libsndfile would shorten such a file to what is there, and the crop/pad step would then
    zero-pad it: a corrupt sample read as silence. (``0xFFFFFFFF`` is a streaming writer's
    "unknown length" and is accepted.)
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if cid == b"data":
            have = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > have:
                raise ValueError(f"WAV is truncated: data chunk of {size} bytes, {have} present")
            return
        pos += 8 + size + (size & 1)
    raise ValueError("WAV has no data chunk (truncated header?)")


def decode_audio(data: bytes, *, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono ``float32 [T]`` (integer PCM scaled to [-1, 1], float data as stored, always finite)
    and its sample rate; raises ValueError on bad bytes (truncated files included: never
    silently shortened, then zero-padded)."""
    _check_riff(data)
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                if f.frames > max_seconds * f.samplerate:
                    raise ValueError(
                        f"audio of {f.frames / f.samplerate:.1f}s exceeds max_seconds={max_seconds}"
                    )
                x = f.read(dtype="float32", always_2d=True)
                rate = f.samplerate
                if len(x) < f.frames:
                    raise ValueError(f"audio is truncated: {len(x)} of {f.frames} frames")
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"cannot decode audio: {e}") from None
    else:
        x, rate = _wave_decode(data)
        if len(x) > max_seconds * rate:
            raise ValueError(f"audio of {len(x) / rate:.1f}s exceeds max_seconds={max_seconds}")
    if len(x) == 0:
        raise ValueError("audio has no samples")
    if not np.isfinite(x).all():  # float WAV/FLAC data can hold NaN/inf bit patterns
        raise ValueError("audio has non-finite samples (NaN or inf)")
    return np.ascontiguousarray(x.mean(axis=1, dtype=np.float32)), int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact for signals below both Nyquist rates)."""
    if rate == target:
        return x
    n_out = max(1, round(len(x) * target / rate))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out[:keep] = spec[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(x))).astype(np.float32)


class AudioDecoder:
    """Decodes one audio field of a batch into ``[B, T]`` waveforms or ``[B, M, F]`` log-mels."""

    def __init__(self, cfg: AudioConfig, *, seed: int, device: torch.device) -> None:
        self.cfg = cfg
        self.seed = seed
        self.device = device
        self._mel: Any = None

    @property
    def length(self) -> int:
        return round(self.cfg.seconds * self.cfg.sample_rate)

    def _crop(self, x: np.ndarray, u: float) -> np.ndarray:
        """``x`` cut to the clip length (``u``: this sample's uniform draw for a random crop)
        or zero-padded at the end."""
        t = self.length
        if len(x) > t:
            if self.cfg.crop == "random":
                start = math.floor(u * (len(x) - t + 1))
            elif self.cfg.crop == "center":
                start = (len(x) - t) // 2
            else:
                start = 0
            return x[start : start + t]
        return np.pad(x, (0, t - len(x)))

    def waveforms(self, data: list[bytes], ids: np.ndarray, epoch: int) -> np.ndarray:
        out = np.empty((len(data), self.length), dtype=np.float32)
        # One draw per sample, a pure function of (seed, epoch, sample id), for the whole batch.
        draws = hash_uniform(self.seed, epoch, _STREAM, np.asarray(ids, dtype=np.int64))
        for i, d in enumerate(data):
            x, rate = decode_audio(d, max_seconds=self.cfg.max_seconds)
            out[i] = self._crop(resample(x, rate, self.cfg.sample_rate), float(draws[i]))
        return out

    def decode(
        self, data: list[bytes], ids: np.ndarray, epoch: int, meta: list[Any] | None = None
    ) -> torch.Tensor:
        """``float32 [B, T]`` or ``[B, n_mels, frames]`` on the batch device."""
        wav = self.waveforms(data, ids, epoch)
        if not self.cfg.mel:
            return torch.from_numpy(wav).to(self.device)
        if self._mel is None:
            from mmload.decode.spectrogram import MelSpectrogram
            from mmload.kernels.logmel import LogMelSpec

            spec = LogMelSpec(
                sample_rate=self.cfg.sample_rate,
                n_fft=self.cfg.n_fft,
                hop_length=self.cfg.hop_length,
                n_mels=self.cfg.n_mels,
            )
            self._mel = MelSpectrogram(spec, self.device)
        x = torch.from_numpy(wav)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self._mel(x)

    def close(self) -> None:
        self._mel = None
