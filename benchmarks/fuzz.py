"""Mutation fuzzing of mmload's parsers: tar index, DALI .idx, Arrow IPC, Parquet, image headers,
value fields and audio.

Usage::

    python benchmarks/fuzz.py --iterations 10000 --seed 0 [--parsers tar,idx,...] [--out DIR]
    python benchmarks/fuzz.py --replay DIR/tar-crash-123.bin --parsers tar

Every parser starts from a few valid seed inputs (built in a temporary directory) and runs
``--iterations`` mutated inputs (bit flips, byte insert/delete, chunk duplication, truncation,
interesting-integer overwrites; for tars also header field rewrites with the checksum fixed up).
Input ``i`` of a parser is a pure function of (seed, parser, i), so every finding is reproducible.

The contract checked: on any bytes a parser succeeds or raises an mmload error (``MmloadError``;
``ValueError`` for ``decode_value``/``decode_audio``, which the batch decoder converts), never
hangs, never crashes the process, and what it returns is consistent (a tar index lists only
members inside the file and loses nothing a reference walk finds; image sizes are positive and
within the caps; an ``int`` field fits in int64; ...). Inputs run in chunks in forked child
processes: a crash kills only its chunk; the input being run when a child died (or stopped
reporting for ``--hang-seconds``) is the culprit, is saved to ``--out`` and rerun alone to
confirm; the rest of the chunk continues in a fresh child.

Exit status 1 when any crash, hang, foreign exception or violated invariant was found.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import resource
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Report, environment

PARSERS = ("tar", "idx", "arrow", "parquet", "header", "fields", "audio", "wave")

# --------------------------------------------------------------------------------------------
# mutations


_INTS = [0, 1, 2, 7, 8, 16, 32, 64, 100, 127, 128, 255, 256, 511, 512, 513, 1000, 1024, 4096]
_INTS += [32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]


class Violation(Exception):
    """A broken invariant (not an exception the code under test raised)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def _bitflip(rng: random.Random, b: bytearray) -> str:
    if not b:
        return "bitflip(empty)"
    k = rng.choice((1, 1, 1, 2, 4, 8))
    pos = [rng.randrange(len(b)) for _ in range(k)]
    for p in pos:
        b[p] ^= 1 << rng.randrange(8)
    return f"bitflip{pos}"


def _overwrite(rng: random.Random, b: bytearray) -> str:
    if not b:
        return "overwrite(empty)"
    p = rng.randrange(len(b))
    n = rng.choice((1, 1, 2, 4, 16, 64))
    fill = rng.choice(("rand", "zero", "ff"))
    for j in range(p, min(len(b), p + n)):
        b[j] = rng.randrange(256) if fill == "rand" else (0 if fill == "zero" else 0xFF)
    return f"overwrite({p},{n},{fill})"


def _interesting(rng: random.Random, b: bytearray) -> str:
    if not b:
        return "int(empty)"
    v = rng.choice(_INTS)
    if rng.random() < 0.3:
        v = -v
    width = rng.choice((1, 2, 4, 8))
    order = rng.choice(("little", "big"))
    raw = (v % (1 << (8 * width))).to_bytes(width, order)
    p = rng.randrange(len(b))
    b[p : p + width] = raw
    return f"int({p},{v},{width},{order})"


def _insert(rng: random.Random, b: bytearray) -> str:
    p = rng.randrange(len(b) + 1)
    n = rng.choice((1, 1, 3, 16, 100, 512, 1000))
    b[p:p] = bytes(rng.randrange(256) for _ in range(n))
    return f"insert({p},{n})"


def _delete(rng: random.Random, b: bytearray) -> str:
    if not b:
        return "delete(empty)"
    p = rng.randrange(len(b))
    n = rng.choice((1, 1, 3, 16, 100, 512, 1000))
    del b[p : p + n]
    return f"delete({p},{n})"


def _duplicate(rng: random.Random, b: bytearray) -> str:
    if not b:
        return "dup(empty)"
    a = rng.randrange(len(b))
    n = rng.choice((1, 4, 16, 64, 512, 2048))
    chunk = bytes(b[a : a + n])
    times = rng.choice((1, 1, 2, 8, 100, 2000)) if len(chunk) <= 4 else rng.choice((1, 2, 4))
    p = rng.randrange(len(b) + 1)
    b[p:p] = chunk * times
    return f"dup({a},{len(chunk)},x{times}->{p})"


def _truncate(rng: random.Random, b: bytearray) -> str:
    n = rng.randrange(len(b) + 1)
    del b[n:]
    return f"truncate({n})"


GENERIC: list[Callable[[random.Random, bytearray], str]] = [
    _bitflip,
    _bitflip,
    _overwrite,
    _interesting,
    _interesting,
    _insert,
    _delete,
    _duplicate,
    _truncate,
]


def _mutate_generic(rng: random.Random, data: bytes) -> tuple[bytes, list[str]]:
    b = bytearray(data)
    steps = [rng.choice(GENERIC)(rng, b) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return bytes(b), steps


# --------------------------------------------------------------------------------------------
# targets


@dataclass
class Seed:
    label: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Input:
    data: bytes
    seed: int
    steps: list[str]
    opts: dict[str, Any] = field(default_factory=dict)


class Target:
    """One parser under test: its seeds, how to mutate them, and how to run one input."""

    name = ""
    allowed: tuple[type[BaseException], ...] = ()
    ext = "bin"

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.seeds = self.build_seeds()

    def build_seeds(self) -> list[Seed]:
        raise NotImplementedError

    def make(self, seed: int, i: int) -> Input:
        rng = random.Random(f"{seed}/{self.name}/{i}")
        s = rng.randrange(len(self.seeds))
        if i < len(self.seeds):  # the seeds themselves first: they must all pass
            return self.options(rng, Input(self.seeds[i].data, i, ["seed"]))
        data, steps = self.mutate(rng, self.seeds[s])
        return self.options(rng, Input(data, s, steps))

    def mutate(self, rng: random.Random, seed: Seed) -> tuple[bytes, list[str]]:
        return _mutate_generic(rng, seed.data)

    def options(self, rng: random.Random, inp: Input) -> Input:
        return inp

    def run(self, inp: Input, work: str) -> None:
        raise NotImplementedError


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _small_jpeg() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


# -- tar ------------------------------------------------------------------------------------

_TAR_FIELDS = {  # name: (offset, length)
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "chksum": (148, 8),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 6),
    "version": (263, 2),
    "prefix": (345, 155),
}
_TYPEFLAGS = [b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"g", b"x", b"L", b"K", b"S"]
_TYPEFLAGS += [b"V", b"A", b"\xff", b"9"]
_NAMES = [b"a.jpg", b"noext", b".hidden.jpg", b"a/.b", b"dir/", b"..", b"s000.cls", b"s001.txt"]
_NAMES += [b"x" * 100, b"k.\xff\xfe", b"s005.jpg", b"a/b/c.d.e", b"", b"/abs.jpg", b"k.JPG"]


def _fix_checksum(b: bytearray, pos: int) -> None:
    h = b[pos : pos + 512]
    s = sum(h[:148]) + 8 * 32 + sum(h[156:512])
    b[pos + 148 : pos + 156] = b"%06o\0 " % s


def _numeric(rng: random.Random, length: int, file_size: int) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:  # octal, NUL-terminated
        v = rng.choice([*_INTS, file_size, file_size - 512, file_size + 1, 8**11 - 1])
        text = b"%o" % v
        return (text + b"\0").rjust(length, b"0")[-length:]
    if choice == 1:  # base-256 (GNU), positive or negative
        v = rng.choice(_INTS)
        raw = (v % (1 << (8 * length - 1))).to_bytes(length, "big")
        first = 0x80 | raw[0] if rng.random() < 0.7 else 0xFF
        return bytes([first]) + raw[1:]
    if choice == 2:  # garbage that Python's int() might still accept
        g = rng.choice([b"-1", b"-0", b"+7", b"1_0", b" 12 ", b"0x10", b"\xef\xbc\x98", b"8", b"9"])
        return g.ljust(length, rng.choice((b"\0", b" ")))
    if choice == 3:
        return b" " * length
    if choice == 4:
        return b"\0" * length
    return bytes(rng.randrange(256) for _ in range(length))


class TarTarget(Target):
    name = "tar"
    ext = "tar"

    def build_seeds(self) -> list[Seed]:
        from mmload.sources.write import write_tar_shards

        jpg = _small_jpeg()
        sizes = [0, 1, 511, 512, 513, 1500]
        samples = [
            {
                "__key__": f"s{i:03d}",
                "cls": i,
                "json": {"i": i, "tags": ["a", "b"]},
                "txt": "caption " * i,
                "bin": bytes(range(256)) * 8,
            }
            for i in range(len(sizes))
        ]
        for i, n in enumerate(sizes):
            samples[i]["bin"] = samples[i]["bin"][:n]
            samples[i]["jpg"] = jpg
        p1 = write_tar_shards(samples, os.path.join(self.tmp, "ustar-%d.tar"))[0]
        with open(p1, "rb") as f:
            seeds = [Seed("ustar", f.read())]
        for fmt, label in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
                d = tarfile.TarInfo("dir")
                d.type = tarfile.DIRTYPE
                tf.addfile(d)
                for i in range(4):
                    key = f"dir/{'long' * 30}{i}" if i % 2 else f"dir/k{i}"
                    for fld, data in (("cls", str(i).encode()), ("jpg", jpg), ("txt", b"x" * i)):
                        info = tarfile.TarInfo(f"{key}.{fld}")
                        info.size = len(data)
                        info.mtime = 1_700_000_000
                        tf.addfile(info, io.BytesIO(data))
            seeds.append(Seed(label, buf.getvalue()))
        from mmload.sources.tar import scan_tar

        for s in seeds:
            path = os.path.join(self.tmp, f"seed-{s.label}.tar")
            _write(path, s.data)
            idx = scan_tar(path)
            with tarfile.open(path) as tf:
                members = tf.getmembers()
            headers = sorted({m.offset for m in members} | {m.offset_data - 512 for m in members})
            s.meta = {
                "index": idx.to_json(),
                "headers": headers,
                "regions": [
                    (int(o), int(n)) for o, n in zip(idx.offsets, idx.sizes, strict=True) if n
                ],
                "last_end": max(m.offset_data + -(-m.size // 512) * 512 for m in members),
                "complete_at": [  # (end of a sample's last member's padding, sample number)
                    (
                        int(idx.offsets[idx.starts[k + 1] - 1])
                        + -(-int(idx.sizes[idx.starts[k + 1] - 1]) // 512) * 512,
                        k,
                    )
                    for k in range(idx.num_samples)
                ],
            }
        return seeds

    def mutate(self, rng: random.Random, seed: Seed) -> tuple[bytes, list[str]]:
        r = rng.random()
        b = bytearray(seed.data)
        m = seed.meta
        if r < 0.35:  # header field rewrite(s), checksum fixed up most of the time
            steps = []
            for _ in range(rng.choice((1, 1, 2))):
                pos = rng.choice(m["headers"])
                fld = rng.choice(list(_TAR_FIELDS))
                off, length = _TAR_FIELDS[fld]
                if fld == "typeflag":
                    val = rng.choice(_TYPEFLAGS)
                elif fld in ("name", "linkname", "prefix"):
                    val = rng.choice(_NAMES)[:length].ljust(length, b"\0")
                elif fld == "magic":
                    val = rng.choice([b"ustar\0", b"ustar ", b"\0" * 6, b"xxxxxx"])
                else:
                    val = _numeric(rng, length, len(b))
                b[pos + off : pos + off + length] = val
                fix = rng.random() < 0.85 and fld != "chksum"
                if fix:
                    _fix_checksum(b, pos)
                steps.append(f"field({pos},{fld},{val[:24]!r},fix={fix})")
            return bytes(b), steps
        if r < 0.45:  # overwrite bytes inside a member's data only: the index must not change
            o, n = rng.choice(m["regions"])
            p = o + rng.randrange(n)
            k = min(rng.choice((1, 8, 512)), o + n - p)
            b[p : p + k] = bytes(rng.randrange(256) for _ in range(k))
            return bytes(b), [f"data({p},{k})"]
        if r < 0.55:  # truncation, often near a block boundary
            if rng.random() < 0.5:
                n = rng.randrange(len(b) + 1)
            else:
                n = max(0, rng.randrange(len(b) // 512 + 1) * 512 + rng.choice((-1, 0, 0, 1)))
            del b[n:]
            return bytes(b), [f"truncate({n})"]
        if r < 0.65:  # block-aligned duplication / deletion (whole members)
            a = rng.randrange(len(b) // 512) * 512
            n = rng.choice((1, 2, 3, 4)) * 512
            if rng.random() < 0.5:
                p = rng.randrange(len(b) // 512 + 1) * 512
                b[p:p] = b[a : a + n]
                return bytes(b), [f"blockdup({a},{n}->{p})"]
            del b[a : a + n]
            return bytes(b), [f"blockdel({a},{n})"]
        return _mutate_generic(rng, seed.data)

    def run(self, inp: Input, work: str) -> None:
        from mmload.errors import ShardError
        from mmload.sources.dataset import Dataset
        from mmload.sources.tar import TarIndex, scan_tar

        path = os.path.join(work, "x.tar")
        _write(path, inp.data)
        size = len(inp.data)
        res: dict[bool, TarIndex | ShardError] = {}
        for skip in (False, True):
            try:
                res[skip] = scan_tar(path, skip=skip)
            except ShardError as e:
                res[skip] = e
        for skip, idx in res.items():
            if isinstance(idx, TarIndex):
                _check_tar_index(idx, size, skip)
        strict, lenient = res[False], res[True]
        if isinstance(strict, TarIndex):
            if isinstance(lenient, ShardError):
                raise Violation("skip=True raised where skip=False succeeded", lenient.reason)
            if lenient.bad or lenient.to_json() != strict.to_json():
                raise Violation("skip=True index differs from the skip=False one")
        elif isinstance(lenient, TarIndex) and not lenient.bad:
            raise Violation("skip=False raised but skip=True lists nothing bad", strict.reason)
        seed = self.seeds[inp.seed].meta
        if len(inp.steps) == 1 and inp.steps[0].startswith(("data(", "seed")):
            if not isinstance(strict, TarIndex):
                raise Violation("data-only change made the scan fail", strict.reason)
            if strict.to_json() != seed["index"]:
                raise Violation("data-only change altered the index")
        if len(inp.steps) == 1 and inp.steps[0].startswith("truncate("):
            _check_truncation(int(inp.steps[0][9:-1]), seed, strict, lenient)
        # Read every sample found through the public API.
        try:
            ds = Dataset.open(path, skip_bad=True, index_cache=False)
        except ShardError:
            if isinstance(lenient, TarIndex) and lenient.num_samples:
                raise Violation("Dataset.open failed on a tar that scan_tar indexed") from None
            raise
        try:
            got = ds.index(0)
            if not isinstance(lenient, TarIndex) or got.to_json() != lenient.to_json():
                raise Violation("Dataset.open index differs from scan_tar(skip=True)")
            for s in ds.read(np.arange(ds.num_samples)):
                if isinstance(s, ShardError):
                    raise Violation("reading a freshly indexed sample failed", s.reason)
        finally:
            ds.close()
        if isinstance(strict, ShardError):
            raise strict  # counted as an mmload error


def _check_tar_index(idx: Any, size: int, skip: bool) -> None:
    if len(idx.starts) != idx.num_samples + 1 or int(idx.starts[-1]) != len(idx.fields):
        raise Violation("index tables are inconsistent", f"skip={skip}")
    if len(set(idx.keys)) != len(idx.keys):
        raise Violation("index has a duplicate sample key", f"skip={skip}")
    for o, n in zip(idx.offsets.tolist(), idx.sizes.tolist(), strict=True):
        if o < 512 or n < 0 or o + n > size or o % 512:
            raise Violation("index member outside the file", f"offset {o} size {n} of {size}")
    for k in range(idx.num_samples):
        flds = idx.fields[idx.starts[k] : idx.starts[k + 1]]
        if not flds or len(set(flds)) != len(flds):
            raise Violation("sample with no or duplicate fields", idx.keys[k])


def _check_truncation(n: int, seed: dict[str, Any], strict: Any, lenient: Any) -> None:
    """A valid tar cut at byte ``n``: complete iff ``n`` is at/after the last member's padding."""
    from mmload.errors import ShardError

    full = seed["index"]
    if n < seed["last_end"]:
        if not isinstance(strict, ShardError):
            raise Violation("truncated tar scanned without error (skip=False)", f"cut at {n}")
        if not isinstance(lenient, ShardError):
            if not lenient.bad:
                raise Violation("truncated tar: skip=True lists nothing bad", f"cut at {n}")
            want = {
                k: (full["fields"][a:b], full["offsets"][a:b], full["sizes"][a:b])
                for k, a, b in zip(full["keys"], full["starts"], full["starts"][1:], strict=False)
            }
            for k in range(lenient.num_samples):
                a, b = int(lenient.starts[k]), int(lenient.starts[k + 1])
                got = list(
                    zip(
                        lenient.fields[a:b],
                        lenient.offsets[a:b].tolist(),
                        lenient.sizes[a:b].tolist(),
                        strict=True,
                    )
                )
                whole = list(zip(*want.get(lenient.keys[k], ([], [], [])), strict=True))
                if not set(got) <= set(whole):
                    raise Violation(
                        "truncated tar: skip=True indexed a member wrongly", f"cut at {n}"
                    )
                if got != whole and k != lenient.num_samples - 1:
                    # Only the sample at the cut may have lost members (it then lacks a field).
                    raise Violation(
                        "truncated tar: skip=True kept a partial sample before the cut",
                        f"cut at {n}",
                    )
            complete = sum(1 for end, _ in seed["complete_at"] if end <= n)
            if lenient.num_samples < complete - 1:
                raise Violation(
                    "truncated tar: skip=True lost complete samples",
                    f"cut at {n}: kept {lenient.num_samples} of {complete} complete",
                )
    else:  # all data present: a success that lists nothing bad must have every member
        for r in (strict, lenient):
            if not isinstance(r, ShardError) and not r.bad and r.to_json() != full:
                raise Violation("tar cut after its last member lost data", f"cut at {n}")


# -- DALI idx -------------------------------------------------------------------------------

_TOKENS = ["-1", "1e3", "²", "٣", "0x10", "9" * 30, "v1.3", "nan", "+5", "1_0", "\x00", "0", ""]
_TOKENS += ["jpg", "s000.jpg", "a", "99999999999999999999999", "-0", " ", "\u2028", "1\x0b2"]


class IdxTarget(Target):
    name = "idx"
    ext = "idx"

    def build_seeds(self) -> list[Seed]:
        tar = TarTarget(self.tmp)
        self.tars = []
        seeds = []
        for j, s in enumerate(tar.seeds[:2]):
            path = os.path.join(self.tmp, f"idx-{j}.tar")
            _write(path, s.data)
            self.tars.append(path)
            ix = s.meta["index"]
            lines = [f"v1.2 {len(ix['keys'])}"]
            for k, key in enumerate(ix["keys"]):
                a, b = ix["starts"][k], ix["starts"][k + 1]
                lines.append(
                    " ".join(
                        f"{f} {o} {n} {key}.{f}"
                        for f, o, n in zip(
                            ix["fields"][a:b], ix["offsets"][a:b], ix["sizes"][a:b], strict=True
                        )
                    )
                )
            seeds.append(Seed(f"idx-{s.label}", ("\n".join(lines) + "\n").encode(), {"tar": j}))
        return seeds

    def mutate(self, rng: random.Random, seed: Seed) -> tuple[bytes, list[str]]:
        if rng.random() < 0.5:
            text = seed.data.decode()
            lines = text.split("\n")
            li = rng.randrange(len(lines))
            tok = lines[li].split(" ")
            ti = rng.randrange(len(tok))
            new = rng.choice(_TOKENS)
            op = rng.randrange(4)
            if op == 0:
                tok[ti] = new
            elif op == 1:
                tok.insert(ti, new)
            elif op == 2:
                del tok[ti]
            else:
                lines.insert(li, lines[rng.randrange(len(lines))])
            if op < 3:
                lines[li] = " ".join(tok)
            return "\n".join(lines).encode("utf-8", "surrogateescape"), [
                f"token({li},{op},{new!r})"
            ]
        return _mutate_generic(rng, seed.data)

    def run(self, inp: Input, work: str) -> None:
        from mmload.errors import ShardError
        from mmload.sources.dataset import Dataset
        from mmload.sources.tar import read_dali_idx

        tar = self.tars[self.seeds[inp.seed].meta["tar"]]
        path = os.path.join(work, "d.tar")
        if not os.path.exists(path) or os.path.getsize(path) != os.path.getsize(tar):
            shutil.copyfile(tar, path)
        _write(path + ".idx", inp.data)
        size = os.path.getsize(path)
        idx = read_dali_idx(path + ".idx", path)
        _check_tar_index_loose(idx, size)
        try:
            ds = Dataset.open(path, index_cache=False)
        except ShardError as e:
            raise Violation("Dataset.open failed where read_dali_idx succeeded", e.reason) from None
        try:
            for s in ds.read(np.arange(ds.num_samples)):
                if isinstance(s, ShardError):
                    raise Violation("reading a sample of a valid .idx failed", s.reason)
        finally:
            ds.close()


def _check_tar_index_loose(idx: Any, size: int) -> None:
    for o, n in zip(idx.offsets.tolist(), idx.sizes.tolist(), strict=True):
        if o < 0 or n < 0 or o + n > size:
            raise Violation("idx member outside the file", f"offset {o} size {n} of {size}")


# -- Arrow / Parquet ------------------------------------------------------------------------


def _table(n: int, *, extra: bool) -> Any:
    import pyarrow as pa

    cols: dict[str, Any] = {
        "__key__": pa.array([f"k{i:04d}" for i in range(n)]),
        "jpg": pa.array([bytes(range(i % 50)) for i in range(n)], pa.binary()),
        "cls": pa.array(list(range(n)), pa.int64()),
    }
    if extra:
        cols["emb"] = pa.array([[float(i), 0.5] for i in range(n)], pa.list_(pa.float32()))
        cols["ts"] = pa.array(list(range(n)), pa.timestamp("ms"))
        cols["txt"] = pa.array([None if i % 3 == 0 else f"t{i}" for i in range(n)])
        cols["tag"] = pa.array([f"t{i % 3}" for i in range(n)]).dictionary_encode()
    return pa.table(cols)


class _TableTarget(Target):
    def options(self, rng: random.Random, inp: Input) -> Input:
        inp.opts = {"key_column": "__key__" if rng.random() < 0.8 else None}
        return inp

    def run(self, inp: Input, work: str) -> None:
        from mmload.errors import ShardError
        from mmload.sources.dataset import Dataset

        path = os.path.join(work, f"x.{self.ext}")
        _write(path, inp.data)
        ds = Dataset.open(path, key_column=inp.opts["key_column"], index_cache=False)
        failed: ShardError | None = None
        try:
            n = ds.num_samples
            if n < 0 or (ds.chunk_counts < 0).any():
                raise Violation("negative row count in the index")
            ids = np.arange(min(n, 256))
            if n > 256:
                ids = np.concatenate([ids, np.arange(n - 16, n)])
            for s in ds.read(ids):
                if isinstance(s, ShardError):
                    failed = failed or s
                elif not isinstance(s["__key__"], str):
                    raise Violation("sample key is not a str", repr(s["__key__"])[:80])
        finally:
            ds.close()
        if failed is not None:
            raise failed  # a sample that could not be read: an mmload error, as it should be


class ArrowTarget(_TableTarget):
    name = "arrow"
    ext = "arrow"

    def build_seeds(self) -> list[Seed]:
        import pyarrow.ipc as ipc

        seeds = []
        for label, extra, stream, comp in (
            ("file", False, False, None),
            ("file-extra", True, False, None),
            ("stream", False, True, None),
            ("stream-extra", True, True, None),
            ("file-lz4", False, False, "lz4"),
        ):
            t = _table(10, extra=extra)
            sink = io.BytesIO()
            opts = ipc.IpcWriteOptions(compression=comp)
            new = ipc.new_stream if stream else ipc.new_file
            with new(sink, t.schema, options=opts) as w:
                for b in t.to_batches(max_chunksize=4):
                    w.write_batch(b)
            seeds.append(Seed(label, sink.getvalue()))
        return seeds


class ParquetTarget(_TableTarget):
    name = "parquet"
    ext = "parquet"

    def build_seeds(self) -> list[Seed]:
        import pyarrow.parquet as pq

        seeds = []
        for label, extra, comp, dic in (
            ("plain", False, "none", False),
            ("snappy-dict", True, "snappy", True),
            ("zstd", True, "zstd", False),
        ):
            sink = io.BytesIO()
            pq.write_table(
                _table(10, extra=extra),
                sink,
                row_group_size=4,
                compression=comp,
                use_dictionary=dic,
            )
            seeds.append(Seed(label, sink.getvalue()))
        return seeds


# -- image headers --------------------------------------------------------------------------

_MAX_SIDE, _MAX_PIXELS = 16384, 1 << 26


class HeaderTarget(Target):
    name = "header"

    def build_seeds(self) -> list[Seed]:
        from PIL import Image

        rng = np.random.default_rng(1)
        rgb = Image.fromarray(rng.integers(0, 256, (17, 33, 3), dtype=np.uint8))
        rgba = Image.fromarray(rng.integers(0, 256, (17, 33, 4), dtype=np.uint8))
        seeds = []
        for label, im, fmt, kw in (
            ("jpeg", rgb, "JPEG", {}),
            ("jpeg-progressive", rgb, "JPEG", {"progressive": True}),
            ("png", rgb, "PNG", {}),
            ("png-palette", rgb.convert("P"), "PNG", {}),
            ("webp-lossy", rgb, "WEBP", {}),
            ("webp-lossless", rgb, "WEBP", {"lossless": True}),
            ("webp-alpha", rgba, "WEBP", {}),
            ("gif", rgb.convert("P"), "GIF", {}),
            ("bmp", rgb, "BMP", {}),
        ):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            seeds.append(Seed(label, buf.getvalue()))
        return seeds

    def mutate(self, rng: random.Random, seed: Seed) -> tuple[bytes, list[str]]:
        if rng.random() < 0.1:  # arbitrary bytes behind a real magic, or none at all
            magic = rng.choice([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM"])
            if rng.random() < 0.3:
                magic = b"RIFF\0\0\0\0WEBPVP8" + rng.choice([b" ", b"L", b"X"])
            n = rng.choice((0, 1, 10, 30, 100))
            return magic + bytes(rng.randrange(256) for _ in range(n)), [f"random({n})"]
        return _mutate_generic(rng, seed.data)

    def run(self, inp: Input, work: str) -> None:
        from mmload.decode.headers import read_header
        from mmload.errors import DecodeError, MmloadError

        try:
            h = read_header(
                inp.data, shard="s", key="k", max_pixels=_MAX_PIXELS, max_side=_MAX_SIDE
            )
        except MmloadError as e:
            if not isinstance(e, DecodeError):
                raise Violation("read_header raised a non-DecodeError", type(e).__name__) from None
            raise
        if not (0 < h.height <= _MAX_SIDE and 0 < h.width <= _MAX_SIDE):
            raise Violation("image size outside (0, max_side]", f"{h.width}x{h.height}")
        if h.height * h.width > _MAX_PIXELS:
            raise Violation("image size over max_pixels", f"{h.width}x{h.height}")
        if h.format not in ("jpeg", "png", "webp", "gif", "bmp"):
            raise Violation("unknown format", h.format)


# -- value fields ---------------------------------------------------------------------------

_FIELD_SEEDS = {
    "int": [b"0", b"7\n", b"-12", b" 42 ", b"9223372036854775807", b"-9223372036854775808"],
    "json": [
        b'{"a": [1, 2.5, null, "x"], "b": {"c": true}}',
        b"[[[[[[1]]]]]]",
        b"[" * 60 + b"]" * 60,
        b'{"k": {"k": {"k": {}}}}',
        b"123",
        b'"s\\u00e9"',
    ],
    "text": ["héllo wörld ✓".encode(), b"", "日本語".encode(), b"plain"],
}


class FieldsTarget(Target):
    name = "fields"
    allowed = (ValueError,)

    def build_seeds(self) -> list[Seed]:
        return [Seed(k, v, {"kind": k}) for k, vs in _FIELD_SEEDS.items() for v in vs]

    def options(self, rng: random.Random, inp: Input) -> Input:
        # Mostly the seed's own kind; sometimes another (text bytes read as int, ...).
        kind = self.seeds[inp.seed].meta["kind"]
        inp.opts = {"kind": kind if rng.random() < 0.8 else rng.choice(list(_FIELD_SEEDS))}
        return inp

    def run(self, inp: Input, work: str) -> None:
        from mmload.decode.fields import collate, conform, decode_value, kind_class

        kind = inp.opts["kind"]
        v = decode_value(kind, inp.data)
        cls = kind_class(kind, None)
        why = conform(cls, v)
        if kind == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise Violation("int field decoded to a non-int", type(v).__name__)
            if not -(2**63) <= v < 2**63 and why is None:
                # The batch decoder collates int fields into int64: this must be rejected early.
                raise Violation("int field outside int64 conforms to class int", f"{v}"[:40])
        elif kind == "text" and not isinstance(v, str):
            raise Violation("text field decoded to a non-str", type(v).__name__)
        if why is not None:
            raise ValueError(why)  # the batch decoder makes the sample bad: an expected error
        try:
            collate([v, v], cls)
        except Exception as e:  # noqa: BLE001
            msg = str(e)[:80]
            what = f"collate of a conforming {kind} value raises {type(e).__name__}"
            raise Violation(what, msg) from None


# -- audio ----------------------------------------------------------------------------------


class AudioTarget(Target):
    name = "audio"
    allowed = (ValueError,)
    formats: tuple[tuple[str, str, str, int], ...] = (
        ("wav16", "WAV", "PCM_16", 1),
        ("wav8", "WAV", "PCM_U8", 1),
        ("wav32-stereo", "WAV", "PCM_32", 2),
        ("wav-float", "WAV", "FLOAT", 1),
        ("flac", "FLAC", "PCM_16", 1),
        ("ogg", "OGG", "VORBIS", 2),
    )
    _MAX_SECONDS = 5.0

    def build_seeds(self) -> list[Seed]:
        import soundfile as sf

        t = np.arange(800) / 8000.0
        seeds = []
        for label, fmt, sub, ch in self.formats:
            x = 0.5 * np.sin(2 * np.pi * 440 * t)
            x = np.stack([x] * ch, axis=1) if ch > 1 else x
            buf = io.BytesIO()
            sf.write(buf, x, 8000, format=fmt, subtype=sub)
            seeds.append(Seed(label, buf.getvalue()))
        return seeds

    def decode(self, data: bytes) -> tuple[np.ndarray, int]:
        from mmload.decode.audio import decode_audio

        return decode_audio(data, max_seconds=self._MAX_SECONDS)

    def run(self, inp: Input, work: str) -> None:
        x, rate = self.decode(inp.data)
        if not isinstance(rate, int) or rate <= 0:
            raise Violation("bad sample rate", repr(rate))
        if x.dtype != np.float32 or x.ndim != 1 or len(x) == 0:
            raise Violation("bad waveform array", f"{x.dtype} {x.shape}")
        if len(x) > self._MAX_SECONDS * rate + 1:
            raise Violation("audio longer than max_seconds returned", f"{len(x)} at {rate} Hz")
        if not np.isfinite(x).all():
            raise Violation("waveform has NaN/inf samples")


class WaveTarget(AudioTarget):
    """decode_audio's standard-library fallback (soundfile not installed)."""

    name = "wave"
    formats = (
        ("wav16", "WAV", "PCM_16", 1),
        ("wav8", "WAV", "PCM_U8", 1),
        ("wav32-stereo", "WAV", "PCM_32", 2),
    )

    def decode(self, data: bytes) -> tuple[np.ndarray, int]:
        saved = sys.modules.get("soundfile")
        sys.modules["soundfile"] = None  # type: ignore[assignment]  # import -> ImportError
        try:
            return super().decode(data)
        finally:
            if saved is None:
                del sys.modules["soundfile"]
            else:
                sys.modules["soundfile"] = saved


TARGETS: dict[str, type[Target]] = {
    "tar": TarTarget,
    "idx": IdxTarget,
    "arrow": ArrowTarget,
    "parquet": ParquetTarget,
    "header": HeaderTarget,
    "fields": FieldsTarget,
    "audio": AudioTarget,
    "wave": WaveTarget,
}

# --------------------------------------------------------------------------------------------
# running one input, chunks in children


def classify(target: Target, inp: Input, work: str) -> tuple[str, Any]:
    """("ok"|"error"|"foreign"|"violation", detail) for one input, run in this process."""
    from mmload.errors import MmloadError

    try:
        target.run(inp, work)
    except Violation as v:
        return "violation", (v.code, str(v)[:300])
    except MmloadError as e:
        return "error", type(e).__name__
    except target.allowed as e:
        return "error", type(e).__name__
    except Exception as e:  # noqa: BLE001  (RecursionError, MemoryError included)
        tb = traceback.extract_tb(e.__traceback__)
        where = next(
            (
                f"{f.filename.rsplit('/mmload/', 1)[-1]}:{f.lineno}"
                for f in reversed(tb)
                if "/mmload/" in f.filename or "/kernels/" in f.filename
            ),
            "?",
        )
        return "foreign", (f"{type(e).__name__} at {where}", f"{type(e).__name__}: {str(e)[:200]}")
    return "ok", None


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(ValueError, OSError):  # no limit where it cannot be set
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _child(target: Target, seed: int, start: int, stop: int, conn: Any, tmp: str) -> None:
    _limit_child()
    warnings.simplefilter("ignore")  # numpy RuntimeWarnings on garbage samples, etc.
    work = tempfile.mkdtemp(prefix=f"{target.name}-", dir=tmp)
    for i in range(start, stop):
        inp = target.make(seed, i)
        kind, detail = classify(target, inp, work)
        conn.send((i, kind, detail))
    conn.close()
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class Worker:
    proc: Any
    conn: Any
    start: int
    stop: int
    next: int
    last: float


@dataclass
class Stats:
    name: str
    inputs: int = 0
    ok: int = 0
    error: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    foreign: dict[str, list[Any]] = field(default_factory=dict)  # type -> [count, i, message]
    violation: dict[str, list[Any]] = field(default_factory=dict)
    crashes: list[tuple[int, str]] = field(default_factory=list)
    hangs: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, i: int, kind: str, detail: Any) -> None:
        self.inputs += 1
        if kind == "ok":
            self.ok += 1
        elif kind == "error":
            self.error += 1
            self.errors_by_type[detail] = self.errors_by_type.get(detail, 0) + 1
        else:
            table = self.foreign if kind == "foreign" else self.violation
            code, msg = detail
            if code in table:
                table[code][0] += 1
            else:
                table[code] = [1, i, msg]

    @property
    def bad(self) -> int:
        return (
            sum(v[0] for v in self.foreign.values())
            + sum(v[0] for v in self.violation.values())
            + len(self.crashes)
            + len(self.hangs)
        )


_WARM = (
    "mmload.errors",
    "mmload.sources.dataset",
    "mmload.decode.fields",
    "mmload.decode.headers",
    "mmload.decode.audio",
    "pyarrow.parquet",
    "pyarrow.ipc",
    "soundfile",
    "PIL.Image",
)


def _warm() -> None:
    """Import what the targets use before forking: a child must not spend the hang timeout
    importing torch."""
    for m in _WARM:
        with contextlib.suppress(ImportError):
            importlib.import_module(m)


def run_parser(
    target: Target, n: int, seed: int, jobs: int, chunk: int, hang_s: float, tmp: str
) -> Stats:
    _warm()
    ctx = mp.get_context("fork")
    st = Stats(target.name)
    todo = deque((a, min(a + chunk, n)) for a in range(0, n, chunk))
    active: dict[Any, Worker] = {}
    t0 = time.perf_counter()
    while todo or active:
        while todo and len(active) < jobs:
            a, b = todo.popleft()
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(target, seed, a, b, w, tmp), daemon=True)
            p.start()
            w.close()
            active[r] = Worker(p, r, a, b, a, time.monotonic())
        for conn in mpc.wait(list(active), timeout=0.25):
            wk = active[conn]
            try:
                i, kind, detail = conn.recv()
            except EOFError:
                wk.proc.join()
                del active[conn]
                conn.close()
                if wk.next < wk.stop:  # died inside input wk.next
                    code = wk.proc.exitcode
                    why = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
                    st.crashes.append((wk.next, why))
                    st.inputs += 1
                    if wk.next + 1 < wk.stop:
                        todo.appendleft((wk.next + 1, wk.stop))
                continue
            st.add(i, kind, detail)
            wk.next = i + 1
            wk.last = time.monotonic()
        now = time.monotonic()
        for conn, wk in list(active.items()):
            if now - wk.last > hang_s:
                wk.proc.kill()
                wk.proc.join()
                del active[conn]
                conn.close()
                st.hangs.append(wk.next)
                st.inputs += 1
                if wk.next + 1 < wk.stop:
                    todo.appendleft((wk.next + 1, wk.stop))
    st.seconds = time.perf_counter() - t0
    return st


def rerun_alone(target: Target, seed: int, i: int, hang_s: float, tmp: str) -> str:
    """Run input ``i`` alone in a fresh child: how it ends."""
    ctx = mp.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(target, seed, i, i + 1, w, tmp), daemon=True)
    p.start()
    w.close()
    if not r.poll(hang_s):
        p.kill()
        p.join()
        return "hangs again"
    try:
        _, kind, detail = r.recv()
        p.join()
        return f"does not reproduce alone ({kind} {detail})"
    except EOFError:
        p.join()
        return f"reproduces alone (exit {p.exitcode})"


def save(out: str, target: Target, seed: int, i: int, what: str, detail: Any) -> str:
    inp = target.make(seed, i)
    base = os.path.join(out, f"{target.name}-{what}-{i}")
    _write(f"{base}.{target.ext}", inp.data)
    meta = {
        "parser": target.name,
        "input": i,
        "fuzz_seed": seed,
        "seed_input": target.seeds[inp.seed].label,
        "mutations": inp.steps,
        "options": inp.opts,
        "finding": what,
        "detail": detail,
        "replay": f"python benchmarks/fuzz.py --replay {base}.{target.ext} --parsers {target.name}",
    }
    with open(f"{base}.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)
    return f"{base}.{target.ext}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iterations", type=int, default=10_000, help="mutated inputs per parser")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parsers", default=",".join(PARSERS))
    ap.add_argument("--out", default="fuzz-findings", help="where failing inputs are saved")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--chunk", type=int, default=250, help="inputs per child process")
    ap.add_argument("--hang-seconds", type=float, default=10.0)
    ap.add_argument("--replay", help="run one saved input in this process and print the outcome")
    ap.add_argument(
        "--replay-opts", default="{}", help="input options (default: from the finding's .json)"
    )
    args = ap.parse_args(argv)
    names = [p for p in args.parsers.split(",") if p]
    unknown = [p for p in names if p not in TARGETS]
    if unknown:
        ap.error(f"unknown parsers {unknown}; choose from {','.join(PARSERS)}")
    tmp = tempfile.mkdtemp(
        prefix="mmload-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    try:
        if args.replay:
            target = TARGETS[names[0]](tmp)
            with open(args.replay, "rb") as f:
                data = f.read()
            opts = json.loads(args.replay_opts)
            meta = os.path.splitext(args.replay)[0] + ".json"
            if not opts and os.path.exists(meta):  # the finding's own record
                with open(meta, encoding="utf-8") as f:
                    opts = json.load(f).get("options", {})
            inp = Input(data, 0, ["replay"], opts)
            target.run(inp, tmp)  # raises what it raises, with the full traceback
            print("ok")
            return 0
        return _fuzz(args, names, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fuzz(args: argparse.Namespace, names: list[str], tmp: str) -> int:
    env = environment()
    print("== mmload parser fuzzing ==")
    print(f"hardware: {env['cpu']} x{env['cpus']} (affinity {env['affinity']}); {env['platform']}")
    print(
        f"python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    )
    print(
        f"config: iterations={args.iterations} seed={args.seed} jobs={args.jobs} "
        f"chunk={args.chunk} hang_seconds={args.hang_seconds}"
    )
    os.makedirs(args.out, exist_ok=True)
    report = Report("fuzz", {"iterations": args.iterations, "seed": args.seed, "jobs": args.jobs})
    t_all = time.perf_counter()
    failed = False
    for name in names:
        target = TARGETS[name](tmp)
        st = run_parser(
            target, args.iterations, args.seed, args.jobs, args.chunk, args.hang_seconds, tmp
        )
        print(
            f"\n-- {name}: {st.inputs} inputs in {st.seconds:.1f}s "
            f"({st.inputs / max(st.seconds, 1e-9):,.0f}/s); seeds: "
            + ", ".join(s.label for s in target.seeds)
        )
        print(
            f"   ok {st.ok}, expected errors {st.error} "
            + json.dumps(dict(sorted(st.errors_by_type.items())))
        )
        for what, table in (("foreign", st.foreign), ("violation", st.violation)):
            for code, (count, i, msg) in sorted(table.items()):
                path = save(args.out, target, args.seed, i, what, msg)
                print(
                    f"   {what.upper()} {code} x{count}; e.g. input {i} "
                    f"{target.make(args.seed, i).steps}: {msg}\n      saved {path}"
                )
        for i, why in st.crashes:
            again = rerun_alone(target, args.seed, i, args.hang_seconds, tmp)
            path = save(args.out, target, args.seed, i, "crash", f"{why}; {again}")
            print(
                f"   CRASH input {i} ({why}; {again}) {target.make(args.seed, i).steps}"
                f"\n      saved {path}"
            )
        for i in st.hangs:
            path = save(args.out, target, args.seed, i, "hang", f"> {args.hang_seconds}s")
            print(
                f"   HANG input {i} (> {args.hang_seconds}s) {target.make(args.seed, i).steps}"
                f"\n      saved {path}"
            )
        failed |= st.bad > 0
        report.add(
            parser=name,
            inputs=st.inputs,
            ok=st.ok,
            mmload_errors=st.error,
            foreign=sum(v[0] for v in st.foreign.values()),
            foreign_types=",".join(sorted(st.foreign)) or None,
            violations=sum(v[0] for v in st.violation.values()),
            crashes=len(st.crashes),
            hangs=len(st.hangs),
            seconds=round(st.seconds, 1),
            per_s=st.inputs / max(st.seconds, 1e-9),
        )
    total = time.perf_counter() - t_all
    report.notes.append(f"total {total:.1f}s for {len(names)} parsers")
    report.notes.append("mmload_errors counts ValueError for fields/audio/wave (their contract)")
    report.print(
        [
            "parser",
            "inputs",
            "ok",
            "mmload_errors",
            "foreign",
            "foreign_types",
            "violations",
            "crashes",
            "hangs",
            "seconds",
            "per_s",
        ]
    )
    report.save(os.path.join(args.out, "fuzz.json"))
    print(f"\nfindings saved under {args.out}" if failed else "\nno findings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
