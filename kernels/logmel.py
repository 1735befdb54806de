"""Log-mel spectrogram of a batch of waveforms: float32 ``[B, T]`` -> ``[B, n_mels, frames]``.

Semantics (``torch.stft`` conventions): ``center=True`` with reflect padding of ``n_fft // 2``
samples on each side, so ``frames = 1 + T // hop_length``; a periodic Hann window of
``win_length`` samples, zero-padded to ``n_fft`` and centred (like ``torch.hann_window``);
power spectrum ``|X|^2``; an **HTK** mel filterbank of triangular filters without area
normalization (torchaudio's default ``melscale_fbanks(norm=None, mel_scale="htk")``, but with
frequency bins at ``k * sr / n_fft``); then the natural log ``log(mel + eps)``,
``eps = 1e-6`` by default.

Audio shorter than ``n_fft // 2 + 1`` samples, which ``torch.stft`` rejects, is padded by
repeated reflection (``numpy.pad(mode="reflect")``); a single sample is repeated.

Two kernels: ``logmel.power``, one thread per (batch, frequency bin, frame), computes the
windowed DFT bin's power from a twiddle table into a float32 ``[B, n_fft // 2 + 1, frames]``
workspace: a direct DFT, ``O(n_fft)`` per bin, for callers without torch. ``logmel.mel``, one
thread per (batch, mel, frame), applies the filterbank over each filter's non-zero bins and takes
the log; :func:`mel_from_power` runs it alone on a power spectrum computed elsewhere. mmload's
decode path does that: ``torch.stft`` (cuFFT) for the power, then this kernel
(``mmload.decode.spectrogram``), which is the fast way for ``n_fft`` in the hundreds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda, int32, uint32

from ._device import (
    MAX_GRID_YZ,
    Variants,
    check_disjoint,
    current_device_id,
    device_array,
    num_blocks,
    scratch,
)

__all__ = [
    "LogMelSpec",
    "LogMelTables",
    "kernel_signatures",
    "logmel",
    "logmel_reference",
    "logmel_tables",
    "mel_filterbank",
    "mel_from_power",
]

# Kernels reach threadIdx & co. through this alias: numba's stubs mistype them for mypy.
_cu: Any = cuda

_ZERO = np.float32(0.0)
_THREADS = 64  # frames per block


@dataclass(frozen=True)
class LogMelSpec:
    """Parameters of the log-mel transform; invalid values raise ``ValueError``.

    ``win_length=None`` means ``n_fft``; ``f_max=None`` means ``sample_rate / 2``.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    win_length: int | None = None
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an int >= 1")
        if self.n_fft < 2:
            raise ValueError(f"n_fft={self.n_fft!r}: must be >= 2")
        w = self.win_length
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"win_length={w!r}: must be None or an int >= 1")
        if w is not None and w > self.n_fft:
            raise ValueError(f"win_length={w!r}: must be <= n_fft={self.n_fft}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r}: must be a finite number > 0")
        _check_band(self.sample_rate, self.f_min, self.f_max_hz)

    @property
    def window_length(self) -> int:
        """Samples of the Hann window (``win_length`` or ``n_fft``)."""
        return self.n_fft if self.win_length is None else self.win_length

    @property
    def f_max_hz(self) -> float:
        """Upper edge of the filterbank in Hz."""
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)

    @property
    def n_freqs(self) -> int:
        """One-sided spectrum bins: ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    def frames(self, samples: int) -> int:
        """Frames of a ``samples``-long waveform: ``1 + samples // hop_length``."""
        return 1 + samples // self.hop_length

    def output_shape(self, batch: int, samples: int) -> tuple[int, int, int]:
        """``(B, n_mels, frames)`` of the float32 output."""
        return batch, self.n_mels, self.frames(samples)


def _check_band(sample_rate: float, f_min: float, f_max: float) -> None:
    if not (math.isfinite(f_min) and f_min >= 0):
        raise ValueError(f"f_min={f_min!r}: must be >= 0")
    if not (math.isfinite(f_max) and f_min < f_max <= sample_rate / 2):
        raise ValueError(f"f_max={f_max!r}: must be in (f_min={f_min}, sample_rate / 2]")


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float
) -> np.ndarray:
    """HTK-scale triangular mel filters (peak 1, no area normalization).

    Returns float32 ``[n_mels, n_fft // 2 + 1]`` on the host; filter ``m`` rises from mel
    point ``m`` to ``m + 1`` and falls to ``m + 2`` of ``n_mels + 2`` points evenly spaced in
    mel between ``f_min`` and ``f_max``. Narrow filters may fall between bins and be all zero.
    """
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"n_mels={n_mels}, n_fft={n_fft}: need n_mels >= 1 and n_fft >= 2")
    _check_band(sample_rate, f_min, f_max)
    freqs = np.arange(n_fft // 2 + 1, dtype=np.float64) * sample_rate / n_fft
    pts = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    diff = np.diff(pts)
    slopes = pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.ascontiguousarray(np.maximum(0.0, np.minimum(down, up)).T, dtype=np.float32)


def _window(spec: LogMelSpec) -> np.ndarray:
    """Periodic Hann of ``win_length``, zero-padded and centred in ``n_fft``; float32."""
    w = spec.window_length
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(w) / w)
    out = np.zeros(spec.n_fft, np.float64)
    left = (spec.n_fft - w) // 2
    out[left : left + w] = hann
    return out.astype(np.float32)


@dataclass(frozen=True)
class LogMelTables:
    """Device-resident constants of one :class:`LogMelSpec` (build once with
    :func:`logmel_tables`, reuse every batch)."""

    spec: LogMelSpec
    window: Any  # float32 [n_fft]
    cos: Any  # float32 [n_fft]: cos(2 pi j / n_fft)
    sin: Any  # float32 [n_fft]
    filterbank: Any  # float32 [n_mels, n_freqs]
    bands: Any  # int32 [n_mels, 2]: first and one-past-last non-zero bin of each filter
    # (the mel kernel reads filterbank and bands through flat views)


def _host_tables(spec: LogMelSpec) -> dict[str, np.ndarray]:
    fb = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max_hz)
    bands = np.zeros((spec.n_mels, 2), np.int32)
    for m, row in enumerate(fb):
        nz = np.flatnonzero(row)
        if nz.size:
            bands[m] = nz[0], nz[-1] + 1
    angle = 2.0 * np.pi * np.arange(spec.n_fft) / spec.n_fft
    return {
        "window": _window(spec),
        "cos": np.cos(angle).astype(np.float32),
        "sin": np.sin(angle).astype(np.float32),
        "filterbank": fb,
        "bands": bands,
    }


def logmel_tables(
    spec: LogMelSpec,
    *,
    stream: Any = 0,
    to_device: Callable[[np.ndarray], Any] | None = None,
) -> LogMelTables:
    """Build the window, twiddle and filterbank tables of ``spec`` and upload them: with
    ``cuda.to_device`` on ``stream``, or with ``to_device`` (host array -> device array, e.g.
    ``lambda a: torch.from_numpy(a).to(dev)`` so torch's allocator owns them)."""
    host = _host_tables(spec)
    if to_device is None:
        return LogMelTables(spec, **{k: cuda.to_device(v, stream=stream) for k, v in host.items()})
    return LogMelTables(spec, **{k: to_device(v) for k, v in host.items()})


_TABLES: dict[tuple[LogMelSpec, int], LogMelTables] = {}
_TABLES_LOCK = threading.Lock()


def _cached_tables(spec: LogMelSpec) -> LogMelTables:
    """The tables of ``spec`` on Numba's current device, uploaded once per process (synchronous
    copies, so any stream may read them afterwards)."""
    key = (spec, current_device_id())
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
        if hit is None:
            hit = _TABLES[key] = logmel_tables(spec)
        return hit


def _power_kernel(
    x: Any,
    window: Any,
    cos_t: Any,
    sin_t: Any,
    hop: Any,
    win_start: Any,
    win_stop: Any,
    power: Any,
) -> None:
    # 32-bit index math, unsigned indices (no negative-index wraparound). The reflect-padded
    # sample index of the first tap takes one modulo per thread; every further tap moves it by
    # one and bounces it off the ends, so the tap loop has no division.
    f = int32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
    k = int32(_cu.blockIdx.y)
    if f >= int32(power.shape[2]):
        return
    n_fft = int32(window.shape[0])
    last = int32(x.shape[1]) - int32(1)
    period = int32(last + last)
    j0 = int32(0)
    d0 = int32(0)
    if period != 0:
        j0 = int32(int32(f * hop + win_start - (n_fft >> int32(1))) % period)  # never negative
        d0 = int32(1)
        if j0 > last:
            j0 = int32(period - j0)
            d0 = int32(-1)
    tw0 = int32(int32(k * win_start) % n_fft)
    uk = uint32(k)
    uf = uint32(f)
    b = uint32(_cu.blockIdx.z)
    while b < uint32(x.shape[0]):
        re = _ZERO
        im = _ZERO
        j = j0
        d = d0
        tw = tw0
        for n in range(win_start, win_stop):
            v = x[b, uint32(j)] * window[uint32(n)]
            re += v * cos_t[uint32(tw)]
            im -= v * sin_t[uint32(tw)]
            tw = int32(tw + k)
            if tw >= n_fft:
                tw = int32(tw - n_fft)
            j = int32(j + d)
            if j > last:
                j = int32(last - int32(1))
                d = int32(-1)
            elif j < 0:
                j = int32(1)
                d = int32(1)
        power[b, uk, uf] = re * re + im * im
        b = uint32(b + uint32(_cu.gridDim.z))


def _mel_kernel(
    power: Any,
    filterbank: Any,
    bands: Any,
    batch: Any,
    n_freqs: Any,
    frames: Any,
    eps: Any,
    out: Any,
) -> None:
    # Flat arrays and 32-bit unsigned index math (the launcher checks the extents fit):
    # power [B * K * F], filterbank [M * K], bands [2 * M], out [B * M * F]. Consecutive
    # threads take consecutive frames, so every read of a bin row and every store coalesce.
    f = uint32(_cu.blockIdx.x * _cu.blockDim.x + _cu.threadIdx.x)
    m = uint32(_cu.blockIdx.y)
    nf = uint32(frames)
    if f >= nf:
        return
    k0 = uint32(bands[uint32(m << uint32(1))])
    k1 = uint32(bands[uint32((m << uint32(1)) | uint32(1))])
    nk = uint32(n_freqs)
    n_mels = uint32(_cu.gridDim.y)
    fb_row = uint32(m * nk)
    b = uint32(_cu.blockIdx.z)
    while b < uint32(batch):
        acc = _ZERO
        p = uint32(uint32(b * nk + k0) * nf + f)
        for k in range(k0, k1):
            acc += filterbank[uint32(fb_row + uint32(k))] * power[p]
            p = uint32(p + nf)
        out[uint32(uint32(b * n_mels + m) * nf + f)] = math.log(acc + eps)
        b = uint32(b + uint32(_cu.gridDim.z))


_POWER_SIG = (
    "void(float32[:, ::1], float32[::1], float32[::1], float32[::1], int32, int32, int32, "
    "float32[:, :, ::1])"
)
_MEL_SIG = (
    "void(float32[::1], float32[::1], int32[::1], int32, int32, int32, float32, float32[::1])"
)


_VARIANTS = Variants(
    {
        "logmel.power": (_power_kernel, _POWER_SIG),
        "logmel.mel": (_mel_kernel, _MEL_SIG),
    }
)


def kernel_signatures() -> list[tuple[str, Callable[..., None], str]]:
    """``(name, Python kernel, Numba signature)`` of every variant the launcher compiles."""
    return _VARIANTS.signatures()


def _compiled(name: str) -> Any:
    return _VARIANTS.compile(name)


def logmel(
    waveforms: Any,
    out: Any,
    spec: LogMelSpec,
    *,
    tables: LogMelTables | None = None,
    workspace: Any = None,
    stream: Any = 0,
) -> None:
    """Write the log-mel spectrogram of ``waveforms`` into ``out``.

    ``waveforms``: float32 device array ``[B, T]``, ``T >= 1``. ``out``: preallocated float32
    device array ``spec.output_shape(B, T)``. ``tables``: from :func:`logmel_tables` (if
    omitted, built and uploaded once per spec and device, then reused). ``workspace``: optional
    float32 device array ``[B, n_fft // 2 + 1, frames]`` for the power spectrum (if omitted, a
    view of the stream's reused scratch buffer, which grows when too small: no allocation per
    call).
    """
    if not isinstance(spec, LogMelSpec):
        raise ValueError(f"spec: must be a LogMelSpec, got {type(spec).__name__}")
    x = device_array(waveforms, "waveforms", dtype="float32", shape=(None, None))
    batch, samples = (int(n) for n in x.shape)
    if samples < 1:
        raise ValueError("waveforms: need at least 1 sample per waveform")
    dst = device_array(out, "out", dtype="float32", shape=spec.output_shape(batch, samples))
    if batch == 0:
        return
    n_frames = spec.frames(samples)
    work_shape = (batch, spec.n_freqs, n_frames)
    if workspace is None:
        # The stream's reused scratch buffer (grown when too small, never per call).
        (work,) = scratch([(work_shape, np.float32)], stream=stream)
    else:
        work = device_array(workspace, "workspace", dtype="float32", shape=work_shape)
    if tables is None:
        tables = _cached_tables(spec)
    elif tables.spec != spec:
        raise ValueError("tables: were built for a different LogMelSpec")
    check_disjoint(waveforms=x, out=dst, workspace=work)
    threads = min(_THREADS, n_frames)
    z = min(batch, MAX_GRID_YZ)
    win_start = (spec.n_fft - spec.window_length) // 2
    _compiled("logmel.power")[(num_blocks(n_frames, threads), spec.n_freqs, z), threads, stream](
        x,
        tables.window,
        tables.cos,
        tables.sin,
        np.int32(spec.hop_length),
        np.int32(win_start),
        np.int32(win_start + spec.window_length),
        work,
    )
    _launch_mel(work, dst, spec, tables, batch, n_frames, stream)


def _flat(a: Any) -> Any:
    return a.reshape(math.prod(int(n) for n in a.shape))


def _launch_mel(
    power: Any,
    out: Any,
    spec: LogMelSpec,
    tables: LogMelTables,
    batch: int,
    frames: int,
    stream: Any,
) -> None:
    fb = device_array(tables.filterbank, "tables.filterbank", dtype="float32", shape=(None, None))
    bands = device_array(tables.bands, "tables.bands", dtype="int32", shape=(spec.n_mels, 2))
    threads = min(_THREADS, frames)
    z = min(batch, MAX_GRID_YZ)
    _compiled("logmel.mel")[(num_blocks(frames, threads), spec.n_mels, z), threads, stream](
        _flat(power),
        _flat(fb),
        _flat(bands),
        np.int32(batch),
        np.int32(spec.n_freqs),
        np.int32(frames),
        np.float32(spec.eps),
        _flat(out),
    )


def mel_from_power(
    power: Any,
    out: Any,
    spec: LogMelSpec,
    *,
    tables: LogMelTables,
    stream: Any = 0,
) -> None:
    """The mel stage alone: ``out = log(filterbank @ power + eps)`` per batch item.

    ``power``: float32 device array ``[B, n_fft // 2 + 1, frames]`` (``|X|^2`` of a one-sided
    STFT, e.g. from ``torch.stft`` on cuFFT); ``out``: preallocated float32 device array
    ``[B, n_mels, frames]``. One thread per (batch, mel, frame) sums the filter's non-zero bins
    and takes the log, so the mel values never make a round trip through device memory.
    ``tables``: from :func:`logmel_tables` (only ``filterbank`` and ``bands`` are read).
    """
    if not isinstance(spec, LogMelSpec):
        raise ValueError(f"spec: must be a LogMelSpec, got {type(spec).__name__}")
    if tables.spec != spec:
        raise ValueError("tables: were built for a different LogMelSpec")
    work = device_array(power, "power", dtype="float32", shape=(None, spec.n_freqs, None))
    batch, _, frames = (int(n) for n in work.shape)
    dst = device_array(out, "out", dtype="float32", shape=(batch, spec.n_mels, frames))
    if batch == 0 or frames == 0:
        return
    if batch * max(spec.n_freqs, spec.n_mels) * frames >= 2**31:
        raise ValueError(f"power: {batch * spec.n_freqs * frames} elements; at most 2**31 - 1")
    if spec.n_mels > MAX_GRID_YZ:
        raise ValueError(f"spec.n_mels={spec.n_mels}: at most {MAX_GRID_YZ}")
    check_disjoint(power=work, out=dst)
    _launch_mel(work, dst, spec, tables, batch, frames, stream)


def logmel_reference(waveforms: np.ndarray, spec: LogMelSpec) -> np.ndarray:
    """NumPy reference of :func:`logmel` (float64 FFT): host float32 ``[B, n_mels, frames]``."""
    x = np.asarray(waveforms, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"waveforms: must be [B, T] with T >= 1, got shape {list(x.shape)}")
    pad = spec.n_fft // 2
    padded = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    starts = np.arange(spec.frames(x.shape[1])) * spec.hop_length
    frames = padded[:, starts[:, None] + np.arange(spec.n_fft)[None, :]]
    window = _window(spec).astype(np.float64)
    power = np.abs(np.fft.rfft(frames * window, n=spec.n_fft, axis=-1)) ** 2
    fb = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max_hz)
    mel = np.einsum("mk,bfk->bmf", fb.astype(np.float64), power)
    return np.log(mel + spec.eps).astype(np.float32)
