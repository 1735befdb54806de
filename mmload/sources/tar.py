"""WebDataset tar shards: header-only index scan and DALI ``.idx`` files.

A sample is the run of consecutive members sharing a basename up to the first dot of the file
name (the directory is part of the key); ``__key__`` is that basename, the field name is the rest,
lower-cased, as in webdataset. The index records, per sample, each member's field, data offset
and size; :mod:`mmload.sources.gather` reads a batch's members with it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from mmload.errors import BadEntry, ShardError

__all__ = [
    "TarIndex",
    "read_dali_idx",
    "scan_tar",
    "split_name",
    "write_dali_idx",
]

_BLOCK = 512
_NAME_RE = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")
_REGULAR = (b"0", b"\0", b"7")


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
    # Members that are not part of any sample (README, .DS_Store, __meta__.json: see
    # is_non_sample_member), left out and counted.
    ignored: list[str] = field(default_factory=list)
    # (distinct field names, each member's position in them), built on first use; a racing
    # second build makes the same tuple, assigned whole.
    _codes: tuple[list[str], np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> range:
        return range(int(self.starts[i]), int(self.starts[i + 1]))

    def _field_codes(self) -> tuple[list[str], np.ndarray]:
        if self._codes is None:
            names = list(dict.fromkeys(self.fields))
            pos = {f: i for i, f in enumerate(names)}
            codes = np.fromiter((pos[f] for f in self.fields), np.int64, len(self.fields))
            self._codes = (names, codes)
        return self._codes

    def field_names(self) -> list[str]:
        """The distinct fields of the shard's members, in order of first appearance."""
        return self._field_codes()[0]

    def select(
        self, rows: np.ndarray, fields: set[str] | frozenset[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The members of samples ``rows`` (any order, repeats allowed) whose field is in
        ``fields`` (None: all): ``(members, bounds)``, int64, where
        ``members[bounds[i]:bounds[i + 1]]`` are ``rows[i]``'s, in file order."""
        first = self.starts[rows]
        count = self.starts[rows + 1] - first
        bounds = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(count, out=bounds[1:])
        members = np.arange(bounds[-1], dtype=np.int64) + np.repeat(first - bounds[:-1], count)
        if fields is None:
            return members, bounds
        names, codes = self._field_codes()
        wanted = np.array([f in fields for f in names], dtype=bool)
        keep = wanted[codes[members]]
        kept = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept[1:])
        return members[keep], kept[bounds]

    def to_json(self) -> dict[str, object]:
        return {
            "keys": self.keys,
            "starts": self.starts.tolist(),
            "fields": self.fields,
            "offsets": self.offsets.tolist(),
            "sizes": self.sizes.tolist(),
            "bad": [b.as_dict() for b in self.bad],
            "ignored": self.ignored,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> TarIndex:
        return cls(
            keys=list(d["keys"]),  # type: ignore[call-overload]
            starts=np.asarray(d["starts"], dtype=np.int64),
            fields=list(d["fields"]),  # type: ignore[call-overload]
            offsets=np.asarray(d["offsets"], dtype=np.int64),
            sizes=np.asarray(d["sizes"], dtype=np.int64),
            bad=[BadEntry(**b) for b in d["bad"]],  # type: ignore[attr-defined]
            ignored=list(d["ignored"]),  # type: ignore[call-overload]
        )


_METADATA_NAMES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})
_DUNDER_RE = re.compile(r"^__[A-Za-z0-9_]+__(?:\..*)?$")


def is_non_sample_member(name: str) -> bool:
    """Whether tar member ``name`` is not part of any sample, by the documented rule: its file
    name has no dot (``README``, ``LICENSE``, ``__meta__``), starts with a dot (``.DS_Store``,
    macOS ``._*`` files), is a dunder name (``__meta__.json``, ``__index__.json``) or a known
    desktop file (``Thumbs.db``, ``desktop.ini``), or it lies under ``__MACOSX/``. Such
    members are left out and counted (``stats()["non_sample_members"]``); every other name must
    be ``key.field``."""
    base = name.rsplit("/", 1)[-1]
    if not base:
        return False  # "dir/": malformed, not metadata
    if "." not in base or base.startswith("."):
        return True
    if _DUNDER_RE.match(base) or base.lower() in _METADATA_NAMES:
        return True
    return "/__MACOSX/" in f"/{name}"  # a path component, at any depth


def split_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``; None if the name has no key or field."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


_OCTAL_RE = re.compile(rb"^[0-7]+$")
_MAX_NAME_HEADER = 1 << 20  # GNU long-name / PAX header data read into memory, at most


def _octal(raw: bytes) -> int:
    """A tar numeric field: NUL/space-terminated octal digits, or GNU base-256.

    Raises ValueError for anything else (signs, underscores, garbage) and for negative
    base-256 values: ``int(text, 8)`` alone would accept ``"-1"`` and loop the scan forever.
    """
    if raw and raw[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB; 0xff starts a negative one
        if raw[0] == 0xFF:
            raise ValueError("negative base-256 number")
        return int.from_bytes(raw, "big") & ~(0x80 << (8 * (len(raw) - 1)))
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not _OCTAL_RE.match(text):
        raise ValueError(f"not an octal number: {text[:16]!r}")
    return int(text, 8)


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
        if data[pos:].strip(b"\0") == b"":
            break  # NUL padding after the last record
        sp = data.find(b" ", pos)
        if sp < 0 or not data[pos:sp].isdigit():
            raise ValueError(f"PAX record at {pos} has no decimal length")
        length = int(data[pos:sp])
        if length <= sp - pos or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise ValueError(f"PAX record of length {length} at {pos} does not fit its header")
        rec = data[sp + 1 : pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
    return path


_KIND_OF = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
}


class _Builder:
    """Collects samples; a sample with any bad member is dropped whole and listed once."""

    def __init__(self, shard: str, skip: bool) -> None:
        self.shard = shard
        self.skip = skip
        self.keys: list[str] = []
        self.starts: list[int] = [0]
        self.fields: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.bad: list[BadEntry] = []
        self.ignored: list[str] = []
        self._seen: set[str] = set()
        self._dropped: set[str] = set()

    def problem(self, reason: str, key: str | None) -> None:
        """A shard-level problem (``key`` None) or one that makes sample ``key`` bad."""
        if not self.skip:
            raise ShardError(reason, shard=self.shard, key=key)
        if key is not None:
            if key in self._dropped:
                return
            self._dropped.add(key)
            if self.keys and self.keys[-1] == key:
                self.drop_last_sample()
        self.bad.append(BadEntry(self.shard, key, reason))

    def add(self, name: str, offset: int, size: int) -> None:
        if is_non_sample_member(name):
            self.ignored.append(name)
            return
        parts = split_name(name)
        if parts is None:
            self.problem(f"tar member {name!r} has no sample key and field (want 'key.ext')", None)
            return
        key, fld = parts
        if not fld:
            self.problem(f"tar member {name!r} has an empty field name (want 'key.ext')", key)
            return
        if key in self._dropped:
            return
        if not self.keys or self.keys[-1] != key:
            if key in self._seen:
                self.problem(f"members of sample {key!r} are not contiguous in the tar", key)
                self._remove(key)
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

    def not_regular(self, name: str, typeflag: bytes) -> None:
        """A link/device/FIFO member: never followed; if it looks like a sample member, its
        sample is bad (it would otherwise lose that field, or vanish, silently)."""
        parts = split_name(name)
        if parts is None:
            return
        what = _KIND_OF.get(typeflag, f"of unsupported tar type {typeflag!r}")
        self.problem(f"tar member {name!r} is {what}, not a regular file", parts[0])

    def _remove(self, key: str) -> None:
        """Drop an earlier, already indexed sample (its members turned out bad later)."""
        i = self.keys.index(key)
        lo, hi = self.starts[i], self.starts[i + 1]
        n = hi - lo
        del self.fields[lo:hi], self.offsets[lo:hi], self.sizes[lo:hi]
        del self.keys[i]
        del self.starts[i + 1]
        for j in range(i + 1, len(self.starts)):
            self.starts[j] -= n

    def drop_last_sample(self) -> None:
        n = self.starts[-1] - self.starts[-2]
        del self.fields[len(self.fields) - n :]
        del self.offsets[len(self.offsets) - n :]
        del self.sizes[len(self.sizes) - n :]
        self.keys.pop()
        self.starts.pop()

    def cut(self, reason: str, pos: int, key: str | None = None) -> None:
        """The shard ends early at byte ``pos``. The sample whose member is cut (``key``, when
        its header is readable) is dropped and listed; whatever followed is lost, listed for the
        shard. Samples before the cut are kept: one that lost a later member lacks a field,
        which the batch decoder reports for that sample."""
        if not self.skip:
            raise ShardError(reason, shard=self.shard, key=key)
        if key is not None:
            self.problem(f"{reason}; sample {key!r} is incomplete", key)
        self.problem(f"{reason}; any samples after byte {pos} are lost", None)

    def build(self) -> TarIndex:
        return TarIndex(
            keys=self.keys,
            starts=np.asarray(self.starts, dtype=np.int64),
            fields=self.fields,
            offsets=np.asarray(self.offsets, dtype=np.int64),
            sizes=np.asarray(self.sizes, dtype=np.int64),
            bad=self.bad,
            ignored=self.ignored,
        )


def _zero_tail(fd: int, pos: int, file_size: int) -> bool:
    """True if bytes ``pos..file_size`` are all zero (the end-of-archive blocks and record
    padding); stops at the first non-zero chunk, so a long tail is read only if it is empty."""
    while pos < file_size:
        chunk = os.pread(fd, min(1 << 20, file_size - pos), pos)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        pos += len(chunk)
    return True


def scan_tar(path: str, *, shard: str | None = None, skip: bool = False) -> TarIndex:
    """Index a tar file by reading only its 512-byte headers (one ``pread`` per member).

    Raises :class:`ShardError` (naming the shard and, where known, the key) for a missing file,
    a file that is not a tar, a truncated tar (cut anywhere, also at a member boundary without
    the end-of-archive blocks), a corrupt header, a link/device member named like a sample
    member, or a member without ``key.field`` name. With ``skip=True`` these are recorded in
    ``TarIndex.bad`` instead: a bad sample is left out whole, and a shard that ends early keeps
    its complete samples and lists the loss.
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
        _scan(fd, b, shard)
    except OSError as e:
        raise ShardError(f"cannot read shard: {e.strerror or e}", shard=shard) from None
    finally:
        os.close(fd)
    if not b.keys and not b.bad:
        raise ShardError("tar shard holds no samples", shard=shard)
    return b.build()


def _scan(fd: int, b: _Builder, shard: str) -> None:
    file_size = os.fstat(fd).st_size
    pos = 0
    long_name: str | None = None
    while True:
        if pos == file_size and pos > 0:
            b.cut(f"truncated tar: ends at byte {pos} without the end-of-archive blocks", pos)
            return
        h = os.pread(fd, _BLOCK, pos)
        if len(h) < _BLOCK:
            if pos == 0:
                raise ShardError("not a tar file (shorter than one tar header)", shard=shard)
            b.cut(f"truncated tar: partial header at byte {pos}", pos)
            return
        if h.count(0) == _BLOCK:
            if not _zero_tail(fd, pos, file_size):
                b.cut(f"corrupt tar: a zero block at byte {pos} is followed by more data", pos)
            return
        if not _checksum_ok(h):
            if pos == 0:
                raise ShardError("not a tar file (bad header checksum at byte 0)", shard=shard)
            b.cut(f"corrupt tar header at byte {pos} (truncated or overwritten)", pos)
            return
        try:
            size = _octal(h[124:136])
        except ValueError as e:
            b.cut(f"corrupt tar header at byte {pos}: size field: {e}", pos)
            return
        typeflag = h[156:157]
        data = pos + _BLOCK
        end = data + size
        nxt = data + -(-size // _BLOCK) * _BLOCK
        if end > file_size:
            name = long_name or _header_name(h)
            parts = split_name(name)
            b.cut(
                f"truncated tar: member {name!r} needs bytes up to {end}, file has {file_size}",
                pos,
                parts[0] if parts is not None and typeflag in _REGULAR else None,
            )
            return
        if nxt > file_size:
            parts = split_name(long_name or _header_name(h))
            b.cut(
                f"truncated tar: cut inside the padding of the member at byte {pos}",
                pos,
                parts[0] if parts is not None and typeflag in _REGULAR else None,
            )
            return
        if typeflag in (b"L", b"x") and size > _MAX_NAME_HEADER:
            b.cut(f"corrupt tar header at byte {pos}: a name header of {size} bytes", pos)
            return
        if typeflag == b"L":  # GNU long name for the next member
            raw_name = os.pread(fd, size, data).split(b"\0", 1)[0]
            long_name = raw_name.decode("utf-8", "surrogateescape")
        elif typeflag == b"x":  # PAX extended header for the next member
            try:
                long_name = _pax_path(os.pread(fd, size, data)) or long_name
            except ValueError as e:
                b.cut(f"corrupt PAX header at byte {pos}: {e}", pos)
                return
        elif typeflag in _REGULAR:
            name = long_name or _header_name(h)
            long_name = None
            if _is_file(typeflag, name):
                b.add(name, data, size)
        elif typeflag in (b"g", b"K", b"5"):  # global PAX header, GNU long link name, directory
            long_name = None
        else:
            b.not_regular(long_name or _header_name(h), typeflag)
            long_name = None
        pos = nxt


def _is_file(typeflag: bytes, name: str) -> bool:
    """A regular file member. A NUL type flag on a name ending in ``/`` is a pre-POSIX
    directory, as tarfile and GNU tar read it."""
    return typeflag in _REGULAR and not (typeflag == b"\0" and name.endswith("/"))


def _header_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _is_count(text: str) -> bool:
    """A non-negative decimal that fits in int64 (and in ``int()``'s digit limit)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def read_dali_idx(idx_path: str, tar_path: str, *, shard: str | None = None) -> TarIndex:
    """Build a :class:`TarIndex` from a DALI webdataset ``.idx`` file (``v1.2`` or ``v1.1``).

    Each line after the header lists ``ext offset size name`` (``v1.2``) or ``ext offset size``
    (``v1.1``) per member of one sample; offsets are data offsets. A ``v1.2`` index is checked
    against the tar's size and headers. A ``v1.1`` index holds no member names, so the keys come
    from a scan of the tar's headers, which the index must agree with member for member.
    """
    shard = shard or tar_path
    try:
        with open(idx_path, encoding="utf-8", errors="surrogateescape") as f:
            header = f.readline().split()
            lines = f.read().splitlines()
    except OSError as e:
        msg = f"cannot read DALI index {idx_path!r}: {e.strerror}"
        raise ShardError(msg, shard=shard) from None
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not _is_count(header[1]):
        raise ShardError(
            f"DALI index {idx_path!r}: unsupported header {header[:3]!r} (want 'v1.2 <count>' "
            "or 'v1.1 <count>')",
            shard=shard,
        )
    if header[0] == "v1.1":
        return _read_dali_idx_v11(idx_path, tar_path, shard, int(header[1]), lines)
    try:
        file_size = os.path.getsize(tar_path)
    except OSError as e:
        raise ShardError(f"cannot stat shard: {e.strerror}", shard=shard) from None
    b = _Builder(shard, skip=False)
    for line in lines:
        tok = line.split()
        if len(tok) % 4:
            raise ShardError(f"DALI index {idx_path!r}: malformed line {line[:120]!r}", shard=shard)
        for j in range(0, len(tok), 4):
            _ext, off_s, size_s, name = tok[j : j + 4]
            if not (_is_count(off_s) and _is_count(size_s)):
                raise ShardError(
                    f"DALI index {idx_path!r}: malformed line {line[:120]!r}", shard=shard
                )
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
    idx = b.build()
    _check_covers(tar_path, idx, shard, idx_path)
    return idx


def _read_dali_idx_v11(
    idx_path: str, tar_path: str, shard: str, count: int, lines: list[str]
) -> TarIndex:
    listed: list[list[tuple[str, int, int]]] = []
    for line in lines:
        tok = line.split()
        if not tok:
            continue
        if len(tok) % 3 or not all(_is_count(t) for t in tok[1::3] + tok[2::3]):
            raise ShardError(f"DALI index {idx_path!r}: malformed line {line[:120]!r}", shard=shard)
        listed.append(
            [(tok[j].lower(), int(tok[j + 1]), int(tok[j + 2])) for j in range(0, len(tok), 3)]
        )
    if len(listed) != count:
        raise ShardError(
            f"DALI index {idx_path!r} announces {count} samples, lists {len(listed)}", shard=shard
        )
    idx = scan_tar(tar_path, shard=shard)
    if idx.num_samples != count:
        raise ShardError(
            f"DALI index {idx_path!r} lists {count} samples, the tar holds {idx.num_samples} "
            "(stale index?)",
            shard=shard,
        )
    for i, members in enumerate(listed):
        have = [(idx.fields[m], int(idx.offsets[m]), int(idx.sizes[m])) for m in idx.members(i)]
        if sorted(have) != sorted(members):
            raise ShardError(
                f"DALI index {idx_path!r} disagrees with the tar at sample {i}: it lists "
                f"{members}, the tar has {have} (stale index?)",
                shard=shard,
                key=idx.keys[i],
            )
    return idx


_BETWEEN = (b"x", b"g", b"L", b"K", b"5")  # what may stand between indexed members


def _check_covers(path: str, idx: TarIndex, shard: str, idx_path: str) -> None:
    """The ``.idx`` must account for every member of the tar: a self-consistent index that leaves
    out a sample would lose it silently. Only the gaps between listed members (extension headers,
    directories) and the tail are read, so a dense tar costs one ``pread``."""
    order = np.argsort(idx.offsets, kind="stable")
    offsets, sizes = idx.offsets[order].tolist(), idx.sizes[order].tolist()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        for off, size in [*zip(offsets, sizes, strict=True), (None, 0)]:
            target = None if off is None else off - _BLOCK
            while target is None or pos < target:
                h = os.pread(fd, _BLOCK, pos)
                if len(h) < _BLOCK or h.count(0) == _BLOCK:
                    if target is None:
                        return
                    break
                why = None
                flag, name = h[156:157], _header_name(h)
                if not _checksum_ok(h):
                    why = f"no tar header at byte {pos}"
                elif flag not in _BETWEEN and (
                    _is_file(flag, name) or split_name(name) is not None
                ):
                    why = f"it leaves out the tar member {name!r} at byte {pos}"
                else:
                    try:
                        pos += _BLOCK + -(-_octal(h[124:136]) // _BLOCK) * _BLOCK
                    except ValueError:
                        why = f"corrupt tar header at byte {pos}"
                if why is not None:
                    raise ShardError(
                        f"DALI index {idx_path!r} disagrees with the tar: {why} (stale index?)",
                        shard=shard,
                    )
            if pos != target:
                raise ShardError(
                    f"DALI index {idx_path!r} disagrees with the tar: no member's data starts at "
                    f"byte {off} (stale index?)",
                    shard=shard,
                )
            pos = off + -(-size // _BLOCK) * _BLOCK
    except OSError as e:
        raise ShardError(f"cannot read shard: {e.strerror or e}", shard=shard) from None
    finally:
        os.close(fd)


def write_dali_idx(idx: TarIndex, target: str) -> str | None:
    """Write ``idx`` as a DALI ``v1.2`` ``.idx`` file; returns why not when the format cannot
    hold it (fields are space-separated, so a key or field with whitespace would be misread)."""
    for key in idx.keys:
        if any(c.isspace() for c in key):
            return f"key {key!r} contains whitespace, which DALI .idx lines cannot represent"
    for fld in set(idx.fields):
        if any(c.isspace() for c in fld):
            return f"field {fld!r} contains whitespace, which DALI .idx lines cannot represent"
    with open(target, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(f"v1.2 {idx.num_samples}\n")
        for i, key in enumerate(idx.keys):
            parts = [
                f"{idx.fields[m]} {idx.offsets[m]} {idx.sizes[m]} {key}.{idx.fields[m]}"
                for m in idx.members(i)
            ]
            f.write(" ".join(parts) + "\n")
    return None
