"""DALI ``.idx`` files: read against indexes DALI's own ``wds2idx`` writes, written back, and
every way a stale or corrupt index is refused (with the message that names it); the member
selection a read uses, against a per-row loop."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmload.errors import BadEntry, ShardError
from mmload.sources.tar import TarIndex, read_dali_idx, scan_tar, write_dali_idx


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> str:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _samples(n: int, fields: tuple[str, ...] = ("jpg", "cls", "txt")) -> list[tuple[str, bytes]]:
    return [(f"k{i:03d}.{f}", f"{f}-{i}".encode() * (i + 1)) for i in range(n) for f in fields]


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _dali_index(tar_path: str, idx_path: str) -> str:
    from wds2idx import IndexCreator

    with IndexCreator(tar_path, idx_path, verbose=False) as ic:
        ic.create_index()
    return idx_path


def _same(a: TarIndex, b: TarIndex) -> None:
    assert a.keys == b.keys
    assert a.fields == b.fields
    assert a.starts.tolist() == b.starts.tolist()
    assert a.offsets.tolist() == b.offsets.tolist()
    assert a.sizes.tolist() == b.sizes.tolist()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_read_equals_scan_on_indexes_dali_wrote(tmp_path: Path, fmt: int) -> None:
    members = [("dir/", b""), *_samples(5)]
    if fmt == tarfile.PAX_FORMAT:  # a name past 100 bytes (GNU long names: the next test)
        members.append(("x" * 150 + ".jpg", b"long"))
    path = _tar(tmp_path / "a.tar", members, fmt)
    idx_path = _dali_index(path, str(tmp_path / "a.idx"))
    assert _lines(idx_path)[0].split()[0] == "v1.2"
    _same(read_dali_idx(idx_path, path), scan_tar(path))


def test_dali_misplaced_gnu_long_name_members_are_refused_not_misread(tmp_path: Path) -> None:
    """wds2idx (DALI 2.x with GNU tar 1.34) lists a GNU long-name member's data one block after
    its first header, which is the long name itself; reading there would return the name's
    bytes as the sample. The index is refused instead."""
    path = _tar(tmp_path / "a.tar", [("a.jpg", b"1"), ("x" * 150 + ".jpg", b"long")])
    idx_path = _dali_index(path, str(tmp_path / "a.idx"))
    listed = int(_lines(idx_path)[2].split()[1])
    with tarfile.open(path) as tf:
        data_at = tf.getmembers()[1].offset_data
    if listed == data_at:  # a fixed wds2idx: the index is right and reads like a scan
        _same(read_dali_idx(idx_path, path), scan_tar(path))
        return
    with pytest.raises(ShardError, match=r"DALI index .* disagrees with the tar"):
        read_dali_idx(idx_path, path)


def test_v11_index_equals_scan(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(4, ("jpg", "json")))
    v12 = _lines(_dali_index(path, str(tmp_path / "a.idx")))
    count = v12[0].split()[1]
    lines = []
    for line in v12[1:]:  # drop the names: ext offset size per member
        tok = line.split()
        lines.append(" ".join(" ".join(tok[j : j + 3]) for j in range(0, len(tok), 4)))
    (tmp_path / "v11.idx").write_text(f"v1.1 {count}\n" + "\n".join(lines) + "\n\n")
    _same(read_dali_idx(str(tmp_path / "v11.idx"), path), scan_tar(path))
    # A v1.1 index that disagrees with the tar names the sample.
    wrong = lines[:]
    a, b, c = wrong[2].split()[:3]
    wrong[2] = " ".join([a, str(int(b) + 512), c, *wrong[2].split()[3:]])
    (tmp_path / "bad.idx").write_text(f"v1.1 {count}\n" + "\n".join(wrong) + "\n")
    with pytest.raises(ShardError, match="disagrees with the tar at sample 2") as info:
        read_dali_idx(str(tmp_path / "bad.idx"), path)
    assert info.value.key == "k002"
    (tmp_path / "few.idx").write_text(f"v1.1 {count}\n" + "\n".join(lines[:3]) + "\n")
    with pytest.raises(ShardError, match="announces 4 samples, lists 3"):
        read_dali_idx(str(tmp_path / "few.idx"), path)
    (tmp_path / "more.idx").write_text("v1.1 5\n" + "\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(ShardError, match="lists 5 samples, the tar holds 4"):
        read_dali_idx(str(tmp_path / "more.idx"), path)
    for bad in ("jpg 1 2 json", "jpg x 2", "jpg 1 -2", "jpg 1 2 3"):
        (tmp_path / "m.idx").write_text(f"v1.1 1\n{bad}\n")
        with pytest.raises(ShardError, match="malformed line"):
            read_dali_idx(str(tmp_path / "m.idx"), path)


def _rewrite(tmp_path: Path, lines: list[str], name: str = "edit.idx") -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_stale_or_corrupt_v12_indexes_are_refused(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", [("dir/", b""), *_samples(4)])
    good = _lines(_dali_index(path, str(tmp_path / "a.idx")))
    head, rows = good[0], good[1:]
    cases: list[tuple[list[str], str]] = [
        (["v1.3 4", *rows], "unsupported header"),
        (["v1.2", *rows], "unsupported header"),
        (["v1.2 4 extra", *rows], "unsupported header"),
        (["v1.2 four", *rows], "unsupported header"),
        (["v1.2 5", *rows], "announces 5 samples, lists 4"),
        ([head, *rows, rows[0].rsplit(" ", 1)[0]], "malformed line"),
        ([head, *rows[:-1], rows[-1].replace(" ", " x", 1)], "malformed line"),
        (["v1.2 3", *rows[:3]], "leaves out the tar member 'k003.jpg'"),
        (["v1.2 3", *rows[1:]], "leaves out the tar member 'k000.jpg'"),
        ([head, *rows[:-1], "jpg 99999999 4 k9.jpg"], "points past the end of the tar"),
    ]
    # A member listed one block early (at its own header): inside what the index covers already.
    third = rows[2].split()
    early = int(third[1]) - 512
    shifted = " ".join([third[0], str(early), *third[2:]])
    cases.append(([head, *rows[:2], shifted, rows[3]], f"no member's data starts at byte {early}"))
    # Counts: up to 18 digits (all fit in int64) are numbers; 19 digits are refused unread.
    cases.append(([head, *rows[:-1], "jpg 100000000000000000 4 k9.jpg"], "points past the end"))
    cases.append(([head, *rows[:-1], "jpg 1000000000000000000 4 k9.jpg"], "malformed line"))
    cases.append(([head, *rows[:-1], "jpg 1 ４ k9.jpg"], "malformed line"))  # a non-ASCII digit
    for i, (lines, message) in enumerate(cases):
        with pytest.raises(ShardError, match=message) as info:
            read_dali_idx(_rewrite(tmp_path, lines, f"e{i}.idx"), path, shard="the-shard")
        assert info.value.shard == "the-shard"
        assert "DALI index" in str(info.value), message
    with pytest.raises(ShardError, match="cannot read DALI index"):
        read_dali_idx(str(tmp_path / "missing.idx"), path)
    with pytest.raises(ShardError, match="cannot stat shard"):
        read_dali_idx(str(tmp_path / "a.idx"), str(tmp_path / "missing.tar"))


def test_a_corrupt_header_between_members_is_refused(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(3))
    idx = _dali_index(path, str(tmp_path / "a.idx"))
    lines = _lines(idx)
    # Drop sample 1 from the index and break its first header's checksum: the gap is not a header.
    data = bytearray(Path(path).read_bytes())
    off = int(lines[2].split()[1]) - 512
    data[off + 148 : off + 156] = b"0000000\0"
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"no tar header at byte {off}"):
        read_dali_idx(_rewrite(tmp_path, ["v1.2 2", lines[1], lines[3]]), path)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    members = [*_samples(3), ("x" * 120 + ".cls", b"7")]
    path = _tar(tmp_path / "a.tar", members, tarfile.PAX_FORMAT)
    scanned = scan_tar(path)
    target = str(tmp_path / "w.idx")
    assert write_dali_idx(scanned, target) is None
    text = _lines(target)
    assert text[0] == "v1.2 4"
    first = scanned.members(0)[0]
    assert text[1].split()[:4] == [
        "jpg",
        str(scanned.offsets[first]),
        str(scanned.sizes[first]),
        "k000.jpg",
    ]
    _same(read_dali_idx(target, path), scanned)
    # The file DALI itself writes lists the same members.
    dali = _lines(_dali_index(path, str(tmp_path / "d.idx")))
    assert sorted(" ".join(sorted(line.split())) for line in dali) == sorted(
        " ".join(sorted(line.split())) for line in text
    )


def test_write_refuses_names_the_format_cannot_hold(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", [("a b.jpg", b"1"), ("c.jpg", b"2")])
    why = write_dali_idx(scan_tar(path), str(tmp_path / "x.idx"))
    assert why == "key 'a b' contains whitespace, which DALI .idx lines cannot represent"
    assert not (tmp_path / "x.idx").exists()
    path = _tar(tmp_path / "b.tar", [("a.my field", b"1")])
    why = write_dali_idx(scan_tar(path), str(tmp_path / "y.idx"))
    assert why == "field 'my field' contains whitespace, which DALI .idx lines cannot represent"


def test_select_equals_a_per_row_loop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    members = []
    for i in range(30):  # samples with 1-4 of the fields, in varying order
        fields = list(rng.permutation(["jpg", "cls", "txt", "json"])[: rng.integers(1, 5)])
        members += [(f"k{i:02d}.{f}", b"x") for f in fields]
    idx = scan_tar(_tar(tmp_path / "a.tar", members))
    rows = rng.integers(0, 30, 50)  # any order, repeats
    for fields in (None, {"jpg"}, {"cls", "json"}, set(), {"nothing"}):
        got, bounds = idx.select(rows, fields)
        assert got.dtype == np.int64 and bounds.dtype == np.int64
        assert len(bounds) == len(rows) + 1 and bounds[0] == 0
        for i, r in enumerate(rows.tolist()):
            want = [m for m in idx.members(r) if fields is None or idx.fields[m] in fields]
            assert got[bounds[i] : bounds[i + 1]].tolist() == want
        assert bounds[-1] == len(got)


@pytest.mark.parametrize(
    ("typeflag", "what"),
    [
        (tarfile.LNKTYPE, "a hard link"),
        (tarfile.SYMTYPE, "a symbolic link"),
        (tarfile.CHRTYPE, "a character device"),
        (tarfile.BLKTYPE, "a block device"),
        (tarfile.FIFOTYPE, "a FIFO"),
        (b"S", "of unsupported tar type b'S'"),
    ],
)
def test_a_sample_member_that_is_not_a_file_names_its_type(
    tmp_path: Path, typeflag: bytes, what: str
) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("k0.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"1"))
        odd = tarfile.TarInfo("k1.jpg")
        odd.type = typeflag
        odd.linkname = "k0.cls" if typeflag in (tarfile.LNKTYPE, tarfile.SYMTYPE) else ""
        tf.addfile(odd)
    with pytest.raises(ShardError) as info_:
        scan_tar(str(path))
    assert info_.value.reason == f"tar member 'k1.jpg' is {what}, not a regular file"
    assert info_.value.key == "k1"


def test_refusals_name_the_index_the_shard_and_the_line(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(2))
    idx_path = _dali_index(path, str(tmp_path / "a.idx"))
    head, *rows = _lines(idx_path)
    size = Path(path).stat().st_size

    def refused(lines: list[str], name: str = "e.idx") -> ShardError:
        with pytest.raises(ShardError) as info:
            read_dali_idx(_rewrite(tmp_path, lines, name), path, shard="S")
        assert info.value.shard == "S"
        return info.value

    e = refused(["v1.2 2 x y", *rows])
    assert e.reason == (
        f"DALI index {str(tmp_path / 'e.idx')!r}: unsupported header ['v1.2', '2', 'x'] "
        "(want 'v1.2 <count>' or 'v1.1 <count>')"
    )
    long_line = "jpg 1 2 k.jpg " + "k" * 200
    e = refused([head, rows[0], long_line])
    assert e.reason == f"DALI index {str(tmp_path / 'e.idx')!r}: malformed line {long_line[:120]!r}"
    # Past the end by a little: the member starts inside the file, its data runs past it.
    e = refused([head, rows[0], f"jpg {size - 2} 4 k001.jpg"])
    assert "points past the end of the tar (stale index?)" in e.reason
    assert e.key == "k001.jpg"
    # A sample listed twice, a field twice: the builder's errors, raised (never read leniently).
    e = refused(["v1.2 2", rows[0], rows[1], rows[0]])
    assert e.reason == "members of sample 'k000' are not contiguous in the tar"
    first = rows[0].split()[:4]
    e = refused(["v1.2 2", " ".join(first + first), rows[1]])
    assert e.reason == "duplicate field 'jpg' in sample"
    # _check_covers' messages name the index too.
    e = refused(["v1.2 1", rows[1]], "c.idx")
    assert e.reason.startswith(f"DALI index {str(tmp_path / 'c.idx')!r} disagrees with the tar")
    # Unreadable index, missing tar: named by the shard.
    with pytest.raises(ShardError, match="cannot read DALI index") as info:
        read_dali_idx(str(tmp_path / "nope.idx"), path, shard="S")
    assert info.value.shard == "S"
    with pytest.raises(ShardError, match="cannot stat shard") as info:
        read_dali_idx(idx_path, str(tmp_path / "nope.tar"), shard="S")
    assert info.value.shard == "S"


def test_v11_refusals_name_the_index_and_shard(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(2, ("jpg", "json")))
    v12 = _lines(_dali_index(path, str(tmp_path / "a.idx")))
    lines = []
    for line in v12[1:]:
        tok = line.split()
        lines.append(" ".join(" ".join(tok[j : j + 3]) for j in range(0, len(tok), 4)))
    # Blank lines are skipped wherever they are.
    ok = _rewrite(tmp_path, ["v1.1 2", "", lines[0], "", lines[1], ""], "ok.idx")
    _same(read_dali_idx(ok, path), scan_tar(path))
    bad_offset = lines[0].split()
    bad_offset[4] = "x"  # the second member's offset
    p = _rewrite(tmp_path, ["v1.1 2", " ".join(bad_offset), lines[1]], "v.idx")
    with pytest.raises(ShardError) as info:
        read_dali_idx(p, path, shard="S")
    assert info.value.shard == "S"
    assert info.value.reason == f"DALI index {p!r}: malformed line {' '.join(bad_offset)!r}"
    p = _rewrite(tmp_path, ["v1.1 1", lines[0]], "w.idx")
    with pytest.raises(ShardError) as info:
        read_dali_idx(p, path, shard="S")
    assert info.value.shard == "S"
    assert info.value.reason.startswith(f"DALI index {p!r} lists 1 samples, the tar holds 2")


def test_a_tar_without_end_blocks_ending_at_a_members_end(tmp_path: Path) -> None:
    """The last member's data ends exactly at the end of the file (no end-of-archive blocks, a
    size that needs no padding). A scan cannot tell this from a cut tar and refuses it; an index
    that lists every member accounts for all of it, so it is in range and reads."""
    path = tmp_path / "a.tar"
    _tar(path, [("k0.cls", b"1"), ("k1.bin", b"z" * 1024)])
    scanned = scan_tar(str(path))
    end = int(scanned.offsets[-1] + scanned.sizes[-1])
    path.write_bytes(path.read_bytes()[:end])
    with pytest.raises(ShardError, match="without the end-of-archive blocks"):
        scan_tar(str(path))
    assert write_dali_idx(scanned, str(tmp_path / "a.idx")) is None
    _same(read_dali_idx(str(tmp_path / "a.idx"), str(path)), scanned)


def test_tar_index_json_round_trip_keeps_bad_and_ignored(tmp_path: Path) -> None:
    import json

    path = _tar(tmp_path / "a.tar", [("k0.cls", b"1"), ("README", b"r"), ("k1.cls", b"2")])
    idx = scan_tar(path)
    idx.bad.append(BadEntry("a.tar", "k9", "why"))
    back = TarIndex.from_json(json.loads(json.dumps(idx.to_json())))
    _same(back, idx)
    assert back.bad == [BadEntry("a.tar", "k9", "why")]
    assert back.ignored == idx.ignored == ["README"]
    assert back.starts.dtype == back.offsets.dtype == back.sizes.dtype == np.int64


def test_long_malformed_lines_are_cut_at_120_characters(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(1))
    for header, line in (
        ("v1.2 1", "jpg x 2 " + "k" * 200 + ".jpg"),  # 4 tokens, a count that is not one
        ("v1.1 1", "jpg 1 2 " + "k" * 200),  # not 3 tokens per member
    ):
        p = _rewrite(tmp_path, [header, line], "long.idx")
        with pytest.raises(ShardError) as info:
            read_dali_idx(p, path, shard="S")
        assert info.value.reason == f"DALI index {p!r}: malformed line {line[:120]!r}"


def test_v11_messages_and_scan_errors_name_the_shard(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", _samples(2, ("jpg",)))
    v12 = _lines(_dali_index(path, str(tmp_path / "a.idx")))
    lines = [" ".join(line.split()[:3]) for line in v12[1:]]
    p = _rewrite(tmp_path, ["v1.1 3", *lines], "n.idx")
    with pytest.raises(ShardError) as info:
        read_dali_idx(p, path, shard="S")
    assert (info.value.reason, info.value.shard) == (
        f"DALI index {p!r} announces 3 samples, lists 2",
        "S",
    )
    p = _rewrite(tmp_path, ["v1.1 1", lines[0]], "m.idx")
    with pytest.raises(ShardError) as info:
        read_dali_idx(p, path, shard="S")
    assert info.value.reason == (
        f"DALI index {p!r} lists 1 samples, the tar holds 2 (stale index?)"
    )
    swapped = lines[0].split()
    swapped[1] = lines[1].split()[1]
    p = _rewrite(tmp_path, ["v1.1 2", " ".join(swapped), lines[1]], "d.idx")
    with pytest.raises(ShardError, match="disagrees with the tar at sample 0") as info:
        read_dali_idx(p, path, shard="S")
    assert (info.value.shard, info.value.key) == ("S", "k000")
    # The tar scan a v1.1 index needs reports its own errors under the same shard name.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(path).read_bytes()[:700])
    with pytest.raises(ShardError) as info:
        read_dali_idx(_rewrite(tmp_path, ["v1.1 1", lines[0]], "c.idx"), str(cut), shard="S")
    assert info.value.shard == "S"


def test_members_listed_past_the_end_of_archive_are_refused(tmp_path: Path) -> None:
    """Two tars concatenated: the first one's end blocks end the archive, so members listed
    after them are not in it (a reader stops there), whatever the bytes beyond hold."""
    a = _tar(tmp_path / "a.tar", _samples(1, ("jpg",)))
    b = _tar(tmp_path / "b.tar", [("k9.jpg", b"nine")])
    both = tmp_path / "both.tar"
    both.write_bytes(Path(a).read_bytes() + Path(b).read_bytes())
    a_size = Path(a).stat().st_size
    first = _lines(_dali_index(a, str(tmp_path / "a.idx")))[1]
    p = _rewrite(tmp_path, ["v1.2 2", first, f"jpg {a_size + 512} 4 k9.jpg"], "both.idx")
    with pytest.raises(ShardError, match=f"no member's data starts at byte {a_size + 512}"):
        read_dali_idx(p, str(both), shard="S")


def _set_name(block: bytearray, name: bytes) -> None:
    """Rename a tar header in place and fix its checksum (the tar format's definition)."""
    block[0:100] = name.ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def test_headers_between_indexed_members(tmp_path: Path) -> None:
    """What may stand in the gaps between the members an index lists: extension headers
    whatever their names (GNU tar names PAX headers 'PaxHeaders/<member>'), directories, and
    links not named like sample members. A link named like one is a member the index left out."""
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("k0.cls", b"0"), ("k1.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "k1.cls":
                info.pax_headers = {"comment": "an extended header before k1"}
                link = tarfile.TarInfo("latest")
                link.type = tarfile.SYMTYPE
                link.linkname = "k0.cls"
                tf.addfile(link)
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    x_at = next(p for p in range(0, len(raw), 512) if raw[p + 156 : p + 157] == b"x")
    block = raw[x_at : x_at + 512]
    _set_name(block, b"PaxHeaders/k1.cls")
    raw[x_at : x_at + 512] = block
    path.write_bytes(bytes(raw))
    scanned = scan_tar(str(path))
    assert scanned.keys == ["k0", "k1"]
    assert write_dali_idx(scanned, str(tmp_path / "a.idx")) is None
    _same(read_dali_idx(str(tmp_path / "a.idx"), str(path)), scanned)
    # The same link named like a sample member: the index leaves a member out.
    link_at = next(p for p in range(0, len(raw), 512) if raw[p + 156 : p + 157] == b"2")
    block = raw[link_at : link_at + 512]
    _set_name(block, b"k5.jpg")
    raw[link_at : link_at + 512] = block
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"leaves out the tar member 'k5.jpg' at byte {link_at}"):
        read_dali_idx(str(tmp_path / "a.idx"), str(path))


@pytest.mark.parametrize(
    ("shard", "present", "found"),
    [
        ("a.tar", ["a.idx"], "a.idx"),
        ("a.tar", ["a.tar.idx", "a.idx"], "a.tar.idx"),  # the full name first
        ("train.000.tar", ["train.000.idx", "train.idx"], "train.000.idx"),  # one per shard
        ("train.000.tar", ["train.idx"], None),  # another shard's (or no shard's) index
        ("d.v1/x.tar", ["d.v1/x.idx", "d.idx"], "d.v1/x.idx"),  # dots in directories
        ("d.v1/x", ["d.idx", "d.v1/x.idx"], "d.v1/x.idx"),
        ("d.v1/x", ["d.idx"], None),
        ("d/.hidden.tar", ["d/.hidden.idx", "d/.idx"], "d/.hidden.idx"),
        ("d/.hidden", ["d/.idx"], None),  # a leading dot starts the name
        ("d/ab.tar", ["d/ab.idx"], "d/ab.idx"),
    ],
)
def test_which_idx_file_belongs_to_a_shard(
    tmp_path: Path, shard: str, present: list[str], found: str | None
) -> None:
    from mmload.sources.index import _dali_idx_for

    for name in present:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1.2 0\n")
    got = _dali_idx_for(str(tmp_path / shard))
    assert got == (None if found is None else str(tmp_path / found))


def test_write_then_read_keeps_names_that_are_not_utf8(tmp_path: Path) -> None:
    # a Latin-1 name (bytes that are not UTF-8): written and read back byte for byte
    name = b"caf\xe9-1".decode("utf-8", "surrogateescape")
    path = str(tmp_path / "latin1.tar")
    with tarfile.open(
        path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for n in (name + ".jpg", name + ".cls", "k2.jpg"):
            info = tarfile.TarInfo(n)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"1"))
    scanned = scan_tar(path)
    assert scanned.keys == [name, "k2"]
    target = str(tmp_path / "latin1.idx")
    assert write_dali_idx(scanned, target) is None
    assert b"caf\xe9-1.jpg" in Path(target).read_bytes()
    _same(read_dali_idx(target, path), scanned)
