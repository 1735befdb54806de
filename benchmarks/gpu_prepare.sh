#!/usr/bin/env bash
# Here, before a GPU session: build the wheel pieces that benchmarks/gpu_check.sh installs on the
# GPU host, one piece per device call.
#
#   bash benchmarks/gpu_prepare.sh [core] [dali] [cudf]     (no argument = dali cudf)
#   bash benchmarks/gpu_prepare.sh dry-host                 (the CPU stand-in for the host, below)
#
# Sets: core (always) = numpy 2.4 (the host's numpy 2.5 breaks numba-cuda's kernel compiler),
# nvtx, webdataset, braceexpand, PyAV, soundfile (+ cffi, pycparser) and a few real photos; dali
# and cudf = the wheel lists of ../shared/gpu/prepare.sh (run for them, its pieces re-cut here).
# Everything goes into one tar, split into .carry/c1 .. .carry/cN of at most MMLOAD_PIECE_MIB
# (default 56) MiB. Each piece folder also holds MANIFEST (every piece's size and sha256, the
# numpy version, the sets), so whichever piece arrives last, the check knows what must be there.
# The device tool carries at most 64 MiB per call, the working tree included: the size of every
# piece plus the working tree is checked here against MMLOAD_PIECE_LIMIT_MIB (default 60) and the
# script fails loudly if one is over.
#
# Then, with the device tool, back to back (the host forgets /tmp after ~30 s idle):
#   calls 1 .. N-1: carry [".carry/cK"]  command: bash benchmarks/gpu_check.sh --stage
#   call N:         carry [".carry/cN"]  command: bash benchmarks/gpu_check.sh
# The plan is printed at the end. Dry run here, on the CPU (after `dry-host` once):
#   PYTHON=/tmp/mmload-dryhost/bin/python bash benchmarks/gpu_check.sh --dry-run
#
# `dry-host` makes /tmp/mmload-dryhost (MMLOAD_DRY_HOST), a Python 3.12 venv with what the GPU
# host has preinstalled (torch, numba, numba-cuda, pyarrow, pandas, pytest, numpy 2.5 ...), so
# the cp312 pieces install and run over it as they will there.
#
# Environment (mainly for tests): MMLOAD_CARRY (default .carry), MMLOAD_WHEELS_FROM=DIR (take the
# wheels from DIR instead of downloading; no numpy required), MMLOAD_NO_PHOTOS=1.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
die() { echo "gpu_prepare: ERROR: $*" >&2; exit 1; }

if [ "${1:-}" = dry-host ]; then
  venv=${MMLOAD_DRY_HOST:-/tmp/mmload-dryhost}
  py=$(command -v python3.12 || true); [ -n "$py" ] || die "python3.12 is needed for the dry host"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "torch==2.13.*" numba numba-cuda pyarrow pandas pillow \
    pytest pytest-timeout hypothesis "fsspec[http]" psutil tqdm scikit-image six pyyaml cupy-cuda13x
  "$venv/bin/python" -m pip install -q "numpy>=2.5"   # the host's numpy, that the pieces replace
  "$venv/bin/python" -c "import sys, numpy, torch; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__)"
  exit 0
fi

piece_mib=${MMLOAD_PIECE_MIB:-56}
limit_mib=${MMLOAD_PIECE_LIMIT_MIB:-60}
carry=${MMLOAD_CARRY:-.carry}
[ "$piece_mib" -lt "$limit_mib" ] || die "MMLOAD_PIECE_MIB=$piece_mib must be under the limit $limit_mib"
[ $# -gt 0 ] || set -- dali cudf
sets=(); for s in "$@"; do case "$s" in
  core) ;; dali|cudf) sets+=("$s") ;;
  *) die "unknown set: $s (use core, dali, cudf)" ;;
esac; done

# .carry must never be committed or travel uncarried: ignore it (the shared script wants this file).
mkdir -p "$(git rev-parse --git-path info)"
ex=$(git rev-parse --git-path info/exclude)
grep -qx '/.carry/' "$ex" 2>/dev/null || echo '/.carry/' >> "$ex"
case "$(realpath -m "$carry")" in "$root"/*)
  git check-ignore -q "$carry/x" || die "$carry is not ignored by git: it would travel with every call" ;;
esac

build=$(mktemp -d "${TMPDIR:-/tmp}/mmload-prepare.XXXXXX")
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/whl" "$build/photos"
dl() {  # Python 3.12 manylinux x86-64 wheels, no dependencies (each named)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$build/whl" "$@" 2>&1 | grep -vi warning || true
}

if [ -n "${MMLOAD_WHEELS_FROM:-}" ]; then
  cp "$MMLOAD_WHEELS_FROM"/*.whl "$build/whl/" || die "no wheels in $MMLOAD_WHEELS_FROM"
else
  if [ ${#sets[@]} -gt 0 ]; then
    # The shared script owns the DALI/cuDF wheel lists; it writes $root/.carry/cK/partNN (63 MiB
    # pieces, too large to carry beside the tree): take its wheels out and cut them again below.
    [ -f ../shared/gpu/prepare.sh ] || die "../shared/gpu/prepare.sh is missing"
    bash ../shared/gpu/prepare.sh "${sets[@]}" >"$build/shared.log" 2>&1 \
      || { cat "$build/shared.log" >&2; die "../shared/gpu/prepare.sh ${sets[*]} failed"; }
    # in the order of the part names (part00, part01 ...), not of the folders (c1, c10, c2 ...)
    parts=$(ls .carry/c*/part* 2>/dev/null | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2)
    [ -n "$parts" ] || die "../shared/gpu/prepare.sh made no pieces"
    # shellcheck disable=SC2086
    cat $parts | tar xf - -C "$build/whl" || die "the shared pieces do not make a tar"
    rm -rf .carry/c* .carry/install.sh
  else
    dl "numpy==2.4.*" "nvtx==0.2.*" "webdataset==1.0.2" braceexpand
  fi
  # core extras the host lacks (it has pytest, pytest-timeout, hypothesis, tqdm, fsspec, psutil)
  dl av soundfile cffi pycparser
  if [ "${MMLOAD_NO_PHOTOS:-0}" != 1 ]; then
    python3 - "$build/photos" <<'PY' || die "could not copy scikit-image's photos (pip install scikit-image)"
import os, shutil, sys
import skimage.data
src = os.path.dirname(skimage.data.__file__)
for f in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg", "motorcycle_left.png"):
    shutil.copy(os.path.join(src, f), os.path.join(sys.argv[1], f))
PY
  fi
fi

# One version of each distribution: two stop the whole install on the host.
dups=$(cd "$build/whl" && ls *.whl | sed -E 's/-[0-9][^-]*-.*$//; s/[-_.]+/_/g' | tr A-Z a-z | sort | uniq -d)
[ -z "$dups" ] || die "two wheels of: $dups"
numpy=$(cd "$build/whl" && ls numpy-*.whl 2>/dev/null | sed -E 's/^numpy-([^-]+)-.*/\1/' | head -n1 || true)
if [ -z "${MMLOAD_WHEELS_FROM:-}" ]; then
  case "$numpy" in 2.4.*) ;; *) die "numpy 2.4 wheel missing (got '${numpy:-none}')" ;; esac
fi

tar cf "$build/all.tar" -C "$build" whl photos
rm -rf "$carry" && mkdir -p "$carry"
split -b "${piece_mib}M" -d -a 2 "$build/all.tar" "$build/part"
n=0; for p in "$build"/part*; do n=$((n+1)); mkdir -p "$carry/c$n"; mv "$p" "$carry/c$n/"; done

tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
{
  echo "pieces $n"
  echo "numpy ${numpy:-}"
  echo "sets core ${sets[*]:-}"
  echo "tar_sha256 $(sha256sum "$build/all.tar" | cut -d' ' -f1)"
  for i in $(seq 1 "$n"); do
    f=$(ls "$carry/c$i"); echo "piece $i $f $(stat -c %s "$carry/c$i/$f") $(sha256sum "$carry/c$i/$f" | cut -d' ' -f1)"
  done
} > "$carry/MANIFEST"
limit=$((limit_mib * 1048576)); bad=0
for i in $(seq 1 "$n"); do
  cp "$carry/MANIFEST" "$carry/c$i/MANIFEST"
  b=$(du -sb "$carry/c$i" | cut -f1)
  if [ $((b + tree_bytes)) -gt "$limit" ]; then
    echo "gpu_prepare: ERROR: piece c$i ($b bytes) + working tree ($tree_bytes bytes) is over $limit_mib MiB" >&2; bad=1
  fi
done
[ $bad = 0 ] || die "pieces too large for one carry: lower MMLOAD_PIECE_MIB or shrink the working tree"

echo "wheels: $(ls "$build/whl" | wc -l) ($(du -sh "$build/whl" | cut -f1)), photos: $(ls "$build/photos" | wc -l), numpy ${numpy:-none}"
echo "working tree: $((tree_bytes / 1024)) KiB; largest piece + tree: $(( ($(du -sb "$carry"/c* | cut -f1 | sort -n | tail -n1) + tree_bytes) / 1048576 )) MiB of $limit_mib MiB allowed (64 carried)"
echo "Made $n pieces in $carry. With the device tool, back to back (a pause of ~30 s loses the host's /tmp):"
for i in $(seq 1 $((n - 1))); do
  echo "  run carry=[\"$carry/c$i\"] command: bash benchmarks/gpu_check.sh --stage"
done
echo "  run carry=[\"$carry/c$n\"] command: bash benchmarks/gpu_check.sh        (timeout_s 450)"
echo "Dry run here: PYTHON=${MMLOAD_DRY_HOST:-/tmp/mmload-dryhost}/bin/python bash benchmarks/gpu_check.sh --dry-run"
