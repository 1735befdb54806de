"""Tar shards written by other tools, read by mmload and by a reference reader (Python's
``tarfile`` and webdataset's own reader; DALI for ``.idx`` files): the same keys in the same
order, the same fields and bytes, the same counts.

Producers: GNU tar in each ``--format`` (gnu, oldgnu, pax, posix, ustar, v7), Python's
``tarfile`` in each format (USTAR, GNU, PAX), webdataset's ``TarWriter``, and DALI's
``wds2idx`` index in both versions (v1.2 as it writes it, v1.1 the same lines without the
member names). Long and non-ASCII member names where the format can hold them."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmload
from mmload.sources.tar import split_name

wds = pytest.importorskip("webdataset", reason="webdataset is a dev dependency")

LONG = "d" * 60 + "/" + "k" * 80  # 141 characters: beyond the 100 of a plain header name
UNICODE = "ключ-ü"


def _samples(long_names: bool, unicode: bool) -> list[tuple[str, dict[str, bytes]]]:
    keys = [f"s{i:03d}" for i in range(6)]
    if long_names:
        keys[2] = LONG
    if unicode:
        keys[4] = UNICODE
    rng = np.random.default_rng(7)
    return [
        (k, {"bin": rng.bytes(100 + 37 * i), "dat": rng.bytes(3 + i), "cls": str(i).encode()})
        for i, k in enumerate(keys)
    ]


def _files(root: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[str]:
    names = []
    for key, fields in samples:
        for ext, data in fields.items():
            p = root / f"{key}.{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            names.append(f"{key}.{ext}")
    return names


def _reference_tarfile(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples as Python's tarfile sees the regular members (grouped by key, in order)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = split_name(m.name)
            assert parts is not None, m.name
            f = tf.extractfile(m)
            assert f is not None
            if not out or out[-1][0] != parts[0]:
                out.append((parts[0], {}))
            out[-1][1][parts[1]] = f.read()
    return out


def _reference_webdataset(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in ds]


def _mmload(path: Path, cache: Path) -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, Any]]:
    out = []
    with mmload.Loader(str(path), batch_size=4, cache_dir=cache) as ld:
        for b in ld:
            for j, key in enumerate(b["__key__"]):
                out.append(
                    (
                        key,
                        {
                            "bin": b["bin"][j],
                            "dat": b["dat"][j],
                            "cls": str(int(b["cls"][j])).encode(),
                        },
                    )
                )
        stats = ld.stats()
    return out, stats


def _check(path: Path, tmp: Path, want: list[tuple[str, dict[str, bytes]]]) -> None:
    got, stats = _mmload(path, tmp / "cache")
    assert got == want
    assert _reference_tarfile(path) == want
    assert _reference_webdataset(path) == want
    assert stats["samples"] == len(want) and stats["bad_samples"] == 0


GNU_FORMATS = {  # format -> (long names, non-ASCII names) it can hold
    "gnu": (True, True),
    "oldgnu": (True, True),
    "pax": (True, True),
    "posix": (True, True),
    "ustar": (True, False),  # a long name fits when split at a '/' into prefix + name
    "v7": (False, False),
}


@pytest.mark.parametrize("fmt", sorted(GNU_FORMATS))
def test_gnu_tar_formats(tmp_path: Path, fmt: str) -> None:
    tar = shutil.which("tar")
    assert tar is not None, "GNU tar is part of every Debian/Ubuntu base system"
    samples = _samples(*GNU_FORMATS[fmt])
    names = _files(tmp_path / "src", samples)
    out = tmp_path / f"gnu-{fmt}.tar"
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run(
        [tar, f"--format={fmt}", "-cf", str(out), "-C", str(tmp_path / "src"), *names],
        check=True,
        env=env,
    )
    _check(out, tmp_path, samples)


@pytest.mark.parametrize(
    ("fmt", "long_names", "unicode"),
    [
        (tarfile.USTAR_FORMAT, True, False),
        (tarfile.GNU_FORMAT, True, True),
        (tarfile.PAX_FORMAT, True, True),
    ],
    ids=["ustar", "gnu", "pax"],
)
def test_python_tarfile_formats(tmp_path: Path, fmt: int, long_names: bool, unicode: bool) -> None:
    samples = _samples(long_names, unicode)
    out = tmp_path / "py.tar"
    with tarfile.open(out, "w", format=fmt) as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    _check(out, tmp_path, samples)


def test_webdataset_tarwriter(tmp_path: Path) -> None:
    samples = _samples(True, True)
    out = tmp_path / "wds.tar"
    with wds.TarWriter(str(out)) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})
    _check(out, tmp_path, samples)


def test_non_sample_members_are_left_out_and_counted(tmp_path: Path) -> None:
    samples = _samples(False, False)
    src = tmp_path / "src"
    names = _files(src, samples)
    extra = ["README", ".DS_Store", "__meta__.json", "__MACOSX/._s000.bin", "LICENSE"]
    for n in extra:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"not a sample")
    out = tmp_path / "meta.tar"
    order = [extra[0], *names[:6], extra[1], extra[2], *names[6:], extra[3], extra[4]]
    subprocess.run(["tar", "-cf", str(out), "-C", str(src), *order], check=True)
    got, stats = _mmload(out, tmp_path / "cache")  # on_error="raise": nothing fails
    assert got == samples
    assert stats["non_sample_members"] == len(extra)
    # webdataset's reader drops README and .DS_Store, but yields "__meta__" and "__MACOSX/"
    # as samples of their own (docs/interop.md); the real samples agree.
    ref = [s for s in _reference_webdataset(out) if not s[0].startswith("__")]
    assert ref == samples
    bad = tmp_path / "bad.tar"
    (src / "s009.").write_bytes(b"x")  # looks like a sample member, but has no field
    subprocess.run(["tar", "-cf", str(bad), "-C", str(src), *names, "s009."], check=True)
    with pytest.raises(mmload.ShardError, match="empty field") as err:
        mmload.Loader(str(bad), batch_size=4, cache_dir=tmp_path / "c2")
    assert err.value.key == "s009"


def _wds2idx() -> list[str]:
    exe = Path(sys.executable).parent / "wds2idx"
    if exe.exists():
        return [str(exe)]
    pytest.importorskip("wds2idx", reason="DALI's wds2idx comes with nvidia-dali (dev extra)")
    return [sys.executable, "-m", "wds2idx"]


@pytest.mark.parametrize("version", ["v1.2", "v1.1"])
def test_dali_index_files_in_both_versions(tmp_path: Path, version: str) -> None:
    dali = pytest.importorskip("nvidia.dali", reason="DALI is a dev dependency")
    samples = _samples(True, False)
    shard = tmp_path / "shard.tar"
    with wds.TarWriter(str(shard)) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})
    idx = tmp_path / "shard.tar.idx"
    subprocess.run([*_wds2idx(), str(shard), str(idx)], check=True, capture_output=True)
    lines = idx.read_text().splitlines()
    assert lines[0].startswith("v1.2 ")  # what DALI's tool writes today
    if version == "v1.1":  # the older format: the same records without the member names
        body = []
        for line in lines[1:]:
            tok = line.split()
            body.append(" ".join(t for j, t in enumerate(tok) if j % 4 != 3))
        idx.write_text("\n".join([lines[0].replace("v1.2", "v1.1"), *body]) + "\n")
    got, stats = _mmload(shard, tmp_path / "cache")
    assert got == samples and stats["samples"] == len(samples)

    # DALI itself reads the same index: the same bytes per sample, in the same order.
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def pipe() -> Any:
        return tuple(
            fn.readers.webdataset(
                paths=[str(shard)], index_paths=[str(idx)], ext=["bin", "dat", "cls"]
            )
        )

    p = pipe()
    p.build()
    outs = p.run()
    dali_samples = [
        {ext: bytes(np.asarray(outs[e].at(i))) for e, ext in enumerate(["bin", "dat", "cls"])}
        for i in range(len(samples))
    ]
    assert dali_samples == [f for _, f in samples]
    del dali
