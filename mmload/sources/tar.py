"""WebDataset tar shards: header-only index scan, DALI ``.idx`` files, and ``pread`` reads.

A sample is the run of consecutive members sharing a basename up to the first dot of the file
name (the directory is part of the key); ``__key__`` is that basename, the field name is the rest,
lower-cased, as in webdataset. The index records, per sample, each member's field, data offset
and size, so that any sample can be read with one ``os.pread`` per member.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from mmload.errors import BadEntry, ShardError

__all__ = ["TarIndex", "read_dali_idx", "scan_tar", "split_name"]

_BLOCK = 512
_NAME_RE = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos


@dataclass
class TarIndex:
    """Per-sample member table of one tar shard.

    ``starts[i]:starts[i+1]`` are sample ``i``'s members in ``fields``/``offsets``/``sizes``.
    """

    keys: list[str]
    starts: np.ndarray
    fields: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    bad: list[BadEntry] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> range:
        return range(int(self.starts[i]), int(self.starts[i + 1]))

    def to_json(self) -> dict[str, object]:
        return {
            "keys": self.keys,
            "starts": self.starts.tolist(),
            "fields": self.fields,
            "offsets": self.offsets.tolist(),
            "sizes": self.sizes.tolist(),
            "bad": [b.as_dict() for b in self.bad],
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> TarIndex:
        return cls(
            keys=list(d["keys"]),  # type: ignore[call-overload]
            starts=np.asarray(d["starts"], dtype=np.int64),
            fields=list(d["fields"]),  # type: ignore[call-overload]
            offsets=np.asarray(d["offsets"], dtype=np.int64),
            sizes=np.asarray(d["sizes"], dtype=np.int64),
            bad=[BadEntry(**b) for b in d.get("bad", [])],  # type: ignore[attr-defined]
        )


def split_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``; None if the name has no key or field."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def _octal(raw: bytes) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(raw, "big") & ~(0x80 << (8 * (len(raw) - 1)))
    text = raw.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _checksum_ok(h: bytes) -> bool:
    try:
        want = _octal(h[148:156])
    except ValueError:
        return False
    got = sum(h[:148]) + 8 * 32 + sum(h[156:])
    return want == got


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header; ValueError if the records are malformed."""
    path = None
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        if length <= sp - pos or pos + length > len(data):
            raise ValueError(f"PAX record of length {length} at {pos} does not fit its header")
        rec = data[sp + 1 : pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
    return path


class _Builder:
    def __init__(self, shard: str, skip: bool) -> None:
        self.shard = shard
        self.skip = skip
        self.keys: list[str] = []
        self.starts: list[int] = [0]
        self.fields: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.bad: list[BadEntry] = []
        self._seen: set[str] = set()

    def problem(self, reason: str, key: str | None) -> None:
        if not self.skip:
            raise ShardError(reason, shard=self.shard, key=key)
        self.bad.append(BadEntry(self.shard, key, reason))

    def add(self, name: str, offset: int, size: int) -> None:
        parts = split_name(name)
        if parts is None:
            self.problem(f"tar member {name!r} has no sample key and field (want 'key.ext')", None)
            return
        key, fld = parts
        if not self.keys or self.keys[-1] != key:
            if key in self._seen:
                self.problem(f"members of sample {key!r} are not contiguous in the tar", key)
                return
            self._seen.add(key)
            self.keys.append(key)
            self.starts.append(self.starts[-1])
        first = self.starts[-2]
        if fld in self.fields[first:]:
            self.problem(f"duplicate field {fld!r} in sample", key)
            return
        self.fields.append(fld)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.starts[-1] += 1

    def drop_last_sample(self) -> None:
        n = self.starts[-1] - self.starts[-2]
        del self.fields[len(self.fields) - n :]
        del self.offsets[len(self.offsets) - n :]
        del self.sizes[len(self.sizes) - n :]
        self.keys.pop()
        self.starts.pop()

    def build(self) -> TarIndex:
        return TarIndex(
            keys=self.keys,
            starts=np.asarray(self.starts, dtype=np.int64),
            fields=self.fields,
            offsets=np.asarray(self.offsets, dtype=np.int64),
            sizes=np.asarray(self.sizes, dtype=np.int64),
            bad=self.bad,
        )


def scan_tar(path: str, *, shard: str | None = None, skip: bool = False) -> TarIndex:
    """Index a tar file by reading only its 512-byte headers (one ``pread`` per member).

    Raises :class:`ShardError` (naming the shard and, where known, the key) for a missing file,
    a file that is not a tar, a truncated tar, or a member without ``key.field`` name. With
    ``skip=True`` per-sample problems are recorded in ``TarIndex.bad`` instead, and a truncated
    tail drops only the incomplete sample.
    """
    shard = shard or path
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError("shard file not found", shard=shard) from None
    except OSError as e:
        raise ShardError(f"cannot open shard: {e.strerror}", shard=shard) from None
    b = _Builder(shard, skip)
    try:
        file_size = os.fstat(fd).st_size
        pos = 0
        long_name: str | None = None
        while True:
            h = os.pread(fd, _BLOCK, pos)
            if len(h) == 0 and pos > 0:
                break  # EOF at a member boundary without the end-of-archive blocks
            if len(h) < _BLOCK:
                if pos == 0:
                    raise ShardError("not a tar file (shorter than one tar header)", shard=shard)
                b.problem(f"truncated tar: partial header at byte {pos}", None)
                break
            if h == b"\0" * _BLOCK:
                break
            if not _checksum_ok(h):
                if pos == 0:
                    raise ShardError("not a tar file (bad header checksum at byte 0)", shard=shard)
                b.problem(f"corrupt tar header at byte {pos} (truncated or overwritten)", None)
                break
            size = _octal(h[124:136])
            typeflag = h[156:157]
            data = pos + _BLOCK
            end = data + size
            nxt = data + -(-size // _BLOCK) * _BLOCK
            if end > file_size:
                name = long_name or _header_name(h)
                parts = split_name(name)
                key = parts[0] if parts else None
                if b.keys and key == b.keys[-1]:
                    b.drop_last_sample()
                b.problem(
                    f"truncated tar: member {name!r} needs bytes up to {end}, file has {file_size}",
                    key,
                )
                break
            if typeflag in (b"L",):  # GNU long name for the next member
                raw_name = os.pread(fd, size, data).split(b"\0", 1)[0]
                long_name = raw_name.decode("utf-8", "surrogateescape")
            elif typeflag == b"x":  # PAX extended header for the next member
                try:
                    long_name = _pax_path(os.pread(fd, size, data)) or long_name
                except ValueError as e:
                    b.problem(f"corrupt PAX header at byte {pos}: {e}", None)
                    break
            elif typeflag in (b"g", b"K") or typeflag in _SKIPPED:
                long_name = None
            elif typeflag in _REGULAR:
                name = long_name or _header_name(h)
                long_name = None
                b.add(name, data, size)
            else:
                long_name = None
            pos = nxt
    finally:
        os.close(fd)
    if not b.keys and not b.bad:
        raise ShardError("tar shard holds no samples", shard=shard)
    return b.build()


def _header_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def read_dali_idx(idx_path: str, tar_path: str, *, shard: str | None = None) -> TarIndex:
    """Build a :class:`TarIndex` from a DALI webdataset ``.idx`` file (format ``v1.2``).

    Each line after the header lists ``ext offset size name`` per member of one sample; offsets
    are data offsets. The index is checked against the tar's size.
    """
    shard = shard or tar_path
    try:
        with open(idx_path, encoding="utf-8") as f:
            header = f.readline().split()
            lines = f.read().splitlines()
    except OSError as e:
        msg = f"cannot read DALI index {idx_path!r}: {e.strerror}"
        raise ShardError(msg, shard=shard) from None
    if len(header) != 2 or header[0] != "v1.2":
        raise ShardError(
            f"DALI index {idx_path!r}: unsupported header {header!r} (want v1.2)", shard=shard
        )
    file_size = os.path.getsize(tar_path)
    b = _Builder(shard, skip=False)
    for line in lines:
        tok = line.split()
        if len(tok) % 4:
            raise ShardError(f"DALI index {idx_path!r}: malformed line {line!r}", shard=shard)
        for j in range(0, len(tok), 4):
            _ext, off_s, size_s, name = tok[j : j + 4]
            if not (off_s.isdigit() and size_s.isdigit()):
                raise ShardError(f"DALI index {idx_path!r}: malformed line {line!r}", shard=shard)
            off, size = int(off_s), int(size_s)
            if off + size > file_size:
                raise ShardError(
                    f"DALI index {idx_path!r} points past the end of the tar (stale index?)",
                    shard=shard,
                    key=name,
                )
            b.add(name, off, size)
    if len(b.keys) != int(header[1]):
        raise ShardError(
            f"DALI index {idx_path!r} announces {header[1]} samples, lists {len(b.keys)}",
            shard=shard,
        )
    return b.build()
