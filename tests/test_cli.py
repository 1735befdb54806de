"""The mmload command: demo, inspect, index (with DALI .idx), write, bench, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmload.cli import main


def test_demo_runs_and_summarises(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmload.cli",
            "demo",
            "--samples",
            "48",
            "--per-shard",
            "16",
            "--batch-size",
            "8",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "wrote 3 WebDataset shards" in text
    assert "streamed 48 samples" in text
    assert "jpg                  tensor (8, 3, 64, 64) float16 on cpu" in text
    assert "cls                  tensor (8,) int64" in text
    assert "wav                  tensor (8, 64, 51) float32" in text  # log-mel of 0.5 s
    assert "txt                  tensor (8, 32) int64" in text
    assert "embedding            tensor (8, 4) float32" in text
    assert "__features_found__   tensor (8,) bool" in text
    assert "features joined as of each sample's json.ts" in text
    assert len(list((tmp_path / "d").glob("demo-*.tar"))) == 3


def test_inspect_and_index(make_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    paths, _ = make_shards([3, 5])
    assert main(["inspect", "--json", *paths]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["samples"] for s in d["shards"]] == [3, 5]
    assert set(d["shards"][0]["fields"]) == {"cls", "jpg", "txt"}
    assert main(["index", "--dali-idx", "--cache-dir", str(tmp_path / "c"), *paths]) == 0
    idx = Path(paths[0][: -len(".tar")] + ".idx")
    assert idx.read_text().startswith("v1.2 3\n")
    from mmload.sources.tar import read_dali_idx, scan_tar

    assert read_dali_idx(str(idx), paths[0]).keys == scan_tar(paths[0]).keys


def test_inspect_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing.tar")]) == 2
    err = capsys.readouterr().err
    assert "ShardError" in err and "missing.tar" in err


def test_write_then_read(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "files"
    src.mkdir()
    for i in range(5):
        (src / f"img{i}.jpg").write_bytes(jpegs[i])
        (src / f"img{i}.cls").write_text(str(i))
    assert main(["write", str(src), str(tmp_path / "out-%03d.tar"), "--maxcount", "2"]) == 0
    assert "wrote 5 samples into 3 shards" in capsys.readouterr().out
    assert (
        main(
            [
                "bench",
                "--batch-size",
                "2",
                "--epochs",
                "1",
                "--image-size",
                "32",
                str(tmp_path / "out-{000..002}.tar"),
            ]
        )
        == 0
    )
    assert '"best_samples_per_s"' in capsys.readouterr().out
