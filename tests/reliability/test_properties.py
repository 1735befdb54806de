"""Property tests: mmload's parsers on mutated and arbitrary bytes.

The contract: on any input a parser either succeeds or raises an mmload error (``ShardError``
for tar/idx/Arrow/Parquet indexing and reads, ``DecodeError`` for image headers; ``ValueError``
for ``decode_value``, which the batch decoder converts); anything else (TypeError, IndexError,
OverflowError, RecursionError, pyarrow exceptions, ...) is a bug. What a parser returns must be
consistent: a tar index lists only members inside the file, loses nothing when only member data
changed, and reports a truncation; image sizes are positive and within the caps; an ``int``
field fits the int64 tensor it is collated into.

Arrow/Parquet examples run in forked child processes, a batch per child: pyarrow can crash the
process on corrupt memory-mapped data, and a crash must fail one test, not kill pytest. The input
that crashed is saved to a file named in the failure message.

Deterministic (``derandomize=True``, no example database); about a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing as mp
import os
import tarfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mmload.decode.fields import collate, conform, decode_value, kind_class
from mmload.decode.headers import read_header
from mmload.errors import DecodeError, ShardError
from mmload.sources.dataset import Dataset
from mmload.sources.tar import TarIndex, read_dali_idx, scan_tar
from mmload.sources.write import write_tar_shards

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
# Forked examples report the one failing input themselves: no shrinking (each try is a fork).
FORKED = {**SETTINGS, "phases": [Phase.explicit, Phase.generate]}

# -- byte mutations -----------------------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("ins"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("del"), st.integers(0, 1 << 30), st.integers(1, 600)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 30)),
    st.tuples(
        st.just("dup"), st.integers(0, 1 << 30), st.integers(1, 1024), st.integers(0, 1 << 30)
    ),
    st.tuples(
        st.just("int"),
        st.integers(0, 1 << 30),
        st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]),
        st.sampled_from([1, 2, 4, 8]),
    ),
)
mutations = st.lists(_op, min_size=1, max_size=3)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1] % (len(b) + 1)
        if kind == "flip" and b:
            b[pos % len(b)] ^= 1 << op[2]
        elif kind == "set":
            b[pos : pos + len(op[2])] = op[2]
        elif kind == "ins":
            b[pos:pos] = op[2]
        elif kind == "del":
            del b[pos : pos + op[2]]
        elif kind == "cut":
            del b[pos:]
        elif kind == "dup":
            b[op[3] % (len(b) + 1) : op[3] % (len(b) + 1)] = b[pos : pos + op[2]]
        elif kind == "int":
            b[pos : pos + op[3]] = (op[2] % (1 << (8 * op[3]))).to_bytes(op[3], "little")
    return bytes(b)


# -- tar seeds ----------------------------------------------------------------------------------


class TarSeed:
    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self.data = path.read_bytes()
        self.index = scan_tar(str(path)).to_json()
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        self.headers = sorted({m.offset for m in members} | {m.offset_data - 512 for m in members})
        self.regions = [
            (o, n) for o, n in zip(self.index["offsets"], self.index["sizes"], strict=True) if n
        ]
        # The end of the last member's padded data: a cut before it loses data.
        self.last_end = max(m.offset_data + -(-m.size // 512) * 512 for m in members)
        ix = self.index
        # Per sample, the end of its last member's padded data.
        self.sample_ends = [
            ix["offsets"][b - 1] + -(-ix["sizes"][b - 1] // 512) * 512 for b in ix["starts"][1:]
        ]
        self.samples = {
            k: list(zip(ix["fields"][a:b], ix["offsets"][a:b], ix["sizes"][a:b], strict=True))
            for k, a, b in zip(ix["keys"], ix["starts"], ix["starts"][1:], strict=False)
        }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def tar_seeds(workdir: Path) -> list[TarSeed]:
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    sizes = [0, 1, 511, 512, 513, 1500]
    samples = [
        {"__key__": f"s{i:03d}", "cls": i, "json": {"i": i}, "txt": "t" * i, "bin": blob[:n]}
        for i, n in enumerate(sizes)
    ]
    seeds = [TarSeed("ustar", Path(write_tar_shards(samples, str(workdir / "ustar-%d.tar"))[0]))]
    for fmt, label in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        path = workdir / f"{label}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for i in range(4):
                key = f"dir/{'long' * 30}{i}" if i % 2 else f"dir/k{i}"  # long: PAX / GNU 'L'
                for fld, data in (
                    ("cls", str(i).encode()),
                    ("bin", blob[: 300 * i]),
                    ("txt", b"x"),
                ):
                    info = tarfile.TarInfo(f"{key}.{fld}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        seeds.append(TarSeed(label, path))
    return seeds


def _scan_both(path: str) -> dict[bool, TarIndex | ShardError]:
    """scan_tar in both modes: an index or the ShardError (anything else propagates: a bug)."""
    out: dict[bool, TarIndex | ShardError] = {}
    for skip in (False, True):
        try:
            out[skip] = scan_tar(path, skip=skip)
        except ShardError as e:
            out[skip] = e
    return out


def _check_index(idx: TarIndex, size: int) -> None:
    assert len(idx.starts) == idx.num_samples + 1
    assert int(idx.starts[-1]) == len(idx.fields) == len(idx.offsets) == len(idx.sizes)
    assert len(set(idx.keys)) == len(idx.keys), "duplicate sample key in the index"
    for o, n in zip(idx.offsets.tolist(), idx.sizes.tolist(), strict=True):
        assert o >= 512 and o % 512 == 0 and n >= 0 and o + n <= size, (o, n, size)
    for k in range(idx.num_samples):
        flds = idx.fields[idx.starts[k] : idx.starts[k + 1]]
        assert flds and len(set(flds)) == len(flds), idx.keys[k]


def check_tar(path: str) -> dict[bool, TarIndex | ShardError]:
    """Both scan modes agree with each other and the index is readable through Dataset."""
    size = os.path.getsize(path)
    res = _scan_both(path)
    strict, lenient = res[False], res[True]
    for r in res.values():
        if isinstance(r, TarIndex):
            _check_index(r, size)
    if isinstance(strict, TarIndex):
        assert isinstance(lenient, TarIndex), f"skip=True raised, skip=False did not: {lenient}"
        assert not lenient.bad and lenient.to_json() == strict.to_json()
    elif isinstance(lenient, TarIndex):
        assert lenient.bad, f"skip=False raised ({strict}) but skip=True lists nothing bad"
    try:
        ds = Dataset.open(path, skip_bad=True, index_cache=False)
    except ShardError:
        assert not (isinstance(lenient, TarIndex) and lenient.num_samples)
        return res
    try:
        assert isinstance(lenient, TarIndex)
        assert ds.index(0).to_json() == lenient.to_json()
        for s, k in zip(ds.read(np.arange(ds.num_samples)), lenient.keys, strict=True):
            assert isinstance(s, dict), f"reading a freshly indexed sample failed: {s}"
            assert s["__key__"] == k
            for m in lenient.members(lenient.keys.index(k)):
                assert len(s[lenient.fields[m]]) == int(lenient.sizes[m])
    finally:
        ds.close()
    return res


# -- tar properties -----------------------------------------------------------------------------


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_tar_random_mutations(tar_seeds: list[TarSeed], workdir: Path, data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(tar_seeds))
    path = str(workdir / "mut.tar")
    Path(path).write_bytes(mutate(seed.data, data.draw(mutations)))
    check_tar(path)


_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12)}
_FIELDS |= {"chksum": (148, 8), "typeflag": (156, 1), "magic": (257, 6), "prefix": (345, 155)}
_values = st.one_of(
    st.integers(0, 8**11 - 1).map(lambda v: b"%011o\0" % v),
    st.sampled_from([b"-1", b"+7", b"1_0", b" 12 ", b"0x10", b"8", b"\xef\xbc\x98", b"0" * 12]),
    st.integers(0, 2**60).map(lambda v: b"\x80" + v.to_bytes(11, "big")),
    st.just(b"\xff" * 12),
    st.sampled_from([b"0", b"\0", b"1", b"2", b"5", b"7", b"g", b"x", b"L", b"K", b"S", b"\xff"]),
    st.sampled_from([b"noext", b".hidden.jpg", b"a/.b", b"dir/", b"s000.cls", b"x" * 100]),
    st.binary(min_size=1, max_size=12),
)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_tar_header_field_rewrites(
    tar_seeds: list[TarSeed], workdir: Path, data: st.DataObject
) -> None:
    """Rewrite header fields (checksum fixed up, so the rewrite gets past the checksum)."""
    seed = data.draw(st.sampled_from(tar_seeds))
    b = bytearray(seed.data)
    for _ in range(data.draw(st.integers(1, 2))):
        pos = data.draw(st.sampled_from(seed.headers))
        off, length = _FIELDS[data.draw(st.sampled_from(sorted(_FIELDS)))]
        val = data.draw(_values)[:length].ljust(length, b"\0")
        b[pos + off : pos + off + length] = val
        if data.draw(st.booleans()) or off != 148:
            h = b[pos : pos + 512]
            b[pos + 148 : pos + 156] = b"%06o\0 " % (sum(h[:148]) + 256 + sum(h[156:]))
    path = str(workdir / "hdr.tar")
    Path(path).write_bytes(bytes(b))
    check_tar(path)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_tar_data_only_changes_keep_the_index(
    tar_seeds: list[TarSeed], workdir: Path, data: st.DataObject
) -> None:
    """The scan reads headers only: bytes changed inside member data change nothing."""
    seed = data.draw(st.sampled_from(tar_seeds))
    o, n = data.draw(st.sampled_from(seed.regions))
    p = data.draw(st.integers(o, o + n - 1))
    new = data.draw(st.binary(min_size=1, max_size=o + n - p))
    b = bytearray(seed.data)
    b[p : p + len(new)] = new
    path = str(workdir / "data.tar")
    Path(path).write_bytes(bytes(b))
    res = check_tar(path)
    assert isinstance(res[False], TarIndex), res[False]
    assert res[False].to_json() == seed.index


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_tar_truncation_is_never_silent(
    tar_seeds: list[TarSeed], workdir: Path, data: st.DataObject
) -> None:
    """A valid tar cut at byte n: before the end of the last member's padded data the strict
    scan must fail and the lenient one list the loss; a kept sample has only members of the
    original (only the sample at the cut may lack some); from there on, nothing is lost."""
    seed = data.draw(st.sampled_from(tar_seeds))
    n = data.draw(
        st.one_of(
            st.integers(0, len(seed.data)),
            st.sampled_from(seed.headers).flatmap(lambda h: st.integers(h - 1, h + 513)),
            st.integers(seed.last_end - 2, seed.last_end + 1025),
        ).filter(lambda v: 0 <= v <= len(seed.data))
    )
    path = str(workdir / "cut.tar")
    Path(path).write_bytes(seed.data[:n])
    res = check_tar(path)
    strict, lenient = res[False], res[True]
    if n < seed.last_end:
        assert isinstance(strict, ShardError), f"cut at {n} < {seed.last_end} scanned as complete"
        if isinstance(lenient, TarIndex):
            assert lenient.bad, f"cut at {n}: skip=True lists nothing bad"
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
                whole = seed.samples.get(lenient.keys[k], [])
                assert set(got) <= set(whole), f"cut at {n}: wrong members for {lenient.keys[k]}"
                if k < lenient.num_samples - 1:
                    assert got == whole, f"cut at {n}: partial sample {lenient.keys[k]} kept"
            complete = sum(1 for end in seed.sample_ends if end <= n)
            assert lenient.num_samples >= complete - 1, f"cut at {n}: complete samples dropped"
    else:
        for r in res.values():
            if isinstance(r, TarIndex) and not r.bad:
                assert r.to_json() == seed.index, f"cut at {n} >= {seed.last_end} lost members"


_tokens = st.sampled_from(
    ["-1", "1e3", "²", "٣", "0x10", "9" * 30, "v1.3", "+5", "1_0", "\x00", "", "jpg", "s000.jpg"]
)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_dali_idx(tar_seeds: list[TarSeed], workdir: Path, data: st.DataObject) -> None:
    seed = tar_seeds[0]
    tar = workdir / "dali.tar"
    if not tar.exists():
        tar.write_bytes(seed.data)
    ix = seed.index
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
    text = "\n".join(lines).encode()
    if data.draw(st.booleans()):
        toks = text.split(b" ")
        i = data.draw(st.integers(0, len(toks) - 1))
        toks[i] = data.draw(_tokens).encode()
        text = b" ".join(toks)
    else:
        text = mutate(text, data.draw(mutations))
    idx_path = workdir / "dali.idx"
    idx_path.write_bytes(text)
    try:
        idx = read_dali_idx(str(idx_path), str(tar))
    except ShardError:
        return
    size = tar.stat().st_size
    for o, n in zip(idx.offsets.tolist(), idx.sizes.tolist(), strict=True):
        assert o >= 0 and n >= 0 and o + n <= size


# -- Arrow / Parquet, in forked children --------------------------------------------------------


def _table_bytes(kind: str, variant: int) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    n = 10
    cols: dict[str, Any] = {
        "__key__": pa.array([f"k{i:03d}" for i in range(n)]),
        "jpg": pa.array([bytes(range(i * 3)) for i in range(n)], pa.binary()),
        "cls": pa.array(list(range(n)), pa.int64()),
    }
    if variant:
        cols["emb"] = pa.array([[float(i), 1.0] for i in range(n)], pa.list_(pa.float32()))
        cols["ts"] = pa.array(list(range(n)), pa.timestamp("ms"))
        cols["txt"] = pa.array([None if i % 3 else f"t{i}" for i in range(n)])
    t = pa.table(cols)
    sink = io.BytesIO()
    if kind == "parquet":
        pq.write_table(t, sink, row_group_size=4, compression=["none", "snappy"][variant])
    else:
        new = ipc.new_stream if kind == "stream" else ipc.new_file
        with new(sink, t.schema) as w:
            for b in t.to_batches(max_chunksize=4):
                w.write_batch(b)
    return sink.getvalue()


def _open_and_read(path: str, key_column: str | None) -> None:
    """Index and read every row; only ShardError may come out (raised or per sample)."""
    try:
        ds = Dataset.open(path, key_column=key_column, index_cache=False)
    except ShardError:
        return
    try:
        n = ds.num_samples
        assert n >= 0 and (ds.chunk_counts >= 0).all()
        for s in ds.read(np.arange(min(n, 200))):
            assert isinstance(s, (dict, ShardError)), type(s)
            if isinstance(s, dict):
                assert isinstance(s["__key__"], str)
    finally:
        ds.close()


def _child(inputs: list[tuple[str, bytes, str | None]], workdir: str, conn: Any) -> None:
    for i, (suffix, data, key_column) in enumerate(inputs):
        path = os.path.join(workdir, f"child-{os.getpid()}.{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        conn.send(("start", i))
        try:
            _open_and_read(path, key_column)
        except Exception as e:  # noqa: BLE001  (reported to the parent as the failure)
            conn.send(("fail", i, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
        else:
            conn.send(("ok", i))
    conn.send(("done", -1))


def run_forked(inputs: list[tuple[str, bytes, str | None]], workdir: Path, timeout: float) -> None:
    """Run inputs in one forked child; a crash, hang or exception fails with the input saved."""
    ctx = mp.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(inputs, str(workdir), w), daemon=True)
    p.start()
    w.close()
    current, failure = -1, None
    try:
        while True:
            if not r.poll(timeout):
                p.kill()
                failure = f"hang (> {timeout}s)"
                break
            try:
                msg = r.recv()
            except EOFError:
                p.join()
                failure = f"crash (exit code {p.exitcode})"
                break
            if msg[0] == "start":
                current = msg[1]
            elif msg[0] == "fail":
                failure = msg[2]
                break
            elif msg[0] == "done":
                break
    finally:
        p.kill()
        p.join()
        r.close()
    if failure is not None:
        suffix, data, key_column = inputs[current]
        saved = workdir / f"failing-{hashlib.sha1(data).hexdigest()[:12]}.{suffix}"
        saved.write_bytes(data)
        pytest.fail(
            f"{suffix} input (key_column={key_column!r}, {len(data)} bytes, saved to {saved}): "
            f"{failure}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def table_seeds() -> dict[str, list[bytes]]:
    return {
        "arrow": [_table_bytes("file", 0), _table_bytes("file", 1), _table_bytes("stream", 1)],
        "parquet": [_table_bytes("parquet", 0), _table_bytes("parquet", 1)],
    }


_BATCH = 25


@pytest.mark.parametrize("kind", ["arrow", "parquet"])
@settings(max_examples=20, **FORKED)
@given(data=st.data())
def test_table_mutations(
    kind: str, table_seeds: dict[str, list[bytes]], workdir: Path, data: st.DataObject
) -> None:
    """Mutated Arrow IPC file/stream and Parquet shards: Dataset.open + read of every row."""
    seeds = table_seeds[kind]
    inputs = []
    for _ in range(_BATCH):
        seed = data.draw(st.sampled_from(seeds))
        key_column = data.draw(st.sampled_from(["__key__", "__key__", None]))
        inputs.append((kind, mutate(seed, data.draw(mutations)), key_column))
    run_forked(inputs, workdir, timeout=30)


def test_table_seeds_read(table_seeds: dict[str, list[bytes]], workdir: Path) -> None:
    """The unmutated seeds read cleanly (else the mutation tests prove nothing)."""
    for kind, seeds in table_seeds.items():
        for j, data in enumerate(seeds):
            path = workdir / f"seed-{j}.{kind}"
            path.write_bytes(data)
            ds = Dataset.open(str(path), index_cache=False)
            out = ds.read(np.arange(ds.num_samples))
            assert ds.num_samples == 10 and all(isinstance(s, dict) for s in out)
            ds.close()


# -- image headers ------------------------------------------------------------------------------

MAX_SIDE, MAX_PIXELS = 16384, 1 << 26


def _check_header(data: bytes) -> None:
    try:
        h = read_header(data, shard="s", key="k", max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    except DecodeError:
        return
    assert 0 < h.height <= MAX_SIDE and 0 < h.width <= MAX_SIDE, h
    assert h.height * h.width <= MAX_PIXELS, h


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (17, 33, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (17, 33, 4), dtype=np.uint8))
    out = []
    for im, fmt, kw in (
        (rgb, "JPEG", {}),
        (rgb, "JPEG", {"progressive": True}),
        (rgb, "PNG", {}),
        (rgb, "WEBP", {}),
        (rgb, "WEBP", {"lossless": True}),
        (rgba, "WEBP", {}),
        (rgb.convert("P"), "GIF", {}),
        (rgb, "BMP", {}),
    ):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


_MAGIC = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "]
_MAGIC += [b"RIFF\0\0\0\0WEBPVP8L", b"RIFF\0\0\0\0WEBPVP8X"]


@settings(max_examples=1500, **SETTINGS)
@given(magic=st.sampled_from(_MAGIC), tail=st.binary(max_size=64))
def test_read_header_arbitrary_bytes(magic: bytes, tail: bytes) -> None:
    _check_header(magic + tail)


@settings(max_examples=1000, **SETTINGS)
@given(data=st.data())
def test_read_header_mutated_images(images: list[bytes], data: st.DataObject) -> None:
    img = data.draw(st.sampled_from(images))
    _check_header(mutate(img, data.draw(mutations)))


def test_read_header_real_images(images: list[bytes]) -> None:
    for img in images:
        h = read_header(img, shard="s", key="k", max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
        assert (h.height, h.width) == (17, 33)


# -- value fields -------------------------------------------------------------------------------

_field_bytes = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda s: s.encode("utf-8")),
    st.integers().map(lambda v: str(v).encode()),
    st.integers(-(2**80), 2**80).map(lambda v: f" {v}\n".encode()),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=10,
    ).map(lambda v: __import__("json").dumps(v).encode()),
)


@settings(max_examples=1500, **SETTINGS)
@given(kind=st.sampled_from(["int", "json", "text"]), raw=_field_bytes)
def test_decode_value_raises_only_value_error(kind: str, raw: bytes) -> None:
    """Only ValueError on bad bytes; a value that decodes and conforms to the field's class
    collates into that class's batch type (an int64 tensor for ints) without raising."""
    try:
        v = decode_value(kind, raw)  # type: ignore[arg-type]
    except ValueError:  # UnicodeDecodeError and json.JSONDecodeError included
        return
    cls = kind_class(kind, None)  # type: ignore[arg-type]
    why = conform(cls, v)
    if kind == "int":
        assert isinstance(v, int) and not isinstance(v, bool), type(v)
        if not -(2**63) <= v < 2**63:
            assert why is not None, f"int field {raw!r} outside int64 conforms to class int"
    if why is None:
        collate([v, v], cls)  # must not raise


@settings(max_examples=30, **SETTINGS)
@given(depth=st.integers(1, 100_000), open_=st.sampled_from(["[", '{"a":']))
def test_decode_json_deep_nesting(depth: int, open_: str) -> None:
    """Deeply nested JSON (a few bytes per level) is a ValueError or a value, never a
    RecursionError."""
    close = "]" if open_ == "[" else "}"
    raw = (open_ * depth + "1" + close * depth).encode()
    with contextlib.suppress(ValueError):
        decode_value("json", raw)


@pytest.mark.parametrize(
    "raw", [b"9223372036854775807", b"9223372036854775808", b"-9223372036854775809", b"1" * 30]
)
def test_int_field_outside_int64(raw: bytes) -> None:
    """An int field the int64 batch tensor cannot hold is rejected before collation: by
    decode_value (ValueError) or by conform (a reason, which makes the sample bad)."""
    try:
        v = decode_value("int", raw)
    except ValueError:
        return
    why = conform("int", v)
    if -(2**63) <= v < 2**63:
        assert why is None
        assert collate([v], "int").dtype == torch.int64
    else:
        assert why is not None, f"decode_value('int', {raw!r}) = {v} conforms to int"
