#!/usr/bin/env bash
# On a GPU host: run every gpu-marked test (plus the kernel and feature tests, which use the real
# GPU when there is one) and the GPU benchmarks with their baselines, then print one table.
# Develop/dry-run on the CPU: tests skip or use the CUDA simulator, benchmarks say "no GPU".
#   bash benchmarks/gpu_check.sh            (results under $OUT/gpu or bench-out/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}/gpu
mkdir -p "$out"
if [ -d /tmp/ch ] && [ -f .carry/install.sh ] && [ ! -d /tmp/site/nvidia/dali ]; then
  bash .carry/install.sh || echo "carried wheel install failed"
fi
if [ -d /tmp/extra/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/extra/whl/*.whl \
    || echo "extra wheel install failed"
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi
[ -d /tmp/extra/photos ] && export MMLOAD_PHOTOS_DIR=/tmp/extra/photos
# mmload.kernels is kernels/ (a pyproject package-dir mapping); without an install, link it.
python3 -c "import mmload.kernels" 2>/dev/null || ln -sfn ../kernels mmload/kernels
export MMLOAD_CACHE_DIR=${MMLOAD_CACHE_DIR:-/tmp/mmload-cache}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
} | tee "$out/host.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="--strict-markers -ra --import-mode=importlib" \
  tests/gpu tests/kernels tests/features --junitxml="$out/junit.xml" >"$out/tests.txt" 2>&1
echo "tests exit $?" >>"$out/tests.txt"
tail -n 15 "$out/tests.txt"
timeout 120 python3 benchmarks/kernels_bench.py --json "$out/kernels.json" >"$out/kernels.txt" 2>&1
timeout 240 python3 benchmarks/gpu_image.py --images "${GPU_IMAGES:-8192}" --json "$out/gpu_image.json" >"$out/gpu_image.txt" 2>&1
timeout 180 python3 benchmarks/join_bench.py --device cuda --json "$out/join.json" >"$out/join.txt" 2>&1
python3 benchmarks/summarize.py "$out"
