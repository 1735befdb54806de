"""What full validation of Arrow/Parquet chunks costs in the read path.

Every decoded chunk (Arrow record batch, Parquet row group) is checked with
``validate(full=True)`` before any row is taken from it (issue 7: a bit flip in a memory-mapped
IPC file otherwise crashes the process in ``pyarrow.compute.take``). This benchmark reads the
same files through ``Dataset.read`` in batches of 256, with the validation on (mmload as
shipped) and off (the baseline: ``_validated`` replaced by the identity), interleaved round by
round in one process, and prints samples/s and the ratio.

    python benchmarks/arrow_validate.py --rows 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report

import mmload.sources.arrow as arrow_mod
from mmload.sources import Dataset


def make_files(root: Path, rows: int, media_bytes: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(int(media_bytes * (0.5 + rng.random()))) for _ in range(64)]
    table = pa.table(
        {
            "__key__": [f"{i:08d}" for i in range(rows)],
            "jpg": [blobs[i % 64] for i in range(rows)],
            "txt": [f"a caption of sample {i} " * (1 + i % 5) for i in range(rows)],
            "cls": np.arange(rows) % 1000,
            "emb": [np.full(8, i, np.float32) for i in range(rows)],
        }
    )
    out = {"arrow": str(root / "data.arrow"), "parquet": str(root / "data.parquet")}
    with ipc.new_file(out["arrow"], table.schema) as w:
        for b in table.to_batches(max_chunksize=1024):
            w.write_batch(b)
    pq.write_table(table, out["parquet"], row_group_size=1024)
    return out


def read_all(path: str, batch: int) -> int:
    ds = Dataset.open(path, index_cache=False, cache_chunks=8)
    n = 0
    for start in range(0, ds.num_samples, batch):
        ids = np.arange(start, min(start + batch, ds.num_samples))
        n += sum(1 for r in ds.read(ids) if isinstance(r, dict))
    ds.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--media-bytes", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    validated = arrow_mod._validated
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.rows, args.media_bytes)
        report = Report("Arrow/Parquet chunk validation cost", vars(args))
        for kind, path in files.items():
            rates: dict[str, list[float]] = {"validated": [], "unvalidated (baseline)": []}
            spent = [0.0]

            def timed_validate(*a, spent=spent, **k):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                out = validated(*a, **k)
                spent[0] += time.perf_counter() - t0
                return out

            read_all(path, args.batch)  # warm the page cache
            total = 0.0
            for r in range(args.rounds):
                modes = list(rates) if r % 2 == 0 else list(rates)[::-1]  # alternate the order
                for mode in modes:
                    arrow_mod._validated = (  # type: ignore[assignment]
                        timed_validate
                        if mode == "validated"
                        else (lambda data, c, shard, decoded=False: data)
                    )
                    t0 = time.perf_counter()
                    n = read_all(path, args.batch)
                    dt = time.perf_counter() - t0
                    rates[mode].append(n / dt)
                    if mode == "validated":
                        total += dt
            arrow_mod._validated = validated  # type: ignore[assignment]
            best = {m: max(r) for m, r in rates.items()}
            for mode, rate in best.items():
                report.add(
                    format=kind,
                    mode=mode,
                    samples_per_s=round(rate),
                    ratio_to_baseline=round(rate / best["unvalidated (baseline)"], 3),
                    validate_share=(f"{spent[0] / total:.2%}" if mode == "validated" else "-"),
                )
        report.notes.append("best of the rounds; rows carry jpg (binary), txt, cls, emb columns")
        report.notes.append("validate_share: time inside validation / read time, validated runs")
        report.print(["format", "mode", "samples_per_s", "ratio_to_baseline", "validate_share"])
        report.save(args.json)


if __name__ == "__main__":
    main()
