"""Tar header fields against Python's ``tarfile`` as the oracle: numeric fields (octal in
every padding writers use, GNU base-256 for sizes of 8 GiB and more), names that fill the
100-byte name field, old-style directories, and which member names are not part of a sample
(the documented rule, case by case)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmload.errors import ShardError
from mmload.sources.tar import (
    TarIndex,
    _octal,
    _pax_path,
    is_non_sample_member,
    read_dali_idx,
    scan_tar,
    write_dali_idx,
)


@pytest.mark.parametrize("digits", [8, 12])
@pytest.mark.parametrize(
    "n", [0, 1, 7, 8, 0o644, 8**7 - 1, 8**7, 8**11 - 1, 8**11, 2**33 + 5, 2**40 + 3, 2**55 + 1]
)
def test_octal_reads_what_tarfile_writes(digits: int, n: int) -> None:
    if n >= 256 ** (digits - 1):
        pytest.skip("tarfile cannot write it in this many bytes")  # the 8-byte field only
    raw = tarfile.itn(n, digits, tarfile.GNU_FORMAT)  # octal, or base-256 past 8**(digits-1)
    assert len(raw) == digits
    assert _octal(raw) == tarfile.nti(raw) == n


@pytest.mark.parametrize(
    "raw",
    [
        b"0000644\0",  # tarfile, GNU tar: zero-filled, one NUL
        b"644\0\0\0\0\0",  # NUL-padded after the digits
        b"  644 \0\0",  # space-padded on both sides (old Unix tars)
        b"0000644 ",  # space-terminated, no NUL
        b"00000001234\0",
        b"\0" * 12,  # an empty field is 0
        b" " * 11 + b"\0",
    ],
)
def test_octal_paddings_read_as_tarfile_reads_them(raw: bytes) -> None:
    assert _octal(raw) == tarfile.nti(raw)


def test_base256_keeps_every_bit_after_the_flag() -> None:
    # GNU base-256: the first bit flags it, the other 95 bits of a 12-byte field are the number
    # (tarfile writes at most 11 bytes' worth, but a reader takes the whole field)
    assert _octal(bytes([0x81]) + bytes(11)) == 1 << 88
    assert _octal(bytes([0x80, 0x01]) + bytes(10)) == 1 << 80
    assert _octal(bytes([0xBF]) + b"\xff" * 11) == (1 << 94) - 1


def test_negative_base256_and_garbage_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^negative base-256 number$"):
        _octal(tarfile.itn(-1, 12, tarfile.GNU_FORMAT))
    for raw in (b"-000001\0", b"0x12\0", b"12_3\0", b"0009\0", b"X644X\0", b"+644\0"):
        with pytest.raises(ValueError, match="not an octal number"):
            _octal(raw)


def test_pax_records_followed_by_garbage_are_refused() -> None:
    # only NUL bytes may follow the last record
    assert _pax_path(b"14 path=a.jpg\n\0\0\0") == "a.jpg"
    with pytest.raises(ValueError, match="PAX record at 14 has no decimal length"):
        _pax_path(b"14 path=a.jpg\nXX")


@pytest.mark.parametrize(
    ("name", "non_sample"),
    [
        ("s1.jpg", False),
        ("dir/s1.jpg", False),
        ("README", True),
        ("a/b/LICENSE", True),
        ("dir.v2/README", True),  # the file name decides, not a dotted directory above it
        ("data.d/x.y/README", True),
        (".DS_Store", True),
        ("dir.v2/._s1.jpg", True),  # macOS resource fork
        ("__meta__.json", True),
        ("d.x/__index__.json", True),
        ("__meta__", True),
        ("Thumbs.db", True),  # desktop files, any case
        ("THUMBS.DB", True),
        ("x.y/Desktop.ini", True),
        ("__MACOSX/s1.jpg", True),  # anything under __MACOSX/, at any depth
        ("a.b/__MACOSX/c/s1.jpg", True),
        ("x__MACOSX/s1.jpg", False),  # only as a whole path component
        ("__macosx/s1.jpg", False),
        ("dir/", False),  # malformed (no file name): an error, not metadata
        ("a.b/", False),
    ],
)
def test_which_members_are_not_part_of_a_sample(name: str, non_sample: bool) -> None:
    assert is_non_sample_member(name) is non_sample


def _tar(members: list[tarfile.TarInfo], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(b"v" * info.size) if info.isfile() else None)
    return buf.getvalue()


def _file(name: str, size: int = 3) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def test_a_name_filling_the_whole_name_field(tmp_path: Path) -> None:
    # exactly 100 bytes: no NUL ends it, the mode field follows at byte 100
    name = "k" * 96 + ".jpg"
    prefixed = "p" * 155 + "/" + "q" * 95 + ".txt"  # a full ustar prefix as well
    path = tmp_path / "full.tar"
    path.write_bytes(_tar([_file(name), _file(prefixed)]))
    with tarfile.open(path) as tf:
        want = [(m.name.rsplit(".", 1)[0], m.name.rsplit(".", 1)[1]) for m in tf]
    idx = scan_tar(str(path))
    assert list(zip(idx.keys, idx.fields, strict=True)) == want


def _v7_directory(name: str) -> bytes:
    """An old-style directory: a regular-file (NUL) type flag and a name ending in '/', which
    tarfile and GNU tar read as a directory."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    h = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    h[156:157] = b"\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def test_old_style_directories_are_directories(tmp_path: Path) -> None:
    body = _tar([_file("d/s1.jpg"), _file("d/s1.cls", 1)])
    path = tmp_path / "v7.tar"
    path.write_bytes(_v7_directory("d/") + body)
    with tarfile.open(path) as tf:
        assert next((m.name, m.isdir()) for m in tf) == ("d", True)
    idx = scan_tar(str(path))
    assert idx.keys == ["d/s1"] and idx.fields == ["jpg", "cls"]
    assert idx.bad == [] and idx.ignored == []


def test_a_regular_file_named_like_a_directory_is_an_error(tmp_path: Path) -> None:
    # type '0' with a trailing '/' is a file without a file name: named in the error
    path = tmp_path / "odd.tar"
    path.write_bytes(_tar([_file("s1.jpg"), _file("s2/")]))
    with pytest.raises(ShardError) as info:
        scan_tar(str(path), shard="odd")
    assert info.value.reason == "tar member 's2/' has no sample key and field (want 'key.ext')"
    assert info.value.shard == "odd" and info.value.key is None
    idx = scan_tar(str(path), shard="odd", skip=True)
    assert idx.keys == ["s1"]
    assert [(b.shard, b.key, b.reason) for b in idx.bad] == [
        ("odd", None, "tar member 's2/' has no sample key and field (want 'key.ext')")
    ]


def test_a_duplicate_field_names_its_sample(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar([_file("s1.jpg"), _file("s1.cls"), _file("s1.JPG"), _file("s2.jpg")]))
    with pytest.raises(ShardError) as info:
        scan_tar(str(path), shard="dup")
    assert info.value.key == "s1"
    assert info.value.reason == "duplicate field 'jpg' in sample"
    idx = scan_tar(str(path), shard="dup", skip=True)
    assert idx.keys == ["s2"]
    assert [(b.key, b.reason) for b in idx.bad] == [("s1", "duplicate field 'jpg' in sample")]


def test_a_dali_index_may_leave_out_old_style_directories(tmp_path: Path) -> None:
    path = tmp_path / "v7.tar"
    path.write_bytes(_v7_directory("d/") + _tar([_file("d/s1.jpg"), _file("d/s1.cls", 1)]))
    assert write_dali_idx(scan_tar(str(path)), str(tmp_path / "v7.idx")) is None
    idx = read_dali_idx(str(tmp_path / "v7.idx"), str(path))
    assert idx.keys == ["d/s1"] and idx.fields == ["jpg", "cls"]


def test_an_index_without_samples_keeps_int64_columns(tmp_path: Path) -> None:
    # empty lists would become float64 arrays; offsets and sizes index and slice files
    path = tmp_path / "meta_only.tar"
    path.write_bytes(_tar([_file("README"), _file("s1/")]))  # skipped: no samples left
    idx = scan_tar(str(path), skip=True)
    back = TarIndex.from_json(json.loads(json.dumps(idx.to_json())))
    for i in (idx, back):
        assert i.num_samples == 0 and i.ignored == ["README"] and len(i.bad) == 1
        assert [a.dtype for a in (i.starts, i.offsets, i.sizes)] == [np.dtype(np.int64)] * 3
        members, bounds = i.select(np.zeros(0, dtype=np.int64), {"jpg"})
        assert members.dtype == bounds.dtype == np.int64 and bounds.tolist() == [0]


def test_a_checksum_that_needs_all_six_digits(tmp_path: Path) -> None:
    # a header full of non-ASCII bytes sums past 0o77777: its checksum's first digit is not 0
    path = tmp_path / "utf8.tar"
    path.write_bytes(_tar([_file("é" * 70 + "/" + "ü" * 45 + ".jpg")]))
    raw = path.read_bytes()
    assert raw[148:149] != b"0" and tarfile.nti(raw[148:156]) > 0o77777
    idx = scan_tar(str(path))
    assert idx.keys == ["é" * 70 + "/" + "ü" * 45] and idx.fields == ["jpg"]
