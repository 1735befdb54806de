"""benchmarks/gpu_check.sh and gpu_prepare.sh: syntax, the 420 s budget of step timeouts, and a
dry run end to end on tiny pieces (a fake wheel split into 1 MiB pieces, staged one per call)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
PREPARE = ROOT / "benchmarks" / "gpu_prepare.sh"
HOST_LIMIT_S = 420

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", [CHECK, PREPARE], ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_step_timeouts_fit_the_host_budget() -> None:
    text = CHECK.read_text()
    grace = int(re.search(r"^GRACE=(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    limits = {k: int(v) for k, v in re.findall(r"\bT_([A-Z]+)=(\d+)", text)}
    steps = re.search(r'^STEPS="([A-Z ]+)"', text, re.M).group(1).split()  # type: ignore[union-attr]
    assert set(steps) == set(limits), "every T_X is a step and every step has a T_X"
    total = sum(limits[s] + grace for s in steps)
    assert total <= HOST_LIMIT_S, f"step timeouts add up to {total} s"
    # every step call uses one of the budgeted timeouts, and nothing runs under another timeout
    calls = re.findall(r'^\s*step (\w+) "\$T_([A-Z]+)"', text, re.M)
    assert calls and all(t in limits for _, t in calls)
    assert len(re.findall(r"\btimeout -k", text)) == 2, "timeouts only in step() and --stage"
    out = subprocess.run(
        ["bash", str(CHECK), "--budget"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert f"total {total}" in out


def _fake_wheel(where: Path, mib: float) -> Path:
    """A pure-Python wheel with ``mib`` MiB of incompressible data, so it spans several pieces."""
    path = where / "mmload_probe-0.1-py3-none-any.whl"
    files = {
        "mmload_probe/__init__.py": b"VALUE = 42\n",
        "mmload_probe/blob.bin": random.Random(0).randbytes(int(mib * 1048576)),
        "mmload_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: mmload-probe\nVersion: 0.1\n",
        "mmload_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + "mmload_probe-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in files.items():
            z.writestr(n, b)
        z.writestr("mmload_probe-0.1.dist-info/RECORD", record)
    return path


def _env(tmp: Path, **kw: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MMLOAD_GPU_DRY_RUN", None)
    env.update(
        MMLOAD_GPU_TMP=str(tmp / "host"),
        OUT=str(tmp / "out"),
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    env.update(kw)
    return env


def _prepare(tmp: Path, carry: Path, **kw: str) -> subprocess.CompletedProcess[str]:
    wheels = tmp / "wheels"
    wheels.mkdir(exist_ok=True)
    _fake_wheel(wheels, 2.5)
    env = _env(tmp, MMLOAD_WHEELS_FROM=str(wheels), MMLOAD_CARRY=str(carry), MMLOAD_PIECE_MIB="1")
    env.update(kw)
    return subprocess.run(
        ["bash", str(PREPARE), "core"], env=env, capture_output=True, text=True, timeout=60
    )


def test_prepare_fails_loudly_on_a_piece_too_large(tmp_path: Path) -> None:
    # 1 MiB pieces + the working tree (> 0) do not fit a 1 MiB limit... which must be above the piece
    r = _prepare(tmp_path, tmp_path / "carry", MMLOAD_PIECE_LIMIT_MIB="2")
    tree = sum(
        (ROOT / f).stat().st_size
        for f in subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        if (ROOT / f).is_file()
    )
    if 1048576 + 4096 + tree <= 2 * 1048576:
        pytest.skip("working tree too small to push a 1 MiB piece over 2 MiB")
    assert r.returncode != 0 and "over 2 MiB" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dry_run_end_to_end_on_tiny_pieces(tmp_path: Path) -> None:
    carry = tmp_path / "carry"
    r = _prepare(tmp_path, carry, MMLOAD_PIECE_LIMIT_MIB="60")
    assert r.returncode == 0, r.stdout + r.stderr
    pieces = sorted(
        (p for p in carry.iterdir() if p.name.startswith("c")), key=lambda p: int(p.name[1:])
    )
    assert len(pieces) == 3, r.stdout
    # the last piece alone is not enough: the check stops before installing anything
    env = _env(
        tmp_path,
        JOIN_ROWS="2000",
        MMLOAD_GPU_TESTS="tests/test_gpu_check_script.py::test_bash_syntax",
    )
    one = tmp_path / "one"

    def carry_only(piece: Path) -> None:
        shutil.rmtree(one, ignore_errors=True)
        one.mkdir()
        shutil.copytree(piece, one / piece.name)

    carry_only(pieces[-1])
    env["MMLOAD_CARRY"] = str(one)
    r = subprocess.run(
        ["bash", str(CHECK), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "pieces missing" in r.stderr, r.stdout + r.stderr
    assert "missing or damaged: piece c1" in r.stderr
    # one call per earlier piece, then the last call runs everything
    for p in pieces[:-1]:
        carry_only(p)
        r = subprocess.run(
            ["bash", str(CHECK), "--stage"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    carry_only(pieces[-1])
    r = subprocess.run(
        ["bash", str(CHECK), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pieces: 3 of 3" in (tmp_path / "out" / "gpu" / "stage.log").read_text()
    site = tmp_path / "host" / "site" / "mmload_probe"
    assert (site / "__init__.py").exists(), "installed from the pieces"
    assert "== mmload GPU check ==" in r.stdout
    for row in ("step install", "step verify", "step tests", "tests ", "join "):
        assert row in r.stdout, r.stdout
    assert "FAILED" not in r.stdout and "TIMEOUT" not in r.stdout, r.stdout
