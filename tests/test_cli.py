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
    report = tmp_path / "bench.json"
    argv = ["bench", "--batch-size", "2", "--epochs", "2", "--image-size", "32", "--baselines", ""]
    argv += ["--no-progress", "--json", str(report), str(tmp_path / "out-{000..002}.tar")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mmload Loader (workers=0" in out and "samples/s" in out
    rows = json.loads(report.read_text())["rows"]
    assert [r["pipeline"] for r in rows] == ["mmload Loader (workers=0, auto images, cpu)"]
    assert rows[0]["samples_per_s"] > 0 and len(rows[0]["runs"]) == 1


def test_bench_generates_data_and_compares_with_dataloader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No shards: generated demo photos; mmload (2 worker processes) and the DataLoader +
    webdataset + PIL baseline in one run, ratios to the baseline, a JSON report and a PNG."""
    report, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "--samples", "48", "--batch-size", "16", "--epochs", "2"]
    argv += ["--image-size", "32", "--workers", "2", "--baselines", "dataloader"]
    argv += ["--baseline-workers", "0", "--json", str(report), "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "DataLoader(num_workers=0) + webdataset + PIL" in out and "peak RSS MB" in out
    data = json.loads(report.read_text())
    assert data["config"]["generated"] and data["config"]["samples"] == 48
    base, ours = data["rows"][1], data["rows"][0]
    assert base["ratio"] == pytest.approx(1.0)
    assert ours["ratio"] == pytest.approx(ours["samples_per_s"] / base["samples_per_s"])
    assert ours["cpu_cores"] > 0 and ours["peak_rss_mb"] > 50
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--epochs", "1"]) == 2
    assert "--epochs=1: must be >= 2" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_demo_on_cuda_without_a_gpu_says_so_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--device", "cuda", "--samples", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "cudf" not in err.lower()
    assert not out.exists()  # nothing generated first


def test_every_option_of_every_subcommand_has_help_text() -> None:
    import argparse

    from mmload.cli import _parser

    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) >= {"demo", "inspect", "index", "bench", "write"}
    for name, sp in subs.choices.items():
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"mmload {name} {action.dest}: no help text"
        text = sp.format_help()
        if name in ("demo", "bench"):
            assert "(default: " in text  # defaults are shown


def test_demo_without_dali_installed(tmp_path: Path) -> None:
    """A base install has no ``nvidia`` package: the demo runs on PIL (regression: looking for
    ``nvidia.dali`` raised ModuleNotFoundError)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia' or name.startswith('nvidia.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for m in [m for m in sys.modules if m.startswith('nvidia')]:\n"
        "    del sys.modules[m]\n"
        "from mmload.cli import main\n"
        f"sys.exit(main(['demo', '--samples', '32', '--epochs', '1', '--quiet', '--out', {str(tmp_path / 'd')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
