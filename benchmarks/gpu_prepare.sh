#!/usr/bin/env bash
# Here, before a GPU session: the shared DALI/cuDF wheel pieces (.carry/c1..cN, install.sh) plus
# one extra piece (.carry/extra: PyAV, soundfile, pytest and friends for Python 3.12, and a few
# real photos for benchmark data on a host without scikit-image). Then on the device, back to
# back: one call per .carry/cK (cp .carry/cK/* /tmp/ch/), one call for .carry/extra
# (cp -r .carry/extra /tmp/), and the last piece with: bash benchmarks/gpu_check.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
[ $# -gt 0 ] || set -- dali cudf
bash ../shared/gpu/prepare.sh "$@" >/dev/null
mkdir -p .carry/extra/whl .carry/extra/photos
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/extra/whl av soundfile cffi pycparser pytest pluggy iniconfig pytest-timeout tqdm fsspec \
  2>&1 | grep -vi warning || true
python3 - <<'PY'
import os, shutil
try:
    import skimage.data
except ImportError:
    raise SystemExit("scikit-image is needed here to copy its photos (pip install scikit-image)")
src = os.path.dirname(skimage.data.__file__)
for f in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png"):
    shutil.copy(os.path.join(src, f), os.path.join(".carry/extra/photos", f))
PY
ls .carry
du -sh .carry/c* .carry/extra
