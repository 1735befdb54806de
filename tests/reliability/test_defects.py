"""Regression tests for the bad-data defects of issue 7, one or more per defect.

Each test fails on the code before the fix: a crash (run in a forked child), a hang (bounded by
a timeout), a silent loss (keys neither yielded nor listed), a foreign exception or a batch
field that changes type.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch

from mmload import AudioConfig, DecodeError, ImageConfig, Jagged, Loader, ShardError
from mmload.decode.audio import decode_audio
from mmload.demo import make_wav
from mmload.errors import MmloadError
from mmload.sources import Dataset
from mmload.sources.tar import read_dali_idx, scan_tar

SMALL = ImageConfig(size=16, backend="pil")


def _tar(path: Path, members: list[tuple[str, bytes]], *, eoa: bool = True) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    if not eoa:
        raw = path.read_bytes()
        end = _end_of_members(path)
        path.write_bytes(raw[:end])
    return path


def _end_of_members(path: Path) -> int:
    with tarfile.open(path) as t:
        last = t.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _samples(n: int, jpegs: list[bytes], prefix: str = "k") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [
            (f"{prefix}{i:03d}.jpg", jpegs[i % len(jpegs)]),
            (f"{prefix}{i:03d}.cls", b"%d" % i),
        ]
    return out


def _run(source: Any, mode: str, tmp_path: Path, **kw: Any) -> tuple[list[str], Loader]:
    """Every key of one epoch; the loader (closed) for its stats."""
    kw.setdefault("image", SMALL)
    L = Loader(
        source,
        batch_size=4,
        on_error=mode,
        max_bad_samples=10**6 if mode == "skip" else 0,
        cache_dir=tmp_path / "cache",
        index_cache=False,
        **kw,
    )
    with L:
        keys = [k for b in L for k in b["__key__"]]
    return keys, L


def _in_child(fn: Any, *args: Any, timeout: float = 120) -> Any:
    """Run ``fn(*args)`` in a forked process: a crash is a failed assertion, not a dead pytest."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target() -> None:
        try:
            child.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts
            child.send(("error", f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=target)
    p.start()
    ready = parent.poll(timeout)
    result = parent.recv() if ready else None
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode == 0, f"child died with exit code {p.exitcode} (signal = crash), {result}"
    assert result is not None, "child hung"
    return result


# -- 1. corrupt Arrow IPC: validated before use, never a SIGSEGV -----------------------------------


def _read_all_arrow(path: str) -> dict[str, int]:
    counts = {"ok": 0, "shard_error": 0}
    try:
        ds = Dataset.open(path, index_cache=False)
    except ShardError:
        counts["shard_error"] += 1
        return counts
    for r in ds.read(np.arange(ds.num_samples)):
        counts["ok" if isinstance(r, dict) else "shard_error"] += 1
    ds.close()
    return counts


def test_bit_flipped_arrow_ipc_is_a_shard_error_not_a_crash(tmp_path: Path) -> None:
    n = 64
    t = pa.table(
        {
            "__key__": [f"k{i}" for i in range(n)],
            "txt": ["word " * (i % 7) for i in range(n)],
            "blob": [bytes([i]) * (i + 1) for i in range(n)],
        }
    )
    good = tmp_path / "good.arrow"
    with ipc.new_file(good, t.schema) as w:
        for b in t.to_batches(max_chunksize=16):
            w.write_batch(b)
    raw = good.read_bytes()
    rng = random.Random(7)
    errors = 0
    for trial in range(40):
        b = bytearray(raw)
        for _ in range(4):  # flips inside the record batch bodies (after the schema message)
            i = rng.randrange(256, len(b) - 256)
            b[i] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{trial}.arrow"
        p.write_bytes(bytes(b))
        status, counts = _in_child(_read_all_arrow, str(p))
        assert status == "ok", counts  # only ShardErrors: anything else reached the parent
        errors += counts["shard_error"]
    assert errors > 0, "some flips must be detected, or the test proves nothing"


def test_invalid_utf8_in_a_parquet_string_column_is_a_shard_error(tmp_path: Path) -> None:
    bad = pa.array([b"fine", b"\xff\xfe"], pa.binary()).view(pa.string())  # unvalidated bytes
    p = tmp_path / "utf.parquet"
    pq.write_table(pa.table({"__key__": ["a", "b"], "txt": bad}), p)
    with pytest.raises(ShardError, match="Invalid UTF8") as e:
        _run(str(p), "raise", tmp_path)
    assert "utf.parquet" in str(e.value)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"__key__": ["g0", "g1", "g2"], "txt": ["x", "y", "z"]}), good)
    L = Loader(
        [str(good), str(p)],
        batch_size=5,
        on_error="skip",
        max_bad_samples=2,
        cache_dir=tmp_path / "c",
        index_cache=False,
    )
    with L:
        keys = [k for b in L for k in b["__key__"]]
    assert sorted(set(keys)) == ["g0", "g1", "g2"]
    bad = L.stats()["bad"]
    assert len(bad) == 2 and all(x["shard"] == str(p) for x in bad)


# -- 2. negative sizes: an error, never an endless scan -------------------------------------------


def _rewrite_size(raw: bytes, header: int, field: bytes) -> bytes:
    h = bytearray(raw[header : header + 512])
    h[124:136] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return raw[:header] + bytes(h) + raw[header + 512 :]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "field", [b"-0000000001\0", b"\xff" * 12, b"0000000001x\0", b"1_0\0" + b" " * 8]
)
@pytest.mark.parametrize("member", [0, 1])
def test_bad_size_fields_end_the_scan(
    tmp_path: Path, field: bytes, member: int, jpegs: list[bytes]
) -> None:
    """A negative (octal ``-1`` or base-256), non-octal or underscore size on a directory entry
    (member 0) or a regular member (member 1): a ShardError, and a bounded bad list."""
    p = tmp_path / "neg.tar"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as t:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, data in _samples(3, jpegs):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(p) as t:
        offset = t.getmembers()[member].offset
    p.write_bytes(_rewrite_size(p.read_bytes(), offset, field))
    with pytest.raises(ShardError, match="byte") as e:
        scan_tar(str(p))
    assert "neg.tar" in str(e.value)
    idx = scan_tar(str(p), skip=True)
    assert len(idx.bad) <= 2
    assert all(b.shard == str(p) for b in idx.bad)


# -- 3. silent loss ---------------------------------------------------------------------------------


def test_tar_cut_inside_padding_or_without_end_blocks_is_reported(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    full = _tar(tmp_path / "full.tar", _samples(4, jpegs))
    raw = full.read_bytes()
    with tarfile.open(full) as t:
        members = t.getmembers()
    second = members[2]  # k001.jpg: cut inside its padding, then at the next header boundary
    cuts = {
        "padding": second.offset_data + second.size + 1,
        "boundary": members[4].offset,
        "no_end_blocks": _end_of_members(full),
    }
    for what, cut in cuts.items():
        p = tmp_path / f"{what}.tar"
        p.write_bytes(raw[:cut])
        with pytest.raises(ShardError, match="truncated tar"):
            scan_tar(str(p))
        idx = scan_tar(str(p), skip=True)
        assert any(b.key is None and "lost" in b.reason for b in idx.bad), (what, idx.bad)
        keys, L = _run(str(p), "skip", tmp_path)
        listed = {b["key"] for b in L.stats()["bad"]}
        assert None in listed, what  # the loss of the rest of the shard is listed
        assert set(keys) <= {f"k{i:03d}" for i in range(4)}


def test_fields_come_from_every_shard_not_sample_0(tmp_path: Path, jpegs: list[bytes]) -> None:
    """Sample 0's jpg is a symlink: jpg must stay a batch field, and sample 0 is listed."""
    p = tmp_path / "link0.tar"
    with tarfile.open(p, "w") as t:
        link = tarfile.TarInfo("k000.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "elsewhere.jpg"
        t.addfile(link)
        c = tarfile.TarInfo("k000.cls")
        c.size = 1
        t.addfile(c, io.BytesIO(b"0"))
        for name, data in _samples(5, jpegs)[2:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="symbolic link") as e:
        _run(str(p), "raise", tmp_path)
    assert e.value.key == "k000"
    L = Loader(
        str(p),
        batch_size=2,
        image=SMALL,
        on_error="skip",
        max_bad_samples=2,
        cache_dir=tmp_path / "c",
        index_cache=False,
    )
    with L:
        batches = list(L)
    assert all(b["jpg"].shape[1:] == (3, 16, 16) for b in batches)
    assert sorted(k for b in batches for k in b["__key__"]) == [f"k{i:03d}" for i in range(1, 5)]
    assert [b["key"] for b in L.stats()["bad"]] == ["k000"]


def test_a_column_missing_from_the_first_parquet_file_is_not_dropped(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"__key__": ["a0", "a1"], "cls": [0, 1]}), a)
    pq.write_table(pa.table({"__key__": ["b0", "b1"], "cls": [2, 3], "score": [0.5, 1.5]}), b)
    with pytest.raises(DecodeError, match="lacks field 'score'") as e:
        _run([str(a), str(b)], "raise", tmp_path)
    assert e.value.shard == str(a)
    keys, L = _run([str(a), str(b)], "skip", tmp_path)
    assert sorted(set(keys)) == ["b0", "b1"]
    assert sorted(x["key"] for x in L.stats()["bad"]) == ["a0", "a1"]


def test_a_sample_made_only_of_a_link_is_listed(tmp_path: Path, jpegs: list[bytes]) -> None:
    p = tmp_path / "only_link.tar"
    with tarfile.open(p, "w") as t:
        for name, data in _samples(3, jpegs):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        hard = tarfile.TarInfo("k009.jpg")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "k000.jpg"
        t.addfile(hard)
    keys, L = _run(str(p), "skip", tmp_path)
    assert sorted(keys) == ["k000", "k001", "k002"]
    bad = L.stats()["bad"]
    assert [x["key"] for x in bad] == ["k009"] and "hard link" in bad[0]["reason"]


def test_a_truncated_wav_is_a_bad_sample_not_silence(tmp_path: Path) -> None:
    wav = make_wav(440.0, seconds=0.25, rate=8000)
    with pytest.raises(ValueError, match="truncated"):
        decode_audio(wav[: len(wav) // 2], max_seconds=10)
    members = []
    for i in range(4):
        members += [(f"a{i}.wav", wav if i != 2 else wav[: len(wav) // 2]), (f"a{i}.cls", b"1")]
    p = _tar(tmp_path / "audio.tar", members)
    cfg = AudioConfig(sample_rate=8000, seconds=0.25)
    with pytest.raises(DecodeError, match="truncated") as e:
        _run(str(p), "raise", tmp_path, audio=cfg)
    assert e.value.key == "a2"
    keys, L = _run(str(p), "skip", tmp_path, audio=cfg)
    assert sorted(set(keys)) == ["a0", "a1", "a3"]
    assert [x["key"] for x in L.stats()["bad"]] == ["a2"]


# -- 4. foreign exceptions become mmload errors naming shard and key ----------------------------


def test_malformed_dali_idx_headers_are_shard_errors(tmp_path: Path, jpegs: list[bytes]) -> None:
    p = _tar(tmp_path / "d.tar", _samples(2, jpegs))
    for header in ["v1.2 abc\n", "v1.2\n", "v1.2 ²\n", "\n", "v1.2 2 extra\n"]:
        idx = tmp_path / "d.idx"
        idx.write_text(header)
        with pytest.raises(ShardError, match="DALI index"):
            read_dali_idx(str(idx), str(p))
        idx.unlink()


@pytest.mark.parametrize(
    ("member", "content", "match"),
    [
        ("cls", str(2**70).encode(), "does not fit in int64"),
        ("cls", b"-" + str(2**70).encode(), "does not fit in int64"),
        ("json", b"[" * 100_000, "nested too deeply"),
        ("json", b"\xff{}", "UnicodeDecodeError"),
        ("cls", b"12abc", "ValueError"),
    ],
)
def test_bad_value_fields_are_attributed(
    tmp_path: Path, jpegs: list[bytes], member: str, content: bytes, match: str
) -> None:
    members = []
    for i in range(5):
        members += [(f"k{i}.jpg", jpegs[i]), (f"k{i}.cls", b"%d" % i), (f"k{i}.json", b"{}")]
    members = [(n, content if n == f"k3.{member}" else d) for n, d in members]
    p = _tar(tmp_path / "v.tar", members)
    with pytest.raises(DecodeError, match=match) as e:
        _run(str(p), "raise", tmp_path)
    assert e.value.key == "k3"
    keys, L = _run(str(p), "skip", tmp_path)
    assert sorted(set(keys)) == ["k0", "k1", "k2", "k4"]
    assert [x["key"] for x in L.stats()["bad"]] == ["k3"]


def test_nulls_in_parquet_are_bad_samples(tmp_path: Path, jpegs: list[bytes]) -> None:
    p = tmp_path / "nulls.parquet"
    pq.write_table(
        pa.table(
            {
                "__key__": [None, "r1", "r2", "r3", "r4"],
                "jpg": [jpegs[0], None, jpegs[2], jpegs[3], jpegs[4]],
                "cls": [0, 1, None, 3, 4],
            }
        ),
        p,
    )
    with pytest.raises(ShardError, match="null key"):
        _run(str(p), "raise", tmp_path)
    keys, L = _run(str(p), "skip", tmp_path)  # a null key in row 0 in skip mode
    assert sorted(set(keys)) == ["r3", "r4"]
    bad = L.stats()["bad"]
    assert sorted(str(x["key"]) for x in bad) == ["None", "r1", "r2"]
    assert any("null 'jpg'" in x["reason"] for x in bad)
    assert any("null is not an integer" in x["reason"] for x in bad)


def test_a_data_set_of_empty_shards_is_a_shard_error(tmp_path: Path) -> None:
    for name in ("e1", "e2"):
        pq.write_table(
            pa.table({"__key__": pa.array([], pa.string())}), tmp_path / f"{name}.parquet"
        )
    for mode in ("raise", "skip"):
        with pytest.raises(ShardError, match="no samples"):
            _run(str(tmp_path / "*.parquet"), mode, tmp_path)


# -- 5. a field's type never changes mid-epoch -------------------------------------------------------


@pytest.mark.parametrize("other", [pa.array(["x", "y"]), pa.array([0.5, 1.5])])
def test_a_column_type_that_changes_between_files_is_bad_data(
    tmp_path: Path, other: pa.Array
) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"__key__": ["a0", "a1", "a2", "a3"], "cls": [0, 1, 2, 3]}), a)
    pq.write_table(pa.table({"__key__": ["b0", "b1"], "cls": other}), b)
    with pytest.raises(DecodeError, match="holds int values") as e:
        _run([str(a), str(b)], "raise", tmp_path)
    assert e.value.shard == str(b)
    L = Loader(
        [str(a), str(b)],
        batch_size=2,
        on_error="skip",
        max_bad_samples=2,
        cache_dir=tmp_path / "c",
        index_cache=False,
    )
    with L:
        batches = list(L)
    assert all(
        isinstance(x["cls"], torch.Tensor) and x["cls"].dtype == torch.int64 for x in batches
    )
    assert sorted(x["key"] for x in L.stats()["bad"]) == ["b0", "b1"]


def test_list_columns_keep_one_batch_type(tmp_path: Path) -> None:
    """Fixed-size lists are a tensor field; variable-length lists a Jagged field in every batch
    (a list field with ragged="list"), even when the first 64 rows happen to have equal lengths
    (nothing valid is refused)."""
    n = 72
    p = tmp_path / "lists.parquet"
    tok = [np.arange(3) if i < 64 else np.arange(5) for i in range(n)]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(3 * n, dtype=np.float32)), 3)
    pq.write_table(pa.table({"__key__": [f"r{i}" for i in range(n)], "emb": emb, "tok": tok}), p)
    with Loader(str(p), batch_size=8, cache_dir=tmp_path / "c", index_cache=False) as L:
        batches = list(L)
        assert L.stats()["bad_samples"] == 0
    assert all(b["emb"].shape == (8, 3) and b["emb"].dtype == torch.float32 for b in batches)
    assert all(isinstance(b["tok"], Jagged) for b in batches)
    assert all(b["tok"].dtype == torch.int64 for b in batches)
    assert batches[-1]["tok"].lengths().tolist() == [5] * 8
    assert batches[0]["tok"].tolist() == [[0, 1, 2]] * 8
    with Loader(str(p), batch_size=8, cache_dir=tmp_path / "c", ragged="list") as L:
        as_lists = list(L)
    assert all(isinstance(b["tok"], list) for b in as_lists)
    assert [len(t) for t in as_lists[-1]["tok"]] == [5] * 8


# -- 8. DALI .idx of keys with spaces ----------------------------------------------------------------


def test_index_command_does_not_write_an_idx_it_cannot_read(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    p = _tar(
        tmp_path / "sp.tar",
        [("a b.jpg", jpegs[0]), ("a b.cls", b"1"), ("c.jpg", jpegs[1]), ("c.cls", b"2")],
    )
    before, _ = _run(str(p), "raise", tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmload.cli",
            "index",
            "--dali-idx",
            str(p),
            "--cache-dir",
            str(tmp_path / "ic"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert r.returncode == 0, r.stderr
    assert "whitespace" in r.stderr
    assert not (tmp_path / "sp.idx").exists()
    after, _ = _run(str(p), "raise", tmp_path)
    assert sorted(before) == sorted(after) == ["a b", "c"]


def test_every_error_above_is_an_mmload_error() -> None:
    assert issubclass(ShardError, MmloadError) and issubclass(DecodeError, MmloadError)


def test_the_spare_of_an_all_bad_batch_is_a_function_of_the_plan(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    """The same spare for any number of DataLoader workers and after a resume."""
    from torch.utils.data import DataLoader

    from mmload import IterableDataset

    members = []
    for i in range(16):
        data = b"NOTAJPEG" * 4 if i in (6, 7) else jpegs[i]
        members += [(f"k{i:02d}.jpg", data), (f"k{i:02d}.cls", b"%d" % i)]
    p = str(_tar(tmp_path / "spare.tar", members))
    kw = {"batch_size": 2, "image": SMALL, "on_error": "skip", "max_bad_samples": 4}
    runs = []
    for workers in (0, 2):
        ds = IterableDataset(p, cache_dir=tmp_path / f"c{workers}", **kw)
        runs.append([b["__key__"] for b in DataLoader(ds, batch_size=None, num_workers=workers)])
        ds.close()
    assert runs[0] == runs[1]
    assert runs[0][3] == ["k00", "k00"]  # the rank's first good sample of the epoch
    with Loader(p, cache_dir=tmp_path / "c", **kw) as L:
        L.load_state_dict({**L.state_dict(), "samples_consumed": 6})
        assert next(iter(L))["__key__"] == ["k00", "k00"]


def test_a_dali_idx_may_skip_non_sample_links(tmp_path: Path, jpegs: list[bytes]) -> None:
    """A symlink that is not named like a sample member is ignored by the scan, so an .idx
    written from that scan is accepted too; an unlisted regular member is not."""
    p = tmp_path / "l.tar"
    with tarfile.open(p, "w") as t:
        link = tarfile.TarInfo("README")
        link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
        t.addfile(link)
        for name, data in _samples(2, jpegs):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    from mmload.sources.tar import write_dali_idx

    idx = scan_tar(str(p))
    assert write_dali_idx(idx, str(tmp_path / "l.idx")) is None
    assert read_dali_idx(str(tmp_path / "l.idx"), str(p)).keys == ["k000", "k001"]
    lines = (tmp_path / "l.idx").read_text().splitlines()
    (tmp_path / "l.idx").write_text("v1.2 1\n" + lines[1] + "\n")  # leaves out k001
    with pytest.raises(ShardError, match=r"leaves out the tar member 'k001\.jpg'"):
        read_dali_idx(str(tmp_path / "l.idx"), str(p))
