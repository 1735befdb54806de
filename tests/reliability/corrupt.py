"""The corrupt-data matrix: variants of small, valid data sets, each damaged one way.

A :class:`Variant` writes its data into a directory and says what an intact read would hold
(``intact``: key -> shard), what the loader is given (``kwargs``) and which outcomes the
contract allows in each mode: ``"complete"`` (the epoch ends; in ``skip`` mode every intact key
is yielded or listed) or ``"error"`` (an mmload error naming the shard). ``variants(root)``
builds the whole matrix; ``tests/reliability/test_matrix.py`` runs it.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from mmload import AudioConfig, ImageConfig, VideoConfig

__all__ = ["Variant", "variants"]

ERROR = frozenset({"error"})
COMPLETE = frozenset({"complete"})
EITHER = frozenset({"complete", "error"})
PIL = ImageConfig(size=16, backend="pil")


@dataclass
class Variant:
    name: str
    family: str
    build: Callable[[Path], Any]  # writes the data, returns the Loader's source
    intact: dict[str, str]  # key -> shard file name (relative to the variant's dir)
    allowed: dict[str, frozenset[str]]  # mode -> allowed outcomes
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    extra_keys_ok: bool = False  # a damaged name may read as another, new key


# -- building blocks -------------------------------------------------------------------------------


def _jpegs() -> list[bytes]:
    from mmload.demo import load_photos, make_jpeg

    photos = load_photos()
    rng = np.random.default_rng(0)
    return [make_jpeg(photos[i % len(photos)][1], rng, (24 + i, 20 + i)) for i in range(12)]


def _image(fmt: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _wav(seed: int) -> bytes:
    x = (np.sin(np.arange(2000) / (3 + seed)) * 20000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(x.tobytes())
    return buf.getvalue()


def _flac(seed: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf, np.sin(np.arange(2000) / (3 + seed)).astype(np.float32) * 0.5, 8000, format="FLAC"
    )
    return buf.getvalue()


def _mp4(seed: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        rng = np.random.default_rng(seed)
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), np.uint8), "rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


Members = list[tuple[str | bytes, bytes]]


def _samples(shard: int, n: int, jpegs: list[bytes], media: str = "jpg") -> Members:
    out: Members = []
    for i in range(n):
        k = f"s{shard}_{i:02d}"
        makers: dict[str, Callable[[int], bytes]] = {
            "jpg": lambda j: jpegs[(shard * n + j) % len(jpegs)],
            "png": lambda j: _image("PNG", j),
            "webp": lambda j: _image("WEBP", j),
            "wav": _wav,
            "flac": _flac,
            "mp4": _mp4,
        }
        data = makers[media](i)
        out += [
            (f"{k}.{media}", data),
            (f"{k}.cls", b"%d" % i),
            (f"{k}.json", b'{"i": %d}' % i),
            (f"{k}.txt", f"caption {i}".encode()),
        ]
    return out


def _tar_bytes(members: Members, fmt: int = tarfile.USTAR_FORMAT, encoding: str = "utf-8") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding=encoding) as t:
        for name, data in members:
            info = tarfile.TarInfo(name if isinstance(name, str) else name.decode(encoding))
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_tar(path: Path, members: Members) -> None:
    path.write_bytes(_tar_bytes(members))


def _layout(raw: bytes) -> list[tuple[int, int, int]]:
    """(header offset, data offset, size) of each member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        return [(m.offset, m.offset_data, m.size) for m in t.getmembers()]


def _keys(members: Members, shard: str, encoding: str = "utf-8") -> dict[str, str]:
    """Sample key -> shard, as mmload names samples (directory + file name up to its first dot)."""
    out: dict[str, str] = {}
    for name, _ in members:
        raw = name.encode(encoding) if isinstance(name, str) else name
        n = raw.decode("utf-8", "surrogateescape")  # how the tar scan decodes member names
        d, sep, f = n.rpartition("/")
        out[d + sep + f.split(".", 1)[0]] = shard
    return out


def _fix_checksum(h: bytearray) -> None:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)


def _set_header(raw: bytes, offset: int, lo: int, hi: int, value: bytes, fix: bool = True) -> bytes:
    h = bytearray(raw[offset : offset + 512])
    h[lo:hi] = value.ljust(hi - lo, b"\0")[: hi - lo]
    if fix:
        _fix_checksum(h)
    return raw[:offset] + bytes(h) + raw[offset + 512 :]


def _flip(raw: bytes, rng: random.Random, lo: int = 0, n: int = 1) -> bytes:
    b = bytearray(raw)
    for _ in range(n):
        i = rng.randrange(lo, len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


# -- tar variants ------------------------------------------------------------------------------------


class _TarBase:
    """Two tar shards of 6 samples each; variants damage shard a (``a.tar``)."""

    def __init__(self, jpegs: list[bytes]) -> None:
        self.a = _samples(0, 6, jpegs)
        self.b = _samples(1, 6, jpegs)
        self.raw_a = _tar_bytes(self.a)
        self.intact = {**_keys(self.a, "a.tar"), **_keys(self.b, "b.tar")}

    def variant(
        self,
        name: str,
        damage: Callable[[bytes], bytes] | bytes,
        allowed: dict[str, frozenset[str]],
        *,
        family: str = "tar",
        intact: dict[str, str] | None = None,
        suffix: str = ".tar",
        extra_keys_ok: bool = False,
    ) -> Variant:
        def build(d: Path) -> list[str]:
            a = d / f"a{suffix}"
            a.write_bytes(damage(self.raw_a) if callable(damage) else damage)
            _write_tar(d / "b.tar", self.b)
            return [str(a), str(d / "b.tar")]

        keys = dict(intact if intact is not None else self.intact)
        if suffix != ".tar":
            keys = {k: (f"a{suffix}" if s == "a.tar" else s) for k, s in keys.items()}
        return Variant(name, family, build, keys, allowed, {"image": PIL}, 4, extra_keys_ok)


RAISE_ERR = {"raise": ERROR, "skip": COMPLETE}
BENIGN = {"raise": COMPLETE, "skip": COMPLETE}
MAYBE = {"raise": EITHER, "skip": COMPLETE}


def _tar_variants(jpegs: list[bytes]) -> list[Variant]:
    base = _TarBase(jpegs)
    raw = base.raw_a
    lay = _layout(raw)
    end = lay[-1][1] + -(-lay[-1][2] // 512) * 512
    out: list[Variant] = []
    # Truncation at every kind of boundary.
    for cut in (0, 1, 100, 511):
        out.append(base.variant(f"cut-at-{cut}", raw[:cut], RAISE_ERR, family="tar-truncate"))
    for i, (hdr, data, size) in enumerate(lay):
        if i > 0:
            out.append(
                base.variant(
                    f"cut-header-boundary-{i}", raw[:hdr], RAISE_ERR, family="tar-truncate"
                )
            )
            out.append(
                base.variant(
                    f"cut-inside-header-{i}", raw[: hdr + 200], RAISE_ERR, family="tar-truncate"
                )
            )
        if i % 2 == 0:
            out.append(
                base.variant(
                    f"cut-inside-data-{i}",
                    raw[: data + size // 2],
                    RAISE_ERR,
                    family="tar-truncate",
                )
            )
        if size % 512 and i % 2 == 1:
            out.append(
                base.variant(
                    f"cut-inside-padding-{i}",
                    raw[: data + size + 1],
                    RAISE_ERR,
                    family="tar-truncate",
                )
            )
    out.append(
        base.variant("cut-after-last-member-no-eoa", raw[:end], RAISE_ERR, family="tar-truncate")
    )
    out.append(base.variant("cut-inside-eoa", raw[: end + 512], BENIGN, family="tar-truncate"))
    out.append(
        base.variant(
            "eoa-one-block-then-zeros",
            raw[: end + 512] + b"\0" * 100,
            BENIGN,
            family="tar-truncate",
        )
    )
    zero_then_data = raw[: lay[8][0]] + b"\0" * 512 + raw[lay[8][0] :]
    out.append(
        base.variant("zero-block-then-data", zero_then_data, RAISE_ERR, family="tar-truncate")
    )
    # Header fields: garbage, negative, huge; checksums.
    for i in (0, 5, len(lay) - 1):
        hdr = lay[i][0]
        for label, value in [
            ("size-garbage", b"zzzzzzzzzzz"),
            ("size-negative-octal", b"-0000000001"),
            ("size-negative-b256", b"\xff" * 12),
            ("size-huge", b"77777777777"),
            ("size-underscore", b"0_1"),
        ]:
            out.append(
                base.variant(
                    f"{label}-member{i}",
                    lambda r, h=hdr, v=value: _set_header(r, h, 124, 136, v),
                    RAISE_ERR,
                    family="tar-header",
                )
            )
        out.append(
            base.variant(
                f"bad-checksum-member{i}",
                lambda r, h=hdr: _set_header(r, h, 0, 1, b"Q", fix=False),
                RAISE_ERR,
                family="tar-header",
            )
        )
        out.append(
            base.variant(
                f"mode-mtime-garbage-member{i}",
                lambda r, h=hdr: _set_header(
                    _set_header(r, h, 100, 108, b"zz"), h, 136, 148, b"zz"
                ),
                BENIGN,
                family="tar-header",
            )
        )
        out.append(
            base.variant(
                f"unknown-typeflag-member{i}",
                lambda r, h=hdr: _set_header(r, h, 156, 157, b"S"),
                RAISE_ERR,
                family="tar-header",
            )
        )
    # Links, devices, FIFOs, directories.
    for kind, tflag in [
        ("symlink", tarfile.SYMTYPE),
        ("hardlink", tarfile.LNKTYPE),
        ("chardev", tarfile.CHRTYPE),
        ("blockdev", tarfile.BLKTYPE),
        ("fifo", tarfile.FIFOTYPE),
    ]:

        def special(_raw: bytes, t: bytes = tflag) -> bytes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in base.a:
                    info = tarfile.TarInfo(str(name))
                    if name == "s0_02.jpg":  # one member of a sample
                        info.type, info.linkname = t, "s0_00.jpg"
                        tf.addfile(info)
                        continue
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                extra = tarfile.TarInfo("s0_99.jpg")  # a sample made only of this member
                extra.type, extra.linkname = t, "s0_00.jpg"
                tf.addfile(extra)
            return buf.getvalue()

        out.append(
            base.variant(
                f"{kind}-members",
                special,
                RAISE_ERR,
                family="tar-special",
                intact={**base.intact, "s0_99": "a.tar"},
            )
        )

    def with_dirs(_raw: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for name, data in base.a:
                info = tarfile.TarInfo(str(name))
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out.append(base.variant("directory-entries", with_dirs, BENIGN, family="tar-special"))
    # Long names, PAX/GNU headers, odd names.
    long = [(f"{'d' * 120}/{n}", d) for n, d in base.a]
    long_keys = {**_keys(long, "a.tar"), **_keys(base.b, "b.tar")}
    for label, fmt in [("gnu-longname", tarfile.GNU_FORMAT), ("pax-path", tarfile.PAX_FORMAT)]:
        out.append(
            base.variant(label, _tar_bytes(long, fmt), BENIGN, family="tar-names", intact=long_keys)
        )
    pax_raw = _tar_bytes(
        long, tarfile.PAX_FORMAT
    )  # member 0: an 'x' header, its record, the member
    pax_bad = pax_raw[:512] + b"99 path=x\n".ljust(512, b"\0") + pax_raw[1024:]
    out.append(
        base.variant("pax-record-corrupt", pax_bad, RAISE_ERR, family="tar-names", intact=long_keys)
    )
    gnu_raw = _tar_bytes(long, tarfile.GNU_FORMAT)  # member 0: an 'L' header first
    out.append(
        base.variant(
            "gnu-longname-size-huge",
            _set_header(gnu_raw, 0, 124, 136, b"7777777777"),
            RAISE_ERR,
            family="tar-names",
            intact=long_keys,
        )
    )
    for label, prefix, enc in [
        ("dotdot", "../", "utf-8"),
        ("absolute", "/abs/", "utf-8"),
        ("non-utf8", "caf\xe9/", "latin-1"),
    ]:
        named: Members = [(prefix + str(n), d) for n, d in base.a]
        keys = {**_keys(named, "a.tar", enc), **_keys(base.b, "b.tar")}
        out.append(
            base.variant(
                f"names-{label}",
                _tar_bytes(named, encoding=enc),
                BENIGN,
                family="tar-names",
                intact=keys,
            )
        )
    # Structure: duplicates, non-contiguous samples.
    dup = [*base.a[:4], base.a[1], *base.a[4:]]
    out.append(base.variant("duplicate-field", _tar_bytes(dup), RAISE_ERR, family="tar-structure"))
    noncontig = [*base.a[:2], *base.a[4:8], *base.a[2:4], *base.a[8:]]
    out.append(
        base.variant(
            "non-contiguous-sample", _tar_bytes(noncontig), RAISE_ERR, family="tar-structure"
        )
    )
    # gzip.
    gz = gzip.compress(raw)
    out.append(base.variant("gzip-intact", gz, BENIGN, family="tar-gzip", suffix=".tar.gz"))
    out.append(
        base.variant(
            "gzip-truncated", gz[: len(gz) // 2], RAISE_ERR, family="tar-gzip", suffix=".tar.gz"
        )
    )
    out.append(
        base.variant(
            "gzip-bitflip",
            _flip(gz, random.Random(3), lo=20, n=3),
            RAISE_ERR,
            family="tar-gzip",
            suffix=".tar.gz",
        )
    )
    # Random bit flips anywhere in the shard (headers: corrupt; data: maybe benign).
    for s in range(10):
        out.append(
            base.variant(
                f"bitflip-{s}",
                lambda r, s=s: _flip(r, random.Random(s), n=2),
                MAYBE,
                family="tar-bitflip",
                extra_keys_ok=True,
            )
        )
    return out


# -- table variants ----------------------------------------------------------------------------------


def _table(prefix: str, n: int, jpegs: list[bytes], start: int = 0) -> pa.Table:
    return pa.table(
        {
            "__key__": [f"{prefix}{i:02d}" for i in range(n)],
            "jpg": [jpegs[(start + i) % len(jpegs)] for i in range(n)],
            "cls": pa.array(range(start, start + n), pa.int64()),
            "txt": [f"caption {i}" for i in range(n)],
        }
    )


def _encode(t: pa.Table, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "parquet":
        pq.write_table(t, buf, row_group_size=4)
    elif kind == "arrow":
        with ipc.new_file(buf, t.schema) as w:
            for b in t.to_batches(max_chunksize=4):
                w.write_batch(b)
    else:
        with ipc.new_stream(buf, t.schema) as w:
            for b in t.to_batches(max_chunksize=4):
                w.write_batch(b)
    return buf.getvalue()


def _table_variants(jpegs: list[bytes]) -> list[Variant]:
    out: list[Variant] = []
    ta, tb = _table("a", 8, jpegs), _table("b", 8, jpegs, 8)
    for kind, ext in [("parquet", "parquet"), ("arrow", "arrow"), ("stream", "arrow")]:
        raw_a, raw_b = _encode(ta, kind), _encode(tb, kind)
        intact = {f"a{i:02d}": f"a.{ext}" for i in range(8)} | {
            f"b{i:02d}": f"b.{ext}" for i in range(8)
        }

        def v(
            name: str,
            damage: Callable[[bytes], bytes] | bytes,
            allowed: dict[str, frozenset[str]],
            fam: str,
            raw_a: bytes = raw_a,
            raw_b: bytes = raw_b,
            ext: str = ext,
            intact: dict[str, str] = intact,
        ) -> Variant:
            def build(d: Path) -> list[str]:
                (d / f"a.{ext}").write_bytes(damage(raw_a) if callable(damage) else damage)
                (d / f"b.{ext}").write_bytes(raw_b)
                return [str(d / f"a.{ext}"), str(d / f"b.{ext}")]

            label = f"{kind}-{name}"  # noqa: B023 - v() is called inside this iteration
            return Variant(label, fam, build, intact, allowed, {"image": PIL}, 6)

        for frac in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            out.append(
                v(
                    f"truncated-{int(frac * 100)}pct",
                    raw_a[: int(len(raw_a) * frac)],
                    RAISE_ERR,
                    "table-truncate",
                )
            )
        if kind == "stream":  # cut exactly at message boundaries: the stream still parses
            for cut in range(len(raw_a) - 8, 8, -8):
                try:
                    rows = sum(b.num_rows for b in ipc.open_stream(raw_a[:cut]))
                except (pa.ArrowInvalid, OSError):
                    continue
                out.append(
                    v(
                        f"cut-at-message-boundary-{rows}rows",
                        raw_a[:cut],
                        RAISE_ERR,
                        "table-truncate",
                    )
                )
        for s in range(6):
            out.append(
                v(
                    f"bitflip-{s}",
                    lambda r, s=s: _flip(r, random.Random(100 + s), lo=8, n=3),
                    MAYBE,
                    "table-bitflip",
                )
            )
        out.append(v("footer-damaged", lambda r: r[:-12] + b"\x07" * 12, RAISE_ERR, "table-footer"))
        out.append(
            v("magic-damaged", lambda r: b"XXXX" + r[4:-4] + b"XXXX", RAISE_ERR, "table-footer")
        )
        if kind != "parquet":
            continue

        # Schema and value variants (Parquet).
        def pv(
            name: str,
            table: pa.Table,
            allowed: dict[str, frozenset[str]],
            fam: str = "table-schema",
            keys: dict[str, str] = intact,
            swap: bool = False,
        ) -> Variant:
            def build(d: Path) -> list[str]:  # ``table`` replaces file a (b with ``swap``)
                pq.write_table(ta if swap else table, d / "a.parquet", row_group_size=4)
                pq.write_table(table if swap else tb, d / "b.parquet", row_group_size=4)
                return [str(d / "a.parquet"), str(d / "b.parquet")]

            return Variant(f"parquet-{name}", fam, build, keys, allowed, {"image": PIL}, 6)

        out.append(pv("key-column-missing", ta.drop_columns(["__key__"]), RAISE_ERR))
        # Every row of the epoch's first batch is bad: it repeats the rank's first good sample.
        out.append(pv("media-column-missing", ta.drop_columns(["jpg"]), RAISE_ERR))
        out.append(pv("media-missing-in-b", tb.drop_columns(["jpg"]), RAISE_ERR, swap=True))
        out.append(
            pv(
                "cls-as-string",
                ta.set_column(2, "cls", pa.array([str(i) for i in range(8)])),
                RAISE_ERR,
            )
        )
        out.append(
            pv(
                "cls-as-float",  # pinned float by file a: file b's ints conform
                ta.set_column(2, "cls", pa.array([i + 0.5 for i in range(8)])),
                BENIGN,
            )
        )
        floats_b = tb.set_column(2, "cls", pa.array([i + 0.5 for i in range(8)]))
        out.append(pv("cls-as-float-in-b", floats_b, RAISE_ERR, swap=True))
        out.append(
            pv("cls-as-int32", ta.set_column(2, "cls", pa.array(range(8), pa.int32())), BENIGN)
        )
        out.append(pv("extra-column", ta.append_column("extra", pa.array(range(8))), RAISE_ERR))
        out.append(
            pv(
                "null-key-row0",
                ta.set_column(0, "__key__", pa.array([None, *[f"a{i:02d}" for i in range(1, 8)]])),
                RAISE_ERR,
                "table-nulls",
            )
        )
        out.append(
            pv(
                "null-jpg",
                ta.set_column(
                    1,
                    "jpg",
                    pa.array([None if i == 3 else jpegs[i] for i in range(8)], pa.binary()),
                ),
                RAISE_ERR,
                "table-nulls",
            )
        )
        out.append(
            pv(
                "null-cls",
                ta.set_column(
                    2, "cls", pa.array([None if i == 5 else i for i in range(8)], pa.int64())
                ),
                RAISE_ERR,
                "table-nulls",
            )
        )
        out.append(
            pv(
                "null-txt",
                ta.set_column(3, "txt", pa.array([None if i == 2 else "t" for i in range(8)])),
                BENIGN,
                "table-nulls",
            )
        )
        bad_utf8 = pa.array([b"\xff\xfe" if i == 4 else b"ok" for i in range(8)], pa.binary()).view(
            pa.string()
        )
        out.append(
            pv("invalid-utf8-txt", ta.set_column(3, "txt", bad_utf8), RAISE_ERR, "table-values")
        )
        out.append(
            pv(
                "uint64-beyond-int64",
                ta.set_column(2, "cls", pa.array([2**63 + i for i in range(8)], pa.uint64())),
                RAISE_ERR,
                "table-values",
            )
        )
        some_big = pa.array([2**63 if i == 5 else i for i in range(8)], pa.uint64())
        out.append(
            pv(
                "uint64-one-beyond-int64",
                ta.set_column(2, "cls", some_big),
                RAISE_ERR,
                "table-values",
            )
        )
        out.append(
            pv(
                "one-file-zero-rows",
                ta.slice(0, 0),
                BENIGN,
                "table-empty",
                keys={k: s for k, s in intact.items() if s == "b.parquet"},
            )
        )

        def zero(d: Path) -> list[str]:
            for n in ("a", "b"):
                pq.write_table(ta.slice(0, 0), d / f"{n}.parquet")
            return [str(d / "a.parquet"), str(d / "b.parquet")]

        out.append(
            Variant(
                "parquet-all-files-zero-rows",
                "table-empty",
                zero,
                {},
                {"raise": ERROR, "skip": ERROR},
                {"image": PIL},
                6,
            )
        )
        nested = {
            "ragged-list": pa.array([list(range(i % 3 + 1)) for i in range(8)]),
            "list-of-lists": pa.array([[[i], [i, i]] for i in range(8)]),
            "struct": pa.array([{"x": i, "y": str(i)} for i in range(8)]),
        }
        for label, col in nested.items():
            nt_a = ta.append_column("nested", col)
            nt_b = tb.append_column("nested", col)

            def nb(d: Path, nt_a: pa.Table = nt_a, nt_b: pa.Table = nt_b) -> list[str]:
                pq.write_table(nt_a, d / "a.parquet", row_group_size=4)
                pq.write_table(nt_b, d / "b.parquet", row_group_size=4)
                return [str(d / "a.parquet"), str(d / "b.parquet")]

            out.append(
                Variant(
                    f"parquet-nested-{label}", "table-nested", nb, intact, BENIGN, {"image": PIL}, 6
                )
            )
    return out


# -- media and field variants (inside otherwise valid tar shards) -------------------------------------


def _member_variants(jpegs: list[bytes]) -> list[Variant]:
    out: list[Variant] = []

    def one(
        name: str,
        family: str,
        media: str,
        member: str,
        damage: Callable[[bytes], bytes],
        allowed: dict[str, frozenset[str]],
        kwargs: dict[str, Any],
    ) -> Variant:
        a = _samples(0, 6, jpegs, media)
        b = _samples(1, 6, jpegs, media)
        damaged = [(n, damage(d) if n == f"s0_02.{member}" else d) for n, d in a]

        def build(d: Path) -> list[str]:
            _write_tar(d / "a.tar", damaged)
            _write_tar(d / "b.tar", b)
            return [str(d / "a.tar"), str(d / "b.tar")]

        return Variant(
            name, family, build, {**_keys(a, "a.tar"), **_keys(b, "b.tar")}, allowed, kwargs
        )

    audio = {"audio": AudioConfig(sample_rate=8000, seconds=0.2), "image": PIL}
    video = {"video": VideoConfig(frames=2, stride=1, size=(16, 16)), "image": PIL}
    media = [
        ("jpg", {"image": PIL}),
        ("png", {"image": PIL}),
        ("webp", {"image": PIL}),
        ("wav", audio),
        ("flac", audio),
        ("mp4", video),
    ]
    for fmt, kw in media:
        damages: dict[str, tuple[Callable[[bytes], bytes], dict[str, frozenset[str]]]] = {
            "truncated-half": (lambda d: d[: len(d) // 2], RAISE_ERR),
            "truncated-10-bytes": (lambda d: d[:10], RAISE_ERR),
            "garbage": (lambda d: bytes(range(256)) * 2, RAISE_ERR),
            "empty": (lambda d: b"", RAISE_ERR),
            "bitflip-a": (lambda d: _flip(d, random.Random(1), lo=len(d) // 3, n=4), MAYBE),
            "bitflip-b": (lambda d: _flip(d, random.Random(2), lo=len(d) // 2, n=8), MAYBE),
        }
        for label, (fn, allowed) in damages.items():
            out.append(one(f"{fmt}-{label}", f"media-{fmt}", fmt, fmt, fn, allowed, kw))

    # Decompression bombs: headers claiming 100000 x 100000 pixels.
    def jpeg_bomb(d: bytes) -> bytes:  # SOF: FF Cx, length, precision, height, width
        i = min(j for j in (d.find(b"\xff\xc0"), d.find(b"\xff\xc2")) if j >= 0)
        return d[: i + 5] + b"\xff\xff\xff\xff" + d[i + 9 :]

    def png_bomb(d: bytes) -> bytes:
        return d[:16] + (100000).to_bytes(4, "big") * 2 + d[24:]

    out.append(
        one("jpg-bomb-header", "media-bomb", "jpg", "jpg", jpeg_bomb, RAISE_ERR, {"image": PIL})
    )
    out.append(
        one("png-bomb-header", "media-bomb", "png", "png", png_bomb, RAISE_ERR, {"image": PIL})
    )
    out.append(
        one(
            "jpg-bomb-header-default-backend",
            "media-bomb",
            "jpg",
            "jpg",
            jpeg_bomb,
            RAISE_ERR,
            {"image": ImageConfig(size=16)},
        )
    )
    out.append(
        one(
            "jpg-truncated-default-backend",
            "media-jpg",
            "jpg",
            "jpg",
            lambda d: d[: len(d) // 2],
            RAISE_ERR,
            {"image": ImageConfig(size=16)},
        )
    )
    out.append(
        one(
            "jpg-garbage-default-backend",
            "media-jpg",
            "jpg",
            "jpg",
            lambda d: b"\xff\xd8\xff" + bytes(300),
            RAISE_ERR,
            {"image": ImageConfig(size=16)},
        )
    )
    # Value fields.
    for label, member, content in [
        ("json-invalid", "json", b"{not json"),
        ("json-deep", "json", b"[" * 100_000),
        ("json-invalid-utf8", "json", b'{"a": "\xff"}'),
        ("json-empty", "json", b""),
        ("cls-beyond-int64", "cls", str(2**70).encode()),
        ("cls-negative-beyond-int64", "cls", b"-" + str(2**70).encode()),
        ("cls-not-a-number", "cls", b"abc"),
        ("cls-empty", "cls", b""),
        ("cls-huge-digits", "cls", b"9" * 5000),
        ("txt-invalid-utf8", "txt", b"caf\xe9"),
    ]:
        out.append(
            one(label, "fields", "jpg", member, lambda _d, c=content: c, RAISE_ERR, {"image": PIL})
        )
    return out


def _idx_variants(jpegs: list[bytes]) -> list[Variant]:
    base = _TarBase(jpegs)
    lay = _layout(base.raw_a)
    good_lines = []
    for s in range(6):
        parts = []
        for m in range(4 * s, 4 * s + 4):
            name = str(base.a[m][0])
            ext = name.split(".", 1)[1]
            parts.append(f"{ext} {lay[m][1]} {lay[m][2]} {name}")
        good_lines.append(" ".join(parts))
    good = "v1.2 6\n" + "\n".join(good_lines) + "\n"
    texts = {
        "idx-intact": (good, BENIGN),
        "idx-header-garbage": ("v1.2 abc\n" + "\n".join(good_lines) + "\n", RAISE_ERR),
        "idx-header-v1.1": ("v1.1 6\n" + "\n".join(good_lines) + "\n", RAISE_ERR),
        "idx-wrong-count": ("v1.2 7\n" + "\n".join(good_lines) + "\n", RAISE_ERR),
        "idx-offset-past-end": (good.replace(f" {lay[5][1]} ", " 99999999 ", 1), RAISE_ERR),
        "idx-negative-size": (good.replace(f" {lay[5][2]} ", " -5 ", 1), RAISE_ERR),
        "idx-key-with-space": (good.replace("s0_01.", "s0 01."), RAISE_ERR),
        "idx-empty": ("", RAISE_ERR),
        "idx-binary-garbage": (bytes(range(256)).decode("latin-1"), RAISE_ERR),
    }
    out = []
    for name, (text, allowed) in texts.items():

        def build(d: Path, text: str = text, name: str = name) -> list[str]:
            (d / "a.tar").write_bytes(base.raw_a)
            (d / "a.idx").write_text(text, encoding="latin-1" if "garbage" in name else "utf-8")
            _write_tar(d / "b.tar", base.b)
            return [str(d / "a.tar"), str(d / "b.tar")]

        out.append(Variant(name, "dali-idx", build, base.intact, allowed, {"image": PIL}))
    return out


def variants() -> list[Variant]:
    """The whole matrix (builders are lazy: nothing is written until ``build`` is called)."""
    jpegs = _jpegs()
    return (
        _tar_variants(jpegs)
        + _table_variants(jpegs)
        + _member_variants(jpegs)
        + _idx_variants(jpegs)
    )
