"""How a tar scan fails: each kind of damage, raised with its exact reason, the shard and the
key where one is known, or (``skip=True``) listed with where the loss starts; and the PAX
record parser against records built by the POSIX definition."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mmload.errors import ShardError
from mmload.sources.tar import _pax_path, scan_tar


def _record(key: str, value: bytes) -> bytes:
    """One PAX record, ``"%d %s=%s\\n"``, whose decimal length counts itself (POSIX pax)."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_pax_path_reads_the_path_record() -> None:
    recs = _record("mtime", b"1.5") + _record("path", b"dir/a=b.jpg") + _record("uid", b"7")
    assert _pax_path(recs) == "dir/a=b.jpg"  # the first '=' ends the key
    assert _pax_path(recs + b"\0" * 300) == "dir/a=b.jpg"  # NUL padding after the records
    assert _pax_path(_record("mtime", b"1") + b"\0\0") is None
    assert _pax_path(b"") is None
    long = _record("path", b"x" * 200 + b".jpg")  # a three-digit length
    assert _pax_path(_record("a", b"1") + long) == "x" * 200 + ".jpg"
    raw = b"caf\xe9.jpg"  # not UTF-8: kept byte for byte (surrogate escapes)
    assert _pax_path(_record("path", raw)) == raw.decode("utf-8", "surrogateescape")
    assert _pax_path(_record("path", "é.jpg".encode())) == "é.jpg"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"path=a.jpg\n", "PAX record at 0 has no decimal length"),
        (_record("a", b"1") + b"x9 path=a\n", "PAX record at 6 has no decimal length"),
        (b"99 path=a.jpg\n", "PAX record of length 99 at 0 does not fit its header"),
        (b"1 path=a\n", "PAX record of length 1 at 0 does not fit its header"),
        (b"12 path=a.jpX", "PAX record of length 12 at 0 does not fit its header"),
    ],
)
def test_pax_path_refuses_malformed_records(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="PAX record") as info:
        _pax_path(data)
    assert str(info.value) == message


def _base(path: Path) -> tuple[Path, list[int]]:
    """Three samples (a 1-byte and a 600-byte member each); the header offsets."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(3):
            for ext, data in (("cls", b"%d" % i), ("bin", bytes([i + 1]) * 600)):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        headers = [m.offset for m in tf.getmembers()]
    return path, headers


def _fix_checksum(raw: bytearray, at: int) -> None:
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


def _damaged(tmp_path: Path, how: str) -> tuple[str, str, str | None, int]:
    """A damaged copy of the base tar: (path, reason, key, where the loss starts)."""
    path, headers = _base(tmp_path / f"{how}.tar")
    raw = bytearray(path.read_bytes())
    k1 = headers[2]  # k1.cls's header
    data_end = headers[-1] + 512 + 1024  # the last member's data and padding
    if how == "no end blocks":
        del raw[data_end:]
        out = (
            f"truncated tar: ends at byte {data_end} without the end-of-archive blocks",
            None,
            data_end,
        )
    elif how == "partial header":
        del raw[k1 + 100 :]
        out = (f"truncated tar: partial header at byte {k1}", None, k1)
    elif how == "zero block then data":
        raw[k1 : k1 + 512] = bytes(512)
        out = (f"corrupt tar: a zero block at byte {k1} is followed by more data", None, k1)
    elif how == "overwritten header":
        raw[k1 + 3] ^= 0xFF
        out = (f"corrupt tar header at byte {k1} (truncated or overwritten)", None, k1)
    elif how == "bad size field":
        raw[k1 + 124 : k1 + 136] = b"zzzzzzzzzzz\0"
        _fix_checksum(raw, k1)
        out = (f"corrupt tar header at byte {k1}: size field: ", None, k1)
    elif how == "cut in a member":
        k1_bin = headers[3]
        del raw[k1_bin + 512 + 100 :]
        size = len(raw)
        out = (
            f"truncated tar: member 'k1.bin' needs bytes up to {k1_bin + 512 + 600}, file has {size}",
            "k1",
            k1_bin,
        )
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(raw))
    return str(path), *out


DAMAGE = [
    "no end blocks", "partial header", "zero block then data", "overwritten header",
    "bad size field", "cut in a member",
]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_raised_with_reason_shard_and_key(tmp_path: Path, how: str) -> None:
    path, reason, key, _ = _damaged(tmp_path, how)
    with pytest.raises(ShardError) as info:
        scan_tar(path, shard="S")
    assert info.value.reason.startswith(reason), info.value.reason
    assert (info.value.shard, info.value.key) == ("S", key)


@pytest.mark.parametrize("how", DAMAGE)
def test_damage_skipped_keeps_the_samples_before_and_lists_the_loss(
    tmp_path: Path, how: str
) -> None:
    path, reason, key, at = _damaged(tmp_path, how)
    idx = scan_tar(path, shard="S", skip=True)
    full = scan_tar(str(_base(tmp_path / "ok.tar")[0]))
    bad = [(b.shard, b.key, b.reason) for b in idx.bad]
    lost = [r for s, k, r in bad if k is None]
    assert len(lost) == 1 and lost[0].startswith(reason)
    assert lost[0].endswith(f"; any samples after byte {at} are lost")
    assert all(s == "S" for s, _, _ in bad)
    if key is None:
        assert len(bad) == 1
    else:  # the sample whose member is cut is listed and left out
        assert [(k, r.endswith(f"; sample {key!r} is incomplete")) for _, k, r in bad[:1]] == [
            (key, True)
        ]
        assert key not in idx.keys
    # What came before the damage is indexed exactly as in the undamaged tar.
    n = idx.num_samples
    assert idx.keys == full.keys[:n]
    assert idx.offsets.tolist() == full.offsets[: len(idx.offsets)].tolist()
    assert n >= (3 if how == "no end blocks" else 1)


def test_files_that_are_no_tar(tmp_path: Path) -> None:
    cases = {
        "short": (b"x" * 100, "not a tar file (shorter than one tar header)"),
        "text": (b"hello world\n" * 100, "not a tar file (bad header checksum at byte 0)"),
        "empty tar": (bytes(10240), "tar shard holds no samples"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        for skip in (False, True):
            with pytest.raises(ShardError) as info:
                scan_tar(str(tmp_path / name), shard="S", skip=skip)
            assert (info.value.reason, info.value.shard, info.value.key) == (reason, "S", None)
    with pytest.raises(ShardError) as info:
        scan_tar(str(tmp_path / "missing.tar"), shard="S")
    assert (info.value.reason, info.value.shard) == ("shard file not found", "S")
    with pytest.raises(ShardError) as info:
        scan_tar(str(tmp_path / "missing.tar"))  # the path names the shard by default
    assert info.value.shard == str(tmp_path / "missing.tar")
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(ShardError) as info:
        scan_tar(str(tmp_path / "dir.tar"), shard="S")
    assert info.value.reason in (
        "cannot read shard: Is a directory",
        "cannot open shard: Is a directory",
    )
    assert info.value.shard == "S"


def test_end_blocks_and_zero_padding_of_any_length(tmp_path: Path) -> None:
    path, _ = _base(tmp_path / "a.tar")
    raw = path.read_bytes()
    want = scan_tar(str(path)).keys
    for extra in (0, 512, 3 << 20):  # record padding past one 1 MiB read
        path.write_bytes(raw + bytes(extra))
        assert scan_tar(str(path)).keys == want
    # One non-zero byte 2 MiB into the zeros: the zero block is followed by more data.
    end = raw.rstrip(b"\0")
    first_zero = -(-len(end) // 512) * 512
    path.write_bytes(raw + bytes(2 << 20) + b"x")
    with pytest.raises(
        ShardError, match=f"a zero block at byte {first_zero} is followed by more data"
    ):
        scan_tar(str(path))


def test_empty_file_long_name_and_huge_sizes(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError) as info:
        scan_tar(str(tmp_path / "empty.tar"), shard="S")
    assert info.value.reason == "not a tar file (shorter than one tar header)"
    with pytest.raises(ShardError) as info:  # the file system refuses the name itself
        scan_tar(str(tmp_path / ("x" * 300 + ".tar")), shard="S")
    assert (info.value.reason, info.value.shard) == ("cannot open shard: File name too long", "S")
    # A size that needs all 11 octal digits (8**10 bytes): read whole, not from 10 of them.
    path, _ = _base(tmp_path / "big.tar")
    raw = bytearray(path.read_bytes())
    raw[124:136] = b"10000000000\0"
    _fix_checksum(raw, 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError) as info:
        scan_tar(str(path))
    assert info.value.reason == (
        f"truncated tar: member 'k0.cls' needs bytes up to {512 + 8**10}, file has {len(raw)}"
    )


def _gnu_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_ending_exactly_at_a_members_end(tmp_path: Path) -> None:
    """The last member's data fills its blocks and the file stops there: every member is
    whole, the end-of-archive blocks are missing (the tar was cut at a member boundary)."""
    path = _gnu_tar(tmp_path / "a.tar", [("k0.cls", b"0"), ("k1.bin", b"z" * 1024)])
    raw = path.read_bytes()
    end = 512 + 512 + 512 + 1024
    path.write_bytes(raw[:end])
    with pytest.raises(ShardError) as info:
        scan_tar(str(path), shard="S")
    assert info.value.reason == (
        f"truncated tar: ends at byte {end} without the end-of-archive blocks"
    )
    assert info.value.key is None
    assert scan_tar(str(path), skip=True).keys == ["k0", "k1"]


def _gnu_long(path: Path, name: str | bytes, data: bytes = b"x") -> bytearray:
    with tarfile.open(
        path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        first = tarfile.TarInfo("k0.cls")
        first.size = 1
        tf.addfile(first, io.BytesIO(b"0"))
        info = tarfile.TarInfo(
            name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")
        )
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return bytearray(path.read_bytes())


def test_cut_inside_the_padding_names_the_member(tmp_path: Path) -> None:
    path, headers = _base(tmp_path / "a.tar")
    raw = path.read_bytes()
    last = headers[-1]  # k2.bin: 600 bytes of data, padded to 1024
    cut = last + 512 + 700
    path.write_bytes(raw[:cut])
    with pytest.raises(ShardError) as info:
        scan_tar(str(path), shard="S")
    assert (
        info.value.reason == f"truncated tar: cut inside the padding of the member at byte {last}"
    )
    assert info.value.key == "k2"
    idx = scan_tar(str(path), shard="S", skip=True)
    assert idx.keys == ["k0", "k1"]
    assert [b.key for b in idx.bad] == ["k2", None]


def test_long_names_huge_name_headers_and_bad_pax(tmp_path: Path) -> None:
    name = b"caf\xe9-" + b"x" * 120 + b".jpg"  # not UTF-8, longer than a header holds
    raw = _gnu_long(tmp_path / "a.tar", name)
    (tmp_path / "a.tar").write_bytes(bytes(raw))
    idx = scan_tar(str(tmp_path / "a.tar"))
    assert idx.keys == ["k0", name[:-4].decode("utf-8", "surrogateescape")]
    # The GNU long-name header ('L') claims more than 1 MiB: refused, not read into memory.
    at = next(p for p in range(0, len(raw), 512) if raw[p + 156 : p + 157] == b"L")
    for size, refused in (((1 << 20) + 1, True), (1 << 20, False)):
        big = bytearray(raw)
        big[at + 124 : at + 136] = b"%011o\0" % size
        _fix_checksum(big, at)
        (tmp_path / "b.tar").write_bytes(bytes(big) + bytes(3 << 20))
        if refused:
            with pytest.raises(ShardError) as info:
                scan_tar(str(tmp_path / "b.tar"), shard="S")
            assert info.value.reason == (
                f"corrupt tar header at byte {at}: a name header of {size} bytes"
            )
            skipped = scan_tar(str(tmp_path / "b.tar"), shard="S", skip=True)
            assert skipped.keys == ["k0"]
            assert skipped.bad[0].reason.endswith(f"any samples after byte {at} are lost")
        else:  # 1 MiB exactly is read (it swallows the member after it; zeros follow)
            assert scan_tar(str(tmp_path / "b.tar")).keys == ["k0"]
    # A PAX header whose records do not parse.
    with tarfile.open(tmp_path / "p.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("k0.cls")
        info.size = 1
        info.pax_headers = {"comment": "x"}
        tf.addfile(info, io.BytesIO(b"0"))
    raw = bytearray((tmp_path / "p.tar").read_bytes())
    assert raw[156:157] == b"x"
    raw[512:514] = b"zz"  # the first record's length
    (tmp_path / "p.tar").write_bytes(bytes(raw))
    skipped = scan_tar(str(tmp_path / "p.tar"), shard="S", skip=True)
    assert [b.reason for b in skipped.bad] == [
        "corrupt PAX header at byte 0: PAX record at 0 has no decimal length; "
        "any samples after byte 0 are lost"
    ]


def test_a_member_outside_any_sample_cut_short(tmp_path: Path) -> None:
    """A README cut inside its data or its padding: the shard's error has no sample key."""
    path = _gnu_tar(tmp_path / "r.tar", [("k0.cls", b"0"), ("README", b"r" * 600)])
    raw = path.read_bytes()
    at = 1024  # README's header
    for cut, reason in (
        (
            at + 812,
            f"truncated tar: member 'README' needs bytes up to {at + 1112}, file has {at + 812}",
        ),
        (at + 1212, f"truncated tar: cut inside the padding of the member at byte {at}"),
    ):
        path.write_bytes(raw[:cut])
        with pytest.raises(ShardError) as info:
            scan_tar(str(path), shard="S")
        assert (info.value.reason, info.value.key) == (reason, None)
        idx = scan_tar(str(path), shard="S", skip=True)
        assert idx.keys == ["k0"]
        assert [(b.key, b.reason) for b in idx.bad] == [
            (None, f"{reason}; any samples after byte {at} are lost")
        ]


def test_a_cut_inside_the_padding_lists_the_sample_and_the_loss(tmp_path: Path) -> None:
    path, headers = _base(tmp_path / "a.tar")
    last = headers[-1]
    path.write_bytes(path.read_bytes()[: last + 512 + 700])
    reason = f"truncated tar: cut inside the padding of the member at byte {last}"
    idx = scan_tar(str(path), shard="S", skip=True)
    assert [(b.shard, b.key, b.reason) for b in idx.bad] == [
        ("S", "k2", f"{reason}; sample 'k2' is incomplete"),
        ("S", None, f"{reason}; any samples after byte {last} are lost"),
    ]


def test_a_pax_header_over_1_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, pax in (("k0.cls", {}), ("k1.cls", {"comment": "c" * (1 << 20)})):
            info = tarfile.TarInfo(name)
            info.size = 1
            info.pax_headers = pax
            tf.addfile(info, io.BytesIO(b"1"))
    raw = path.read_bytes()
    at = 1024  # k0's header and data, then k1's PAX header
    assert raw[at + 156 : at + 157] == b"x"
    size = int(raw[at + 124 : at + 135], 8)
    assert size > 1 << 20
    with pytest.raises(ShardError) as info:
        scan_tar(str(path), shard="S")
    assert info.value.reason == f"corrupt tar header at byte {at}: a name header of {size} bytes"
    assert scan_tar(str(path), shard="S", skip=True).keys == ["k0"]


@pytest.mark.parametrize("typeflag", [b"g", b"K", b"5"])
def test_headers_that_are_no_members_are_skipped_whatever_their_name(
    tmp_path: Path, typeflag: bytes
) -> None:
    # a global PAX header as GNU tar names it, a long link name, a directory written without
    # its trailing '/': names that look like 'key.field' but are not sample members
    info = tarfile.TarInfo("GlobalHead.7.1" if typeflag == b"g" else "frames.v2")
    h = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    h[156:157] = typeflag
    _fix_checksum(h, 0)
    path, _ = _base(tmp_path / "a.tar")
    body = path.read_bytes()
    path.write_bytes(bytes(h) + body)
    idx = scan_tar(str(path), shard="S")
    assert idx.keys == ["k0", "k1", "k2"] and idx.bad == [] and idx.ignored == []


def test_a_member_of_8_gib_or_more(tmp_path: Path) -> None:
    """GNU base-256 sizes (a member of 8 GiB or more), in a sparse file: only headers are read."""
    big = (1 << 33) + 5
    info = tarfile.TarInfo("k0.bin")
    info.size = big
    h = info.tobuf(tarfile.GNU_FORMAT)
    assert h[124] & 0x80  # base-256: 11 octal digits cannot hold it
    small = tarfile.TarInfo("k1.cls")
    small.size = 1
    nxt = 512 + -(-big // 512) * 512
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        f.write(h)
        f.seek(nxt)
        f.write(small.tobuf(tarfile.GNU_FORMAT) + b"1".ljust(512, b"\0") + bytes(1024))
    idx = scan_tar(str(path))
    assert idx.keys == ["k0", "k1"]
    assert idx.sizes.tolist() == [big, 1] and idx.offsets.tolist() == [512, nxt + 512]
