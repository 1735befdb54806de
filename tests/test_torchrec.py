"""``mmload.to_kjt`` against real TorchRec: ``benchmarks/torchrec_check.py`` reads id lists with a
Loader, builds KeyedJaggedTensors and pools them with TorchRec's EmbeddingBagCollection,
checking every sample against sums over the ids pyarrow wrote.

TorchRec needs the fbgemm build made for its torch and declares the CUDA ``fbgemm-gpu``
package, so it runs from its own venv, ``.venv-torchrec`` at the repository root, created here
when missing: torch 2.13.0 (CPU), ``fbgemm-gpu-cpu==1.8.0``, ``torchrec==1.8.0`` without its
dependencies, then those it needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-torchrec"
PY = VENV / "bin" / "python"
IMPORT = (
    "from torchrec.sparse.jagged_tensor import KeyedJaggedTensor; "
    "from torchrec.modules.embedding_modules import EmbeddingBagCollection"
)
STEPS = [
    ["torch==2.13.0", "fbgemm-gpu-cpu==1.8.0"],
    ["--no-deps", "torchrec==1.8.0"],
    ["-c", "{constraints}", "tensordict", "torchmetrics==1.0.3", "pyre-extensions", "tqdm",
     "numpy", "pyarrow", "numba>=0.60", "fsspec[http]", "pillow"],
]  # fmt: skip


def _ready() -> bool:
    return (
        PY.exists() and subprocess.run([str(PY), "-c", IMPORT], capture_output=True).returncode == 0
    )


@pytest.fixture(scope="module")
def torchrec_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _ready():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        constraints = tmp_path_factory.mktemp("torchrec") / "constraints.txt"
        constraints.write_text("torch==2.13.0\n")
        for step in STEPS:
            args = [a.format(constraints=constraints) for a in step]
            r = subprocess.run(
                [str(PY), "-m", "pip", "install", "-q", *args],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if r.returncode != 0:
                pytest.skip(f"torchrec could not be installed ({args}): {r.stderr[-500:]}")
    assert _ready(), "torchrec installed but does not import"
    return PY


@pytest.mark.slow
def test_to_kjt_feeds_torchrec_embedding_bags(torchrec_python: Path) -> None:
    r = subprocess.run(
        [str(torchrec_python), str(ROOT / "benchmarks" / "torchrec_check.py")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (
        "matched TorchRec's KeyedJaggedTensor and EmbeddingBagCollection on 50 samples" in r.stdout
    )
