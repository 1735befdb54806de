"""The corrupt-data matrix: a small intact data set and >= 150 generated corruptions of it.

Every :class:`Variant` names a *family*, a ``build(dir)`` that writes the corrupted copy into
``dir`` and returns the source spec with the keys of the *intact* data set (each mapped to the
shard it belongs to), the ``Loader`` keyword arguments the variant is read with, and the outcomes
allowed per error mode:

* ``"raise"`` (``on_error="raise"``): ``"mmload_error"`` (an ``MmloadError`` naming the shard)
  when the corruption must be noticed; ``"complete"`` as well where the damage can be benign
  (a bit flip in pixel data, a garbage mode field mmload never reads).
* ``"skip"`` (``on_error="skip"``, an unlimited budget): ``"complete"``, every intact key
  yielded or listed in ``stats()["bad"]``; ``"mmload_error"`` only where the README says even
  skipping cannot go on (no readable shard, no samples, an epoch's first batch all bad).

Nothing here imports mmload's internals: corruptions are written with the stdlib ``tarfile``,
pyarrow, PIL, soundfile and PyAV, byte by byte where a writer would refuse.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import random
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

__all__ = [
    "Built",
    "Variant",
    "build_variant",
    "get_variant",
    "variants",
]

Outcomes = dict[str, frozenset[str]]


def _allowed(raise_: Iterable[str], skip: Iterable[str]) -> Outcomes:
    return {"raise": frozenset(raise_), "skip": frozenset(skip)}


#: Corrupt data that must be noticed: raise names the shard, skip lists the loss and goes on.
CORRUPT = _allowed({"mmload_error"}, {"complete"})
#: Damage that may be benign (a flip in pixel data, a field mmload never reads).
MAYBE = _allowed({"complete", "mmload_error"}, {"complete"})
#: Valid data (an exotic but legal encoding): every sample must come through.
VALID = _allowed({"complete"}, {"complete"})
#: Nothing readable is left: both modes raise.
FATAL = _allowed({"mmload_error"}, {"mmload_error"})
#: The epoch's first batch is all bad, which raises even when skipping (README, "Bad data").
FIRST_BATCH_BAD = _allowed({"mmload_error"}, {"mmload_error", "complete"})


@dataclass
class Built:
    """What a builder wrote: the source spec, the intact keys (key -> shard url), and keys that
    may be yielded although not intact (none by default)."""

    source: list[str]
    intact: dict[str, str]
    extra_ok: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "intact": self.intact, "extra_ok": self.extra_ok}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Built:
        return cls(list(d["source"]), dict(d["intact"]), list(d.get("extra_ok", [])))


def _small_image_kwargs() -> dict[str, Any]:
    import mmload

    return {"image": mmload.ImageConfig(size=32, backend="pil")}


def _default_backend_kwargs() -> dict[str, Any]:
    import mmload

    return {"image": mmload.ImageConfig(size=32)}


def _audio_kwargs() -> dict[str, Any]:
    import mmload

    return {"audio": mmload.AudioConfig(sample_rate=8000, seconds=0.25, crop="start")}


def _video_kwargs() -> dict[str, Any]:
    import mmload

    return {"video": mmload.VideoConfig(frames=2, stride=1, size=16, sampling="center")}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    build: Callable[[Path], Built]
    allowed: Outcomes
    kwargs: Callable[[], dict[str, Any]] = _small_image_kwargs
    note: str = ""
    #: Bits flipped at random: a key may then come out changed in up to this many bits (a flip
    #: in an Arrow IPC key buffer is undetectable: the format has no checksums). The oracle
    #: pairs such a key with the intact key it came from instead of calling it a loss.
    key_flips: int = 0

    @property
    def must_list(self) -> bool:
        """A skip-mode run that completes must list at least one bad entry: raise mode must fail."""
        return self.allowed["raise"] == frozenset({"mmload_error"})


# -- intact content ------------------------------------------------------------------------------

SAMPLES_PER_SHARD = 6
TAR_FIELDS = ("cls", "jpg", "json", "txt")


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    from mmload.demo import load_photos

    return [p for _, p in load_photos()]


@functools.cache
def image_bytes(i: int, fmt: str = "jpg") -> bytes:
    """Sample ``i``'s picture: a real photo crop, 24..48 px, as JPEG/PNG/WebP."""
    from PIL import Image

    from mmload.demo import make_jpeg

    rng = np.random.default_rng(i)
    photos = _photos()
    size = (int(rng.integers(24, 49)), int(rng.integers(24, 49)))
    jpg = make_jpeg(photos[i % len(photos)], rng, size)
    if fmt == "jpg":
        return jpg
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format={"png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


@functools.cache
def wav_bytes(i: int) -> bytes:
    from mmload.demo import make_wav

    return make_wav(200.0 + 40 * i, seconds=0.3, rate=8000)


@functools.cache
def flac_bytes(i: int) -> bytes:
    import soundfile as sf

    t = np.arange(2400) / 8000
    buf = io.BytesIO()
    sf.write(
        buf, (0.4 * np.sin(2 * np.pi * (300 + 30 * i) * t)).astype(np.float32), 8000, format="FLAC"
    )
    return buf.getvalue()


@functools.cache
def float_wav_bytes(values: tuple[float, ...]) -> bytes:
    """A 32-bit float WAV (IEEE, format 3) holding ``values``."""
    data = np.asarray(values, np.float32).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@functools.lru_cache(maxsize=1)
def mp4_bytes() -> bytes:
    """A 4-frame 32x32 H.264 clip."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("h264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            img = np.full((32, 32, 3), (i * 50) % 256, np.uint8)
            img[:8, :8] = (255, 0, 0)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _media(kind: str, i: int) -> bytes:
    if kind in ("jpg", "png", "webp"):
        return image_bytes(i, kind)
    if kind == "wav":
        return wav_bytes(i)
    if kind == "flac":
        return flac_bytes(i)
    if kind == "mp4":
        return mp4_bytes()
    raise ValueError(kind)


def tar_key(shard: int, j: int) -> str:
    return f"s{shard}_{shard * SAMPLES_PER_SHARD + j:03d}"


def tar_sample(shard: int, j: int, media: str = "jpg") -> list[tuple[str, bytes]]:
    """The (field, bytes) members of sample ``j`` of tar shard ``shard``, in sorted order."""
    i = shard * SAMPLES_PER_SHARD + j
    fields = {
        "cls": str(i % 10).encode(),
        media: _media(media, i),
        "json": json.dumps({"i": i, "user": f"u{i}"}).encode(),
        "txt": f"caption {i}".encode(),
    }
    return sorted(fields.items())


# -- tar writing ---------------------------------------------------------------------------------


@dataclass
class M:
    """One tar member as written: ``fmt`` GNU gives 'L' long names, PAX gives 'x' headers."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    fmt: int = tarfile.USTAR_FORMAT
    raw: bytes | None = None  # verbatim header block(s) + data, overriding everything else


@dataclass
class Laid:
    """A serialised tar: bytes and, per member, where its (last) header and its data start."""

    raw: bytearray
    headers: list[int]
    data: list[int]
    sizes: list[int]
    starts: list[int]
    end: int  # end of the last member's padding (where the end-of-archive blocks begin)


def _member_bytes(m: M) -> tuple[bytes, int]:
    if m.raw is not None:
        return m.raw, len(m.raw)
    info = tarfile.TarInfo(m.name)
    info.type = m.type
    info.size = (
        len(m.data) if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else 0
    )
    info.linkname = m.linkname
    info.mtime = 1_700_000_000
    info.mode = 0o644
    hdr = info.tobuf(m.fmt, "utf-8", "surrogateescape")
    body = m.data if info.size else b""
    pad = -len(body) % 512
    return hdr + body + b"\0" * pad, len(hdr)


def lay_out(members: list[M], *, eoa: bool = True) -> Laid:
    raw = bytearray()
    headers, data, sizes, starts = [], [], [], []
    for m in members:
        blob, hlen = _member_bytes(m)
        starts.append(len(raw))
        headers.append(len(raw) + hlen - 512)
        data.append(len(raw) + hlen)
        sizes.append(len(m.data) if m.raw is None else 0)
        raw += blob
    end = len(raw)
    if eoa:
        raw += b"\0" * 1024
    return Laid(raw, headers, data, sizes, starts, end)


def fix_checksum(raw: bytearray, pos: int) -> None:
    """Recompute the checksum of the header block at ``pos`` (after patching a field)."""
    raw[pos + 148 : pos + 156] = b" " * 8
    raw[pos + 148 : pos + 156] = b"%06o\0 " % sum(raw[pos : pos + 512])


def patch_header(raw: bytearray, pos: int, offset: int, value: bytes, *, fix: bool = True) -> None:
    raw[pos + offset : pos + offset + len(value)] = value
    if fix:
        fix_checksum(raw, pos)


def base_members(shard: int, media: str = "jpg") -> list[M]:
    return [
        M(f"{tar_key(shard, j)}.{f}", d)
        for j in range(SAMPLES_PER_SHARD)
        for f, d in tar_sample(shard, j, media)
    ]


def member_index(j: int, fld: str, media: str = "jpg") -> int:
    """Index of sample ``j``'s member ``fld`` in :func:`base_members` (4 members a sample)."""
    fields = sorted(("cls", media, "json", "txt"))
    return j * len(fields) + fields.index(fld)


MemberEdit = Callable[[list[M]], list[M]]
BytesEdit = Callable[[Laid], bytes]


def tar_build(
    *,
    members: MemberEdit | None = None,
    raw: BytesEdit | None = None,
    shard: int = 1,
    media: str = "jpg",
    add_keys: Iterable[str] = (),
    drop_keys: Iterable[str] = (),
    gz: Callable[[bytes], bytes] | None = None,
    idx: Callable[[Path, Laid], str] | None = None,
    eoa: bool = True,
) -> Callable[[Path], Built]:
    """A builder writing 2 tar shards of 6 samples; shard ``shard`` gets the edits.

    ``members`` edits the member list, ``raw`` the serialised bytes; ``gz`` writes the shard
    as ``.tar.gz`` (the function edits the compressed bytes); ``idx`` writes a DALI ``.idx``
    file next to the shard (given its path and layout; returns the text)."""
    add, drop = tuple(add_keys), tuple(drop_keys)

    def build(d: Path) -> Built:
        source: list[str] = []
        intact: dict[str, str] = {}
        for s in (0, 1):
            mem = base_members(s, media)
            suffix = ".tar.gz" if gz is not None and s == shard else ".tar"
            path = str(d / f"t-{s:04d}{suffix}")
            if s == shard and members is not None:
                mem = members(mem)
            laid = lay_out(mem, eoa=eoa)
            blob = bytes(laid.raw)
            if s == shard and raw is not None:
                blob = raw(laid)
            if s == shard and gz is not None:
                blob = gz(gzip.compress(blob, mtime=0))
            Path(path).write_bytes(blob)
            if s == shard and idx is not None:
                (d / f"t-{s:04d}.idx").write_text(
                    idx(Path(path), laid), encoding="utf-8", errors="surrogateescape"
                )
            source.append(path)
            for j in range(SAMPLES_PER_SHARD):
                intact[tar_key(s, j)] = path
            if s == shard:
                for k in add:
                    intact[k] = path
                for k in drop:
                    intact.pop(k, None)
        return Built(source, intact)

    return build


def _cut(pos_of: Callable[[Laid], int]) -> BytesEdit:
    return lambda laid: bytes(laid.raw[: pos_of(laid)])


def _flip(offsets: Callable[[Laid], list[int]]) -> BytesEdit:
    def edit(laid: Laid) -> bytes:
        raw = bytearray(laid.raw)
        for off in offsets(laid):
            raw[off // 8] ^= 1 << (off % 8)
        return bytes(raw)

    return edit


def _patch(member: int, offset: int, value: bytes, *, fix: bool = True) -> BytesEdit:
    def edit(laid: Laid) -> bytes:
        raw = bytearray(laid.raw)
        patch_header(raw, laid.headers[member], offset, value, fix=fix)
        return bytes(raw)

    return edit


def _replace_member(j: int, fld: str, fn: Callable[[M], list[M]], media: str = "jpg") -> MemberEdit:
    def edit(mem: list[M]) -> list[M]:
        i = member_index(j, fld, media)
        return mem[:i] + fn(mem[i]) + mem[i + 1 :]

    return edit


def _media_edit(j: int, fld: str, fn: Callable[[bytes], bytes], media: str = "jpg") -> MemberEdit:
    return _replace_member(j, fld, lambda m: [replace(m, data=fn(m.data))], media)


def _seeded_flips(seed: int, n: int, lo: float = 0.0, hi: float = 1.0) -> Callable[[bytes], bytes]:
    def fn(b: bytes) -> bytes:
        rng = random.Random(seed)
        out = bytearray(b)
        a, z = int(len(b) * lo), max(int(len(b) * hi), int(len(b) * lo) + 1)
        for _ in range(n):
            bit = rng.randrange(a * 8, z * 8)
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    return fn


def _jpeg_sof_patch(w: int, h: int) -> Callable[[bytes], bytes]:
    """Rewrite the frame header (SOF0/SOF2) of a JPEG to claim ``w`` x ``h`` pixels."""

    def fn(b: bytes) -> bytes:
        out = bytearray(b)
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            p = out.find(marker)
            if p > 0:
                out[p + 5 : p + 9] = struct.pack(">HH", h, w)
                return bytes(out)
        raise ValueError("no SOF marker")

    return fn


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG whose (valid, CRC-checked) header claims ``w`` x ``h`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# -- Arrow / Parquet writing ---------------------------------------------------------------------

ROWS_PER_FILE = 6
ROWS_PER_CHUNK = 2


def table_key(f: int, r: int) -> str:
    return f"a{f}_{f * ROWS_PER_FILE + r:03d}"


def base_table(f: int) -> pa.Table:
    keys = [table_key(f, r) for r in range(ROWS_PER_FILE)]
    idx = [f * ROWS_PER_FILE + r for r in range(ROWS_PER_FILE)]
    return pa.table(
        {
            "__key__": pa.array(keys, pa.string()),
            "jpg": pa.array([image_bytes(20 + i) for i in idx], pa.binary()),
            "cls": pa.array([i % 10 for i in idx], pa.int64()),
            "txt": pa.array([f"caption {i}" for i in idx], pa.string()),
        }
    )


def write_table(t: pa.Table, path: str, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(t, path, row_group_size=ROWS_PER_CHUNK)
        return
    opener = ipc.new_file if fmt == "arrow" else ipc.new_stream
    with pa.OSFile(path, "wb") as sink, opener(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=ROWS_PER_CHUNK):
            w.write_batch(b)


_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow", "stream": "-stream.arrow"}

TableEdit = Callable[[pa.Table], pa.Table]


def table_build(
    fmt: str,
    *,
    table: TableEdit | None = None,
    raw: Callable[[bytes], bytes] | None = None,
    files: Iterable[int] = (1,),
    drop_keys: Iterable[str] = (),
    add_keys: Iterable[str] = (),
    first: TableEdit | None = None,
) -> Callable[[Path], Built]:
    """A builder writing 2 files of 6 rows in chunks of 2; files ``files`` get the edits
    (``table`` before writing, ``raw`` on the written bytes); ``first`` edits file 0."""
    edited, drop, add = frozenset(files), tuple(drop_keys), tuple(add_keys)

    def build(d: Path) -> Built:
        source: list[str] = []
        intact: dict[str, str] = {}
        for f in (0, 1):
            t = base_table(f)
            path = str(d / f"p-{f:04d}{_SUFFIX[fmt]}")
            for r in range(ROWS_PER_FILE):
                intact[table_key(f, r)] = path
            if f in edited and table is not None:
                t = table(t)
            if f == 0 and first is not None:
                t = first(t)
            write_table(t, path, fmt)
            if f in edited and raw is not None:
                Path(path).write_bytes(raw(Path(path).read_bytes()))
            source.append(path)
        for k in drop:
            intact.pop(k, None)
        for k in add:
            intact[k] = source[1]
        return Built(source, intact)

    return build


FILE1_KEYS = tuple(table_key(1, r) for r in range(ROWS_PER_FILE))


def _set(name: str, arr: pa.Array) -> TableEdit:
    def edit(t: pa.Table) -> pa.Table:
        if name in t.column_names:
            return t.set_column(t.column_names.index(name), name, arr)
        return t.append_column(name, arr)

    return edit


def _drop(name: str) -> TableEdit:
    return lambda t: t.drop_columns([name])


def _cast(name: str, typ: pa.DataType) -> TableEdit:
    return lambda t: _set(name, t.column(name).cast(typ))(t)


def _null_at(name: str, row: int) -> TableEdit:
    def edit(t: pa.Table) -> pa.Table:
        vals = t.column(name).to_pylist()
        vals[row] = None
        return _set(name, pa.array(vals, t.schema.field(name).type))(t)

    return edit


def raw_strings(values: list[bytes], typ: pa.DataType | None = None) -> pa.Array:
    """A string array over arbitrary bytes: ``from_buffers`` does not check UTF-8."""
    typ = pa.string() if typ is None else typ
    offsets = np.cumsum([0, *[len(v) for v in values]]).astype(np.int32)
    return pa.Array.from_buffers(
        typ, len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


def _bad_utf8(name: str, row: int) -> TableEdit:
    def edit(t: pa.Table) -> pa.Table:
        vals = [v.encode() for v in t.column(name).to_pylist()]
        vals[row] = b"bad \xff\xfe utf-8 \xc3"
        return _set(name, raw_strings(vals))(t)

    return edit


def _bytes_flips(seed: int, n: int, lo: float = 0.0, hi: float = 1.0) -> Callable[[bytes], bytes]:
    return _seeded_flips(seed, n, lo, hi)


# -- the matrix ----------------------------------------------------------------------------------


def _tar_variants() -> list[Variant]:
    out: list[Variant] = []
    # Truncation at every kind of boundary, for the first/middle/last sample of either shard.
    for s in (0, 1):
        for j in (0, 2, 5):
            m = member_index(j, "jpg")
            cuts: dict[str, Callable[[Laid], int]] = {
                "in_header": lambda L, m=m: L.headers[m] + 100,
                "at_header": lambda L, m=m: L.headers[m],
                "in_data": lambda L, m=m: L.data[m] + L.sizes[m] // 2,
                "in_padding": lambda L, m=m: L.data[m] + L.sizes[m] + (-L.sizes[m] % 512) // 2,
            }
            for kind, pos in cuts.items():
                out.append(
                    Variant(
                        f"tar_trunc_{kind}_s{s}_sample{j}",
                        "tar",
                        tar_build(raw=_cut(pos), shard=s),
                        CORRUPT,
                    )
                )
        out += [
            Variant(
                f"tar_trunc_after_last_member_s{s}",
                "tar",
                tar_build(raw=_cut(lambda L: L.end), shard=s),
                CORRUPT,
            ),
            Variant(
                f"tar_trunc_zero_bytes_s{s}",
                "tar",
                tar_build(raw=_cut(lambda L: 0), shard=s),
                CORRUPT,
            ),
            Variant(
                f"tar_trunc_one_byte_s{s}",
                "tar",
                tar_build(raw=_cut(lambda L: 1), shard=s),
                CORRUPT,
            ),
            Variant(
                f"tar_trunc_in_eoa_s{s}",
                "tar",
                tar_build(raw=_cut(lambda L: L.end + 512), shard=s),
                MAYBE,
                note="one of the two end-of-archive blocks: nothing is lost",
            ),
        ]
    out.append(
        Variant(
            "tar_trunc_last_cls_padding",
            "tar",
            tar_build(raw=_cut(lambda L: L.data[-4] + L.sizes[-4] + 10)),
            CORRUPT,
            note="cut in the padding of the last sample's .cls",
        )
    )

    # Header fields: size garbage / negative / huge, mode/mtime garbage, checksum.
    m = member_index(2, "jpg")
    hdr: dict[str, tuple[BytesEdit, Outcomes]] = {
        "size_non_octal": (_patch(m, 124, b"0000001x2a4\0"), CORRUPT),
        "size_negative_b256": (_patch(m, 124, b"\xff" * 12), CORRUPT),
        "size_negative_text": (_patch(m, 124, b"-0000000001\0"), CORRUPT),
        "size_huge_b256": (_patch(m, 124, b"\x80" + b"\0" * 3 + b"\x7f" * 8), CORRUPT),
        "size_huge_octal": (_patch(m, 124, b"77777777777\0"), CORRUPT),
        "size_smaller": (_patch(m, 124, b"%011o\0" % 7), CORRUPT),
        "size_larger": (lambda L: _patch(m, 124, b"%011o\0" % (L.sizes[m] + 700))(L), CORRUPT),
        "size_spaces": (_patch(m, 124, b" " * 12), CORRUPT),
        "mode_garbage": (_patch(m, 100, b"zz!!zz!\0"), MAYBE),
        "mtime_garbage": (_patch(m, 136, b"\xff\xfe??garbage"), MAYBE),
        "uid_gid_garbage": (_patch(m, 108, b"-1-1-1-\0qqqqqqq\0"), MAYBE),
        "checksum_wrong": (_patch(m, 148, b"0001234\0", fix=False), CORRUPT),
        "checksum_garbage": (_patch(m, 148, b"xyz!xyz\0", fix=False), CORRUPT),
        "checksum_wrong_first": (_patch(0, 148, b"0001234\0", fix=False), CORRUPT),
        "typeflag_unknown": (_patch(m, 156, b"Z"), CORRUPT),
        "magic_garbage": (_patch(m, 257, b"qqqqq\0"), MAYBE),
        "name_no_nul": (_patch(m, 0, b"s1_008" + b"_" * 90 + b".jpg"), CORRUPT),
        "name_empty": (_patch(m, 0, b"\0" * 100), CORRUPT),
    }
    for name, (edit, allowed) in hdr.items():
        out.append(Variant(f"tar_hdr_{name}", "tar", tar_build(raw=edit), allowed))

    # Links, devices, FIFOs, directories (all in shard 1).
    k3, k9 = tar_key(1, 3), "s1_link"
    link_only = [M(f"{k9}.jpg", type=tarfile.LNKTYPE, linkname=f"{tar_key(1, 0)}.jpg")]
    sym_only = [M(f"{k9}.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")]

    def _insert(
        extra: list[M] | Callable[[], list[M]], at: int = member_index(4, "cls")
    ) -> MemberEdit:
        """Insert members before sample 4; a callable is called at build time (media are
        made lazily, so that defining the matrix costs nothing)."""
        return lambda mem: [*mem[:at], *(extra() if callable(extra) else extra), *mem[at:]]

    special: dict[str, tuple[MemberEdit, Outcomes, tuple[str, ...]]] = {
        "hardlink_only_sample": (_insert(link_only), CORRUPT, (k9,)),
        "symlink_only_sample": (_insert(sym_only), CORRUPT, (k9,)),
        "symlink_only_sample_last": (lambda mem: mem + sym_only, CORRUPT, (k9,)),
        "jpg_is_symlink": (
            _replace_member(
                3,
                "jpg",
                lambda m: [M(m.name, type=tarfile.SYMTYPE, linkname=f"{tar_key(1, 0)}.jpg")],
            ),
            CORRUPT,
            (),
        ),
        "jpg_is_hardlink": (
            _replace_member(
                3,
                "jpg",
                lambda m: [M(m.name, type=tarfile.LNKTYPE, linkname=f"{tar_key(1, 0)}.jpg")],
            ),
            CORRUPT,
            (),
        ),
        "jpg_is_chardev": (
            _replace_member(3, "jpg", lambda m: [M(m.name, type=tarfile.CHRTYPE)]),
            CORRUPT,
            (),
        ),
        "jpg_is_blockdev": (
            _replace_member(3, "jpg", lambda m: [M(m.name, type=tarfile.BLKTYPE)]),
            CORRUPT,
            (),
        ),
        "jpg_is_fifo": (
            _replace_member(3, "jpg", lambda m: [M(m.name, type=tarfile.FIFOTYPE)]),
            CORRUPT,
            (),
        ),
        "jpg_is_directory": (
            _replace_member(3, "jpg", lambda m: [M(m.name + "/", type=tarfile.DIRTYPE)]),
            CORRUPT,
            (),
        ),
        "fifo_only_sample": (_insert([M(f"{k9}.cls", type=tarfile.FIFOTYPE)]), CORRUPT, (k9,)),
        "directory_between_samples": (_insert([M("somedir/", type=tarfile.DIRTYPE)]), VALID, ()),
        "contiguous_type_7": (
            _replace_member(3, "jpg", lambda m: [replace(m, type=tarfile.CONTTYPE)]),
            VALID,
            (),
        ),
    }
    for name, (edit, allowed, add) in special.items():
        out.append(Variant(f"tar_{name}", "tar", tar_build(members=edit, add_keys=add), allowed))
    del k3

    # Long names (GNU 'L', PAX path), corrupt PAX / GNU headers, odd names.
    long_key = "d/" + "x" * 140 + "_long"

    def _long_sample(fmt: int) -> MemberEdit:
        return _insert(lambda: [M(f"{long_key}.{f}", d, fmt=fmt) for f, d in tar_sample(1, 0)])

    def _raw_x(records: bytes, typ: bytes = b"x") -> M:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size, info.mtime = typ, len(records), 0
        blob = info.tobuf(tarfile.USTAR_FORMAT)
        return M("", raw=blob + records + b"\0" * (-len(records) % 512))

    def _raw_l(name: bytes, size: int | None = None) -> M:
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size, info.mtime = tarfile.GNUTYPE_LONGNAME, len(name), 0
        blob = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        if size is not None:
            patch_header(blob, 0, 124, b"%011o\0" % size)
        return M("", raw=bytes(blob) + name + b"\0" * (-len(name) % 512))

    def _before(extra: M, j: int = 3) -> MemberEdit:
        return lambda mem: [*mem[: member_index(j, "cls")], extra, *mem[member_index(j, "cls") :]]

    names: dict[str, tuple[MemberEdit, Outcomes, tuple[str, ...]]] = {
        "gnu_longname": (_long_sample(tarfile.GNU_FORMAT), VALID, (long_key,)),
        "pax_path": (_long_sample(tarfile.PAX_FORMAT), VALID, (long_key,)),
        "pax_malformed_record": (_before(_raw_x(b"abc path=zzz\n")), CORRUPT, ()),
        "pax_length_overflows": (_before(_raw_x(b"999 path=zzz\n")), CORRUPT, ()),
        "pax_no_newline": (_before(_raw_x(b"13 path=zzzz.")), CORRUPT, ()),
        "pax_global_header": (_before(_raw_x(b"16 comment=abc\n", b"g")), VALID, ()),
        "pax_path_without_key": (_before(_raw_x(b"14 path=nodot\n")), CORRUPT, ()),
        "gnu_longname_huge_size": (_before(_raw_l(b"x.jpg", size=1 << 30)), CORRUPT, ()),
        "gnu_longname_size_swallows_members": (_before(_raw_l(b"x.jpg", size=2000)), CORRUPT, ()),
        "gnu_longname_at_end": (lambda mem: [*mem, _raw_l(b"zz_9.jpg")], MAYBE, ()),
        "dotdot_member_names": (
            _insert(lambda: [M(f"../evil.{f}", d) for f, d in tar_sample(1, 1)]),
            MAYBE,
            ("../evil",),
        ),
        "absolute_member_names": (
            _insert(lambda: [M(f"/abs/evil.{f}", d) for f, d in tar_sample(1, 1)]),
            MAYBE,
            ("/abs/evil",),
        ),
        "non_utf8_member_names": (
            _insert(lambda: [M(f"s1_\udcff\udcfe.{f}", d) for f, d in tar_sample(1, 1)]),
            MAYBE,
            ("s1_\udcff\udcfe",),
        ),
        # Non-sample members (README, hidden files) are left out and counted, not errors.
        "member_without_field": (_insert([M("README", b"hello")]), VALID, ()),
        "member_hidden_name": (_insert([M(".hidden.jpg", b"x")]), VALID, ()),
        "member_empty_field": (_insert([M("s9.", b"x")]), CORRUPT, ()),
    }
    for name, (edit, allowed, add) in names.items():
        out.append(Variant(f"tar_{name}", "tar", tar_build(members=edit, add_keys=add), allowed))

    # Duplicates, non-contiguous samples, missing/extra fields.
    def _dup_member(mem: list[M]) -> list[M]:
        i = member_index(2, "jpg")
        return [*mem[: i + 1], mem[i], *mem[i + 1 :]]

    def _noncontig(mem: list[M]) -> list[M]:
        i = member_index(2, "txt")
        return (
            mem[:i] + mem[i + 1 : member_index(4, "cls")] + [mem[i]] + mem[member_index(4, "cls") :]
        )

    def _repeat_sample(mem: list[M]) -> list[M]:
        a, b = member_index(1, "cls"), member_index(2, "cls")
        return mem + mem[a:b]

    def _missing_txt(mem: list[M]) -> list[M]:
        return [m for m in mem if m.name != f"{tar_key(1, 4)}.txt"]

    def _extra_field(mem: list[M]) -> list[M]:
        i = member_index(0, "txt")
        return [*mem[: i + 1], M(f"{tar_key(1, 0)}.zzz", b"extra"), *mem[i + 1 :]]

    for name, edit, allowed in (
        ("duplicate_member", _dup_member, CORRUPT),
        ("non_contiguous_sample", _noncontig, CORRUPT),
        ("repeated_sample", _repeat_sample, CORRUPT),
        ("sample_missing_field", _missing_txt, CORRUPT),
        ("one_sample_extra_field", _extra_field, FIRST_BATCH_BAD),
    ):
        out.append(Variant(f"tar_{name}", "tar", tar_build(members=edit), allowed))
    out.append(
        Variant(
            "tar_one_sample_extra_field_first_shard",
            "tar",
            tar_build(
                members=lambda mem: [*mem[:4], M(f"{tar_key(0, 0)}.zzz", b"x"), *mem[4:]], shard=0
            ),
            CORRUPT,
            note="batch 1 has one good sample",
        )
    )

    # Seeded random bit flips: anywhere in the shard, and only inside header blocks.
    for seed in range(8):
        out.append(
            Variant(
                f"tar_bitflip_any_seed{seed}",
                "tar",
                tar_build(raw=lambda L, seed=seed: _seeded_flips(seed, 3)(bytes(L.raw))),
                MAYBE,
                key_flips=3,
            )
        )
    for seed in range(5):

        def _hdr_bits(L: Laid, seed: int = seed) -> list[int]:
            rng = random.Random(100 + seed)
            return [rng.choice(L.headers[1:]) * 8 + rng.randrange(512 * 8) for _ in range(2)]

        out.append(
            Variant(
                f"tar_bitflip_header_seed{seed}",
                "tar",
                tar_build(raw=_flip(_hdr_bits)),
                MAYBE,
                key_flips=2,
            )
        )

    # gzip-compressed tars.
    def _gz_cut(frac: float) -> Callable[[bytes], bytes]:
        return lambda b: b[: int(len(b) * frac)]

    gzs: dict[str, tuple[Callable[[bytes], bytes], Outcomes]] = {
        "valid": (lambda b: b, VALID),
        "truncated_half": (_gz_cut(0.5), CORRUPT),
        "truncated_10_bytes": (lambda b: b[:10], CORRUPT),
        "truncated_trailer": (lambda b: b[:-4], CORRUPT),
        "magic_damaged": (lambda b: b"\x1f\x8c" + b[2:], CORRUPT),
        "trailing_garbage": (lambda b: b + b"garbage!" * 4, MAYBE),
        "crc_wrong": (lambda b: b[:-8] + bytes(4) + b[-4:], CORRUPT),
    }
    for seed in range(4):
        gzs[f"bitflip_seed{seed}"] = (_seeded_flips(200 + seed, 2, 0.05, 0.95), CORRUPT)
    for name, (fn, allowed) in gzs.items():
        out.append(Variant(f"targz_{name}", "targz", tar_build(gz=fn), allowed))

    # DALI .idx next to shard 1.
    def _idx_lines(L: Laid, mem: list[M] | None = None) -> list[str]:
        mem = mem or base_members(1)
        lines = []
        for j in range(SAMPLES_PER_SHARD):
            parts = []
            for f in TAR_FIELDS:
                i = member_index(j, f)
                parts.append(f"{f} {L.data[i]} {L.sizes[i]} {mem[i].name}")
            lines.append(" ".join(parts))
        return lines

    def _idx(fn: Callable[[list[str], Laid], str]) -> Callable[[Path, Laid], str]:
        return lambda _p, L: fn(_idx_lines(L), L)

    idxs: dict[str, tuple[Callable[[list[str], Laid], str], Outcomes]] = {
        "valid": (lambda ls, L: "v1.2 6\n" + "\n".join(ls) + "\n", VALID),
        "header_garbage": (lambda ls, L: "garbage\n" + "\n".join(ls) + "\n", CORRUPT),
        "header_v1_1": (lambda ls, L: "v1.1 6\n" + "\n".join(ls) + "\n", CORRUPT),
        "empty_file": (lambda ls, L: "", CORRUPT),
        "count_too_high": (lambda ls, L: "v1.2 7\n" + "\n".join(ls) + "\n", CORRUPT),
        "count_too_low": (lambda ls, L: "v1.2 5\n" + "\n".join(ls) + "\n", CORRUPT),
        "count_not_a_number": (lambda ls, L: "v1.2 six\n" + "\n".join(ls) + "\n", CORRUPT),
        "count_huge": (lambda ls, L: "v1.2 " + "9" * 40 + "\n" + "\n".join(ls) + "\n", CORRUPT),
        "offset_past_end": (
            lambda ls, L: (
                "v1.2 6\n"
                + "\n".join(ls[:-1])
                + "\n"
                + ls[-1].replace(f" {L.data[-1]} ", f" {len(L.raw) + 4096} ")
                + "\n"
            ),
            CORRUPT,
        ),
        "size_past_end": (
            lambda ls, L: (
                "v1.2 6\n"
                + "\n".join(ls[:-1])
                + "\n"
                + ls[-1].replace(f" {L.data[-1]} {L.sizes[-1]} ", f" {L.data[-1]} 99999999 ")
                + "\n"
            ),
            CORRUPT,
        ),
        "negative_offset": (
            lambda ls, L: "v1.2 6\n" + "\n".join(ls).replace(f" {L.data[0]} ", " -5 ", 1) + "\n",
            CORRUPT,
        ),
        "line_missing": (lambda ls, L: "v1.2 5\n" + "\n".join(ls[:2] + ls[3:]) + "\n", CORRUPT),
        "sample_twice": (lambda ls, L: "v1.2 7\n" + "\n".join([*ls, ls[1]]) + "\n", CORRUPT),
        "offsets_shifted": (
            lambda ls, L: (
                "v1.2 6\n"
                + "\n".join(
                    " ".join(
                        str(int(t) + 512) if k % 4 == 1 else t for k, t in enumerate(line.split())
                    )
                    for line in ls[:-1]
                )
                + "\n"
                + ls[-1]
                + "\n"
            ),
            CORRUPT,
        ),
        "truncated_line": (lambda ls, L: "v1.2 6\n" + "\n".join(ls)[:-30] + "\n", CORRUPT),
        "binary_garbage": (lambda ls, L: "v1.2 6\n\udcff\udcfe\x00\x01 zz\n", CORRUPT),
    }
    for name, (fn, allowed) in idxs.items():
        out.append(Variant(f"idx_{name}", "dali_idx", tar_build(idx=_idx(fn)), allowed))

    space_key = "s1 spaced"

    def _space_members(mem: list[M]) -> list[M]:
        at = member_index(4, "cls")
        return mem[:at] + [M(f"{space_key}.{f}", d) for f, d in tar_sample(1, 1)] + mem[at:]

    def _space_idx(_p: Path, L: Laid) -> str:
        mem = _space_members(base_members(1))
        lines = []
        i = 0
        while i < len(mem):
            key = mem[i].name.rsplit(".", 1)[0]
            parts = []
            while i < len(mem) and mem[i].name.rsplit(".", 1)[0] == key:
                f = mem[i].name.rsplit(".", 1)[1]
                parts.append(f"{f} {L.data[i]} {L.sizes[i]} {mem[i].name}")
                i += 1
            lines.append(" ".join(parts))
        return f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n"

    out.append(
        Variant(
            "idx_key_with_space",
            "dali_idx",
            tar_build(members=_space_members, idx=_space_idx, add_keys=(space_key,)),
            CORRUPT,
        )
    )
    return out


def _table_variants() -> list[Variant]:
    out: list[Variant] = []
    for fmt in ("parquet", "arrow", "stream"):
        fam = fmt if fmt == "parquet" else f"arrow_{'file' if fmt == 'arrow' else 'stream'}"
        p = f"{fmt}_"
        for frac in (0.0, 0.1, 0.5, 0.9):
            out.append(
                Variant(
                    f"{p}trunc_{int(frac * 100)}pct",
                    fam,
                    table_build(fmt, raw=lambda b, frac=frac: b[: int(len(b) * frac)]),
                    CORRUPT,
                )
            )
        out.append(
            Variant(
                f"{p}trunc_last_byte",
                fam,
                table_build(fmt, raw=lambda b: b[:-1]),
                MAYBE if fmt == "stream" else CORRUPT,
                note="a stream's last byte is part of the end-of-stream marker",
            )
        )
        out.append(
            Variant(f"{p}trunc_8_bytes", fam, table_build(fmt, raw=lambda b: b[:8]), CORRUPT)
        )
        for seed in range(6):
            out.append(
                Variant(
                    f"{p}bitflip_any_seed{seed}",
                    fam,
                    table_build(fmt, raw=_bytes_flips(300 + seed, 2)),
                    MAYBE,
                    key_flips=2,
                )
            )
        for seed in range(5):
            out.append(
                Variant(
                    f"{p}bitflip_body_seed{seed}",
                    fam,
                    table_build(fmt, raw=_bytes_flips(400 + seed, 4, 0.15, 0.7)),
                    MAYBE,
                    key_flips=4,
                )
            )
        out.append(
            Variant(
                f"{p}bitflip_first_file",
                fam,
                table_build(fmt, raw=_bytes_flips(500, 4, 0.15, 0.7), files=(0,)),
                _allowed({"complete", "mmload_error"}, {"complete", "mmload_error"}),
                note="may make batch 1 all bad, which raises even when skipping",
                key_flips=4,
            )
        )
        if fmt == "parquet":
            tail = 8
        elif fmt == "arrow":
            tail = 10
        else:
            tail = 0
        if tail:
            out += [
                Variant(
                    f"{p}footer_garbage",
                    fam,
                    table_build(fmt, raw=lambda b, t=tail: b[: -t - 40] + b"\xff" * 40 + b[-t:]),
                    CORRUPT,
                ),
                Variant(
                    f"{p}footer_len_huge",
                    fam,
                    table_build(
                        fmt, raw=lambda b, t=tail: b[:-t] + b"\xff\xff\xff\x7f" + b[-t + 4 :]
                    ),
                    CORRUPT,
                ),
                Variant(
                    f"{p}footer_len_zero",
                    fam,
                    table_build(fmt, raw=lambda b, t=tail: b[:-t] + b"\0\0\0\0" + b[-t + 4 :]),
                    CORRUPT,
                ),
            ]
        else:
            out += [
                Variant(f"{p}eos_removed", fam, table_build(fmt, raw=lambda b: b[:-8]), MAYBE),
                Variant(
                    f"{p}eos_garbage",
                    fam,
                    table_build(fmt, raw=lambda b: b[:-8] + b"\x01\x02\x03\x04\x05\x06\x07\x08"),
                    MAYBE,
                ),
                Variant(
                    f"{p}trailing_garbage",
                    fam,
                    table_build(
                        fmt, raw=lambda b: b[:-8] + b"\xff\xff\xff\xff\x40\0\0\0" + b"\x55" * 64
                    ),
                    CORRUPT,
                ),
            ]
        out += [
            Variant(
                f"{p}magic_head",
                fam,
                table_build(fmt, raw=lambda b: b"XXXX" + b[4:]),
                CORRUPT if fmt == "stream" else MAYBE,
                note="readers find a file's footer from its end; the data is intact",
            ),
            Variant(
                f"{p}magic_tail",
                fam,
                table_build(fmt, raw=lambda b: b[:-4] + b"XXXX"),
                MAYBE if fmt == "stream" else CORRUPT,
            ),
            Variant(
                f"{p}garbage_file",
                fam,
                table_build(fmt, raw=lambda b: bytes(random.Random(7).randbytes(len(b)))),
                CORRUPT,
            ),
        ]
        # schema
        schema_cases: dict[str, tuple[Callable[[Path], Built], Outcomes]] = {
            "missing_key_column": (table_build(fmt, table=_drop("__key__")), CORRUPT),
            "missing_key_column_all": (
                table_build(fmt, table=_drop("__key__"), files=(0, 1)),
                FATAL,
            ),
            "missing_media_column": (table_build(fmt, table=_drop("jpg")), CORRUPT),
            "missing_media_column_first_file": (
                table_build(fmt, table=_drop("jpg"), files=(0,)),
                FIRST_BATCH_BAD,
            ),
            "cls_string_in_second": (table_build(fmt, table=_cast("cls", pa.string())), CORRUPT),
            "cls_float_in_second": (table_build(fmt, table=_cast("cls", pa.float64())), MAYBE),
            "cls_fractional_float_in_second": (
                table_build(
                    fmt,
                    table=lambda t: _set("cls", pa.array([0.5] * ROWS_PER_FILE, pa.float64()))(t),
                ),
                CORRUPT,
            ),
            "cls_float_first_int_second": (
                table_build(fmt, first=_cast("cls", pa.float64()), files=()),
                VALID,
            ),
            "cls_int32_in_second": (table_build(fmt, table=_cast("cls", pa.int32())), VALID),
            "cls_bool_in_second": (
                table_build(fmt, table=lambda t: _set("cls", pa.array([True] * ROWS_PER_FILE))(t)),
                MAYBE,
            ),
            "txt_large_string": (table_build(fmt, table=_cast("txt", pa.large_string())), VALID),
            "txt_int_in_second": (
                table_build(
                    fmt, table=lambda t: _set("txt", pa.array(range(ROWS_PER_FILE), pa.int64()))(t)
                ),
                MAYBE,
            ),
            "jpg_large_binary": (table_build(fmt, table=_cast("jpg", pa.large_binary())), VALID),
            "jpg_string_in_second": (
                table_build(
                    fmt, table=lambda t: _set("jpg", pa.array(["notbytes"] * ROWS_PER_FILE))(t)
                ),
                CORRUPT,
            ),
            "extra_column_in_second": (
                table_build(
                    fmt, table=lambda t: t.append_column("extra", pa.array([1.5] * ROWS_PER_FILE))
                ),
                FIRST_BATCH_BAD,
            ),
            "columns_reordered": (
                table_build(fmt, table=lambda t: t.select(["txt", "cls", "jpg", "__key__"])),
                VALID,
            ),
            "key_int64": (
                table_build(
                    fmt,
                    table=lambda t: _set(
                        "__key__", pa.array(range(100, 100 + ROWS_PER_FILE), pa.int64())
                    )(t),
                    drop_keys=FILE1_KEYS,
                    add_keys=[str(100 + r) for r in range(ROWS_PER_FILE)],
                ),
                MAYBE,
            ),
            # nulls
            "null_key_row0_first_file": (
                table_build(
                    fmt, table=_null_at("__key__", 0), files=(0,), drop_keys=(table_key(0, 0),)
                ),
                CORRUPT,
            ),
            "null_key_in_second": (
                table_build(fmt, table=_null_at("__key__", 3), drop_keys=(table_key(1, 3),)),
                CORRUPT,
            ),
            "null_binary_cell": (table_build(fmt, table=_null_at("jpg", 2)), CORRUPT),
            "null_cls": (table_build(fmt, table=_null_at("cls", 4)), CORRUPT),
            "null_txt": (table_build(fmt, table=_null_at("txt", 1)), MAYBE),
            "all_null_media": (
                table_build(
                    fmt, table=lambda t: _set("jpg", pa.nulls(ROWS_PER_FILE, pa.binary()))(t)
                ),
                CORRUPT,
            ),
            "null_type_column": (
                table_build(fmt, table=lambda t: _set("jpg", pa.nulls(ROWS_PER_FILE))(t)),
                CORRUPT,
            ),
            # zero rows
            "zero_rows_all": (table_build(fmt, table=lambda t: t.slice(0, 0), files=(0, 1)), FATAL),
            "zero_rows_second": (
                table_build(fmt, table=lambda t: t.slice(0, 0), drop_keys=FILE1_KEYS),
                VALID,
            ),
            # invalid UTF-8
            "invalid_utf8_txt": (table_build(fmt, table=_bad_utf8("txt", 2)), CORRUPT),
            "invalid_utf8_key": (
                table_build(fmt, table=_bad_utf8("__key__", 3), drop_keys=(table_key(1, 3),)),
                CORRUPT,
            ),
            # nested
            "list_fixed": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column("vec", pa.array([[1, 2, 3]] * ROWS_PER_FILE)),
                    first=lambda t: t.append_column("vec", pa.array([[4, 5, 6]] * ROWS_PER_FILE)),
                ),
                VALID,
            ),
            "list_ragged_in_second": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column(
                        "vec", pa.array([[1] * (r + 1) for r in range(ROWS_PER_FILE)])
                    ),
                    first=lambda t: t.append_column("vec", pa.array([[4, 5, 6]] * ROWS_PER_FILE)),
                ),
                VALID,  # a variable-length list is a Jagged field: other lengths later are valid
            ),
            "list_nested": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column(
                        "vec", pa.array([[[1], [2, 3]]] * ROWS_PER_FILE)
                    ),
                    first=lambda t: t.append_column(
                        "vec", pa.array([[[4, 5], []]] * ROWS_PER_FILE)
                    ),
                ),
                MAYBE,
            ),
            "list_null_element": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column(
                        "vec", pa.array([[1, None, 3]] * ROWS_PER_FILE)
                    ),
                    first=lambda t: t.append_column("vec", pa.array([[4, 5, 6]] * ROWS_PER_FILE)),
                ),
                CORRUPT,  # ints: a null element has no int64 value (as in a scalar column)
            ),
            "list_null_float_element": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column(
                        "vec", pa.array([[1.5, None, 3.0]] * ROWS_PER_FILE)
                    ),
                    first=lambda t: t.append_column("vec", pa.array([[4.0, 5.5]] * ROWS_PER_FILE)),
                ),
                VALID,  # floats: a null element is NaN; other lengths later are valid
            ),
            "struct_column": (
                table_build(
                    fmt,
                    table=lambda t: t.append_column("st", pa.array([{"a": 1}] * ROWS_PER_FILE)),
                    first=lambda t: t.append_column("st", pa.array([{"a": 2}] * ROWS_PER_FILE)),
                ),
                MAYBE,
            ),
        }
        if fmt != "parquet":
            schema_cases["duplicate_column_names"] = (
                table_build(
                    fmt,
                    table=lambda t: pa.Table.from_arrays(
                        [*t.columns, t.column("cls")], [*t.column_names, "cls"]
                    ),
                ),
                CORRUPT,
            )
        for name, (build, allowed) in schema_cases.items():
            out.append(Variant(f"{p}{name}", fam, build, allowed))
    return out


def _media_variants() -> list[Variant]:
    out: list[Variant] = []
    J = 3  # sample of shard 1 whose media member is damaged

    def mv(
        name: str,
        media: str,
        fn: Callable[[bytes], bytes],
        allowed: Outcomes,
        kwargs: Callable[[], dict[str, Any]] = _small_image_kwargs,
    ) -> None:
        out.append(
            Variant(
                name,
                "media",
                tar_build(members=_media_edit(J, media, fn, media), media=media),
                allowed,
                kwargs,
            )
        )

    def _garbage(n: int) -> Callable[[bytes], bytes]:
        return lambda b: random.Random(n).randbytes(n)

    for media in ("jpg", "png", "webp"):
        mv(f"{media}_valid", media, lambda b: b, VALID)
        mv(f"{media}_truncated_half", media, lambda b: b[: len(b) // 2], CORRUPT)
        mv(f"{media}_truncated_16_bytes", media, lambda b: b[:16], CORRUPT)
        mv(f"{media}_empty", media, lambda b: b"", CORRUPT)
        mv(f"{media}_garbage", media, _garbage(700), CORRUPT)
        for seed in range(3):
            mv(f"{media}_bitflip_seed{seed}", media, _seeded_flips(600 + seed, 3), MAYBE)
    mv("jpg_bitflip_header", "jpg", _seeded_flips(650, 4, 0.0, 0.1), MAYBE)
    mv("jpg_trailing_garbage", "jpg", lambda b: b + b"\x00garbage" * 20, MAYBE)
    mv("jpg_bomb_header", "jpg", _jpeg_sof_patch(65500, 65500), CORRUPT)
    mv("jpg_zero_dims", "jpg", _jpeg_sof_patch(0, 0), CORRUPT)
    mv("png_bomb_header", "png", lambda b: png_bomb(), CORRUPT)
    mv("png_bomb_header_wide", "png", lambda b: png_bomb(2_000_000_000, 1), CORRUPT)
    mv("png_is_jpeg", "png", lambda b: image_bytes(1, "jpg"), MAYBE)
    for name, fn, allowed in (
        ("truncated_half", lambda b: b[: len(b) // 2], CORRUPT),
        ("bitflip", _seeded_flips(660, 3), MAYBE),
        ("bomb_header", _jpeg_sof_patch(65500, 65500), CORRUPT),
        ("garbage", _garbage(700), CORRUPT),
    ):
        mv(f"jpg_default_backend_{name}", "jpg", fn, allowed, _default_backend_kwargs)

    for media in ("wav", "flac"):
        mv(f"{media}_valid", media, lambda b: b, VALID, _audio_kwargs)
        mv(f"{media}_truncated_half", media, lambda b: b[: len(b) // 2], CORRUPT, _audio_kwargs)
        mv(f"{media}_truncated_in_header", media, lambda b: b[:20], CORRUPT, _audio_kwargs)
        mv(f"{media}_empty", media, lambda b: b"", CORRUPT, _audio_kwargs)
        mv(f"{media}_garbage", media, _garbage(900), CORRUPT, _audio_kwargs)
        for seed in range(2):
            mv(
                f"{media}_bitflip_seed{seed}",
                media,
                _seeded_flips(700 + seed, 3),
                MAYBE,
                _audio_kwargs,
            )
        mv(f"{media}_bitflip_header", media, _seeded_flips(710, 3, 0.0, 0.02), MAYBE, _audio_kwargs)
    mv(
        "wav_data_size_huge",
        "wav",
        lambda b: b[:40] + b"\xf0\xff\xff\x7f" + b[44:],
        CORRUPT,
        _audio_kwargs,
    )
    mv(
        "wav_float_nan",
        "wav",
        lambda b: float_wav_bytes((0.1, float("nan"), 0.2) * 200),
        CORRUPT,
        _audio_kwargs,
    )

    mv("mp4_valid", "mp4", lambda b: b, VALID, _video_kwargs)
    mv("mp4_truncated_half", "mp4", lambda b: b[: len(b) // 2], CORRUPT, _video_kwargs)
    mv("mp4_truncated_90pct", "mp4", lambda b: b[: len(b) * 9 // 10], CORRUPT, _video_kwargs)
    mv("mp4_truncated_32_bytes", "mp4", lambda b: b[:32], CORRUPT, _video_kwargs)
    mv("mp4_empty", "mp4", lambda b: b"", CORRUPT, _video_kwargs)
    mv("mp4_garbage", "mp4", _garbage(900), CORRUPT, _video_kwargs)
    for seed in range(3):
        mv(f"mp4_bitflip_seed{seed}", "mp4", _seeded_flips(800 + seed, 4), MAYBE, _video_kwargs)
    return out


def _field_variants() -> list[Variant]:
    out: list[Variant] = []
    J = 3

    def fv(name: str, fld: str, data: bytes, allowed: Outcomes) -> None:
        out.append(
            Variant(
                f"field_{name}",
                "fields",
                tar_build(members=_media_edit(J, fld, lambda _b: data)),
                allowed,
            )
        )

    fv("json_bad", "json", b'{"i": 1,', CORRUPT)
    fv("json_deep_list", "json", b"[" * 100_000, CORRUPT)
    fv("json_deep_list_closed", "json", b"[" * 50_000 + b"]" * 50_000, MAYBE)
    fv("json_deep_object", "json", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, MAYBE)
    fv("json_invalid_utf8", "json", b'{"u": "\xff\xfe"}', CORRUPT)
    fv("json_lone_surrogate", "json", b'{"u": "\\ud800"}', MAYBE)
    fv("json_nan_literal", "json", b'{"u": NaN}', MAYBE)
    fv("json_top_level_number", "json", b"42", MAYBE)
    fv("json_empty", "json", b"", CORRUPT)
    fv("json_huge_int", "json", b'{"i": ' + b"9" * 5000 + b"}", MAYBE)
    fv("cls_2_pow_70", "cls", str(2**70).encode(), CORRUPT)
    fv("cls_neg_2_pow_70", "cls", str(-(2**70)).encode(), CORRUPT)
    fv("cls_int64_max", "cls", str(2**63 - 1).encode(), VALID)
    fv("cls_int64_min", "cls", str(-(2**63)).encode(), VALID)
    fv("cls_5000_digits", "cls", b"7" * 5000, CORRUPT)
    fv("cls_text", "cls", b"abc", CORRUPT)
    fv("cls_empty", "cls", b"", CORRUPT)
    fv("cls_float", "cls", b"5.0", CORRUPT)
    fv("cls_hex", "cls", b"0x10", CORRUPT)
    fv("cls_whitespace", "cls", b" 5 \n", MAYBE)
    fv("cls_underscore", "cls", b"1_000", MAYBE)
    fv("cls_non_ascii_digit", "cls", "٣".encode(), CORRUPT)
    fv("cls_invalid_utf8", "cls", b"\xff", CORRUPT)
    fv("txt_invalid_utf8", "txt", b"caption \xff\xfe \xc3", CORRUPT)
    fv("txt_empty", "txt", b"", VALID)
    fv("txt_nul_bytes", "txt", b"a\0b\0", VALID)
    fv("txt_bom", "txt", b"\xef\xbb\xbfcaption", VALID)
    fv("txt_surrogate_bytes", "txt", b"\xed\xa0\x80", CORRUPT)
    return out


@functools.lru_cache(maxsize=1)
def _all() -> tuple[Variant, ...]:
    vs = _tar_variants() + _table_variants() + _media_variants() + _field_variants()
    names = [v.name for v in vs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate variant names: {sorted(dup)}")
    return tuple(vs)


def variants() -> list[Variant]:
    """Every variant of the matrix, in a fixed order."""
    return list(_all())


def get_variant(name: str) -> Variant:
    for v in _all():
        if v.name == name:
            return v
    raise KeyError(name)


def build_variant(v: Variant, root: Path) -> Path:
    """Write variant ``v`` into ``root/<name>/`` with its ``spec.json``; returns that folder."""
    d = root / v.name
    d.mkdir(parents=True, exist_ok=True)
    built = v.build(d)
    (d / "spec.json").write_text(json.dumps(built.to_json()))
    return d


def load_built(d: Path | str) -> Built:
    return Built.from_json(json.loads((Path(d) / "spec.json").read_text()))


if __name__ == "__main__":  # pragma: no cover - a quick listing
    import sys

    for v in variants():
        sys.stdout.write(f"{v.family:14s} {v.name}\n")
    sys.stdout.write(f"{len(variants())} variants\n")
    os._exit(0)
