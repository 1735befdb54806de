"""Image header checks before decode: format, dimensions, decompression-bomb caps, truncation.

Reading a header costs microseconds and no pixel decode, so every image is checked before it
enters a batch decoder (DALI fails a whole batch on one bad image). A failed check raises
:class:`~mmload.errors.DecodeError` naming shard and key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mmload.errors import DecodeError

__all__ = ["ImageHeader", "read_header"]

# SOF markers that carry frame dimensions (not DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageHeader:
    format: str
    height: int
    width: int


def _jpeg(data: bytes | memoryview) -> tuple[int, int]:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9 or marker == 0xDA:
            raise ValueError("JPEG has no frame header before the scan")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 9 > n:
                break
            h, w = struct.unpack_from(">HH", data, pos + 5)
            # A file cut inside the entropy-coded data has no end-of-image marker.
            if bytes(data[max(0, n - 4096) :]).find(b"\xff\xd9") < 0:
                raise ValueError("JPEG is truncated (no end-of-image marker)")
            return h, w
        pos += 2 + length
    raise ValueError("JPEG ends before its frame header")


def _png(data: bytes | memoryview) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("PNG without IHDR chunk")
    w, h = struct.unpack_from(">II", data, 16)
    tail = bytes(data[-4096:]).rstrip(b"\0")
    if len(tail) < 8:  # the padding reaches into the last 4 KiB: strip it all
        tail = bytes(data).rstrip(b"\0")
    if not tail.endswith(b"IEND\xaeB`\x82"):
        raise ValueError("PNG is truncated (no IEND chunk)")
    return h, w


def _webp(data: bytes | memoryview) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack_from("<HH", data, 26)
        return h & 0x3FFF, w & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        b = data[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return h, w
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return h, w
    raise ValueError("WebP without a known VP8 chunk")


def _sniff(data: bytes | memoryview) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    raise ValueError("not a JPEG, PNG, WebP, GIF or BMP image")


def read_header(
    data: bytes | memoryview, *, shard: str, key: str, max_pixels: int, max_side: int
) -> ImageHeader:
    """Format and size of an encoded image (any bytes-like object: the reader hands on views),
    checked against the caps; raises DecodeError."""
    try:
        fmt = _sniff(data[:16])
        if fmt == "jpeg":
            h, w = _jpeg(data)
        elif fmt == "png":
            h, w = _png(data)
        elif fmt == "webp":
            h, w = _webp(data)
        elif fmt == "gif":
            if len(data) < 10:
                raise ValueError("GIF is truncated")
            w, h = struct.unpack_from("<HH", data, 6)
        else:
            if len(data) < 26:
                raise ValueError("BMP is truncated")
            w, h = struct.unpack_from("<ii", data, 18)
            h = abs(h)
    except (ValueError, struct.error) as e:
        raise DecodeError(f"bad image: {e}", shard=shard, key=key) from None
    if h <= 0 or w <= 0:
        raise DecodeError(f"bad image: {fmt} header says {w}x{h}", shard=shard, key=key)
    if h > max_side or w > max_side or h * w > max_pixels:
        raise DecodeError(
            f"image of {w}x{h} exceeds the caps max_side={max_side}, max_pixels={max_pixels} "
            "(decompression bomb?)",
            shard=shard,
            key=key,
        )
    return ImageHeader(fmt, h, w)
