#!/usr/bin/env bash
# On a GPU host: assemble and install the wheel pieces of benchmarks/gpu_prepare.sh, verify the
# install, run every gpu-marked test (plus the kernel and feature tests, which use the real GPU
# when there is one) and the GPU benchmarks, then print one table. Every step has a timeout; they
# add up (kill grace included) to at most 420 s of host time, setup included (`--budget`).
#
#   bash benchmarks/gpu_check.sh --stage     one call per piece .carry/cK but the last: copy it
#                                            to $MMLOAD_GPU_TMP/ch (default /tmp/ch), check it
#   bash benchmarks/gpu_check.sh             the last call: stage its piece, then everything
#   bash benchmarks/gpu_check.sh --dry-run   (or MMLOAD_GPU_DRY_RUN=1) the same on a CPU machine:
#        skips what needs a GPU (gpu tests skip, benchmarks run their CPU/dry modes), e.g. here
#        PYTHON=/tmp/mmload-dryhost/bin/python bash benchmarks/gpu_check.sh --dry-run
#   bash benchmarks/gpu_check.sh --budget    print the steps' timeouts and their sum
#
# It stops at the first failed setup step (stage, assemble, install, verify); failed tests or
# benchmarks are shown in the table and make the exit status 1. Results: $OUT/gpu (or
# bench-out/gpu): steps.tsv, one log per step, junit.xml, the benchmarks' JSON.
# Environment: PYTHON (default python3), MMLOAD_GPU_TMP (default /tmp), MMLOAD_CARRY (default
# .carry), GPU_IMAGES (default 4096), JOIN_ROWS (default 2000000), MMLOAD_GPU_TESTS (the test
# paths, default "tests/gpu tests/kernels tests/features").
set -euo pipefail
cd "$(dirname "$0")/.."
mode=full; dry=${MMLOAD_GPU_DRY_RUN:-0}
for a in "$@"; do case "$a" in
  --stage) mode=stage ;; --budget) mode=budget ;; --dry-run) dry=1 ;;
  *) echo "usage: $0 [--stage|--budget] [--dry-run]" >&2; exit 2 ;;
esac; done

# The steps and their timeouts (seconds). Keep GRACE * (number of steps) + the sum <= 420.
GRACE=3
T_STAGE=15 T_ASSEMBLE=20 T_INSTALL=45 T_VERIFY=25 T_HOST=10
T_TESTS=125 T_KERNELS=50 T_IMAGE=55 T_JOIN=30 T_TABLE=10
STEPS="STAGE ASSEMBLE INSTALL VERIFY HOST TESTS KERNELS IMAGE JOIN TABLE"
budget=0; for s in $STEPS; do v=T_$s; budget=$((budget + ${!v} + GRACE)); done
if [ "$mode" = budget ]; then
  for s in $STEPS; do v=T_$s; echo "$s ${!v}"; done; echo "grace $GRACE per step"; echo "total $budget"; exit 0
fi
[ "$budget" -le 420 ] || { echo "gpu_check: step timeouts add up to $budget s > 420" >&2; exit 2; }

PY=${PYTHON:-python3}
T=${MMLOAD_GPU_TMP:-/tmp}
carry=${MMLOAD_CARRY:-.carry}
ch=$T/ch site=$T/site whl=$T/whl
out=${OUT:-bench-out}/gpu
mkdir -p "$out" "$ch"
[ "$mode" = stage ] || : >"$out/steps.tsv"
die() { echo "gpu_check: STOP: $*" >&2; [ "$mode" = stage ] || "$PY" - "$out" "$dry" <<<"$TABLE_PY" || true; exit 1; }

# step NAME SECONDS CMD...: run CMD under its timeout, log to $out/NAME.log, record the outcome.
step() {
  local name=$1 secs=$2 t0=$SECONDS rc=0; shift 2
  timeout -k "$GRACE" "$secs" "$@" >"$out/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$secs" >>"$out/steps.tsv"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "  $name: timed out after $secs s" >&2
  return "$rc"
}

# -- stage: copy the pieces this call carried, check every piece that is there -----------------
stage() {
  shopt -s nullglob
  local m k f size sum have=0 n
  for d in "$carry"/c*/; do
    for f in "$d"part*; do cp "$f" "$ch/"; done
    [ -f "$d/MANIFEST" ] && cp "$d/MANIFEST" "$ch/MANIFEST"
  done
  [ -f "$ch/MANIFEST" ] || { echo "no MANIFEST: no piece of benchmarks/gpu_prepare.sh was carried"; return 1; }
  n=$(awk '$1 == "pieces" {print $2}' "$ch/MANIFEST")
  while read -r _ k f size sum; do
    if [ -f "$ch/$f" ] && [ "$(stat -c %s "$ch/$f")" = "$size" ] \
       && [ "$(sha256sum "$ch/$f" | cut -d' ' -f1)" = "$sum" ]; then
      have=$((have + 1))
    else
      echo "missing or damaged: piece c$k ($f)"
    fi
  done < <(awk '$1 == "piece"' "$ch/MANIFEST")
  echo "pieces: $have of $n in $ch"
  [ "$have" = "$n" ]
}

if [ "$mode" = stage ]; then
  # an earlier piece: report what is there, fail only when this call's own piece is bad
  t0=$SECONDS
  rep=$(timeout -k "$GRACE" "$T_STAGE" bash -c "$(declare -f stage); carry=$carry ch=$ch; stage" 2>&1) || true
  echo "$rep"; echo "staged in $((SECONDS - t0)) s"
  grep -q "^pieces: " <<<"$rep" || exit 1
  for f in "$carry"/c*/part*; do
    [ -e "$f" ] || continue
    if grep -q "(${f##*/})\$" <<<"$rep"; then echo "this call's piece ${f##*/} is damaged" >&2; exit 1; fi
  done
  exit 0
fi

TABLE_PY=$(cat <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
rows = []
steps = [l.split("\t") for l in (out / "steps.tsv").read_text().splitlines() if l.strip()] if (out / "steps.tsv").exists() else []
total = sum(int(s[2]) for s in steps)
for name, rc, secs, limit in steps:
    state = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"FAILED rc={rc}")
    rows.append((f"step {name}", f"{state}, {secs}/{limit} s"))
rows.append(("host time", f"{total} s (limit 420){' (dry run: no GPU)' if dry else ''}"))
for f in ("host.txt", "verify.log"):
    p = out / f
    if p.exists():
        rows += [(f.split(".")[0], l.strip()) for l in p.read_text().splitlines() if l.strip()][:8]
junit = out / "junit.xml"
if junit.exists():
    r = ET.parse(junit).getroot(); s = r if r.tag == "testsuite" else r[0]
    rows.append(("tests", f"{s.get('tests')} run, {s.get('failures')} failed, {s.get('errors')} errors, "
                          f"{s.get('skipped')} skipped ({float(s.get('time', 0)):.0f} s)"))
    for case in s.iter("testcase"):
        for bad in case.findall("failure") + case.findall("error"):
            rows.append(("  FAIL", f"{case.get('classname')}::{case.get('name')}: {' '.join((bad.get('message') or '').split())[:120]}"))
elif (out / "tests.log").exists():
    rows.append(("tests", "no junit.xml (tests did not finish)"))
def fmt(v):
    return f"{v:,.3g}" if isinstance(v, float) else str(v)
for name, log in (("kernels", "kernels"), ("gpu_image", "image"), ("join", "join")):
    js = out / f"{name}.json"
    data = json.loads(js.read_text()) if js.exists() else {}
    for r in data.get("rows", []):
        keys = [k for k in r if not isinstance(r[k], float) or k in ("ms", "img_s", "GB_s") or any(t in k for t in ("vs_", "ratio", "per_s", "best", "gbs"))]
        rows.append((name, ", ".join(f"{k}={fmt(r[k])}" for k in keys if r[k] is not None)))
    if not data.get("rows"):
        p = out / f"{log}.log"
        tail = p.read_text().strip().splitlines()[-1:] if p.exists() else []
        rows.append((name, (tail[0] if tail else "not run")[:150]))
w = max(len(k) for k, _ in rows)
print("\n== mmload GPU check ==")
for k, v in rows:
    print(f"{k.ljust(w)}  {v}")
PY
)

# -- setup: stops at the first failure ---------------------------------------------------------
step stage "$T_STAGE" bash -c "$(declare -f stage); carry=$carry ch=$ch; stage" \
  || { cat "$out/stage.log" >&2; die "pieces missing: upload every .carry/cK back to back (--stage)"; }
assemble() {
  rm -rf "$whl" "$site" && mkdir -p "$whl"
  awk '$1 == "piece" {print $3}' "$ch/MANIFEST" | sed "s|^|$ch/|" | xargs cat | tar xf - -C "$whl"
  ls "$whl"/whl/*.whl >/dev/null
}
step assemble "$T_ASSEMBLE" bash -c "$(declare -f assemble); ch=$ch whl=$whl site=$site; assemble" \
  || { cat "$out/assemble.log" >&2; die "could not assemble the pieces"; }
step install "$T_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$site" "$whl"/whl/*.whl || { tail -n 20 "$out/install.log" >&2; die "wheel install failed"; }
export PYTHONPATH=$site:$PWD
[ -d "$whl/photos" ] && [ -n "$(ls "$whl/photos")" ] && export MMLOAD_PHOTOS_DIR=$whl/photos
export MMLOAD_CACHE_DIR=${MMLOAD_CACHE_DIR:-$T/mmload-cache}
if [ "$dry" = 1 ]; then export NUMBA_ENABLE_CUDASIM=1 CUDA_VISIBLE_DEVICES=""; fi
# mmload.kernels is kernels/ (a pyproject package-dir mapping); without an install, link it.
[ -e mmload/kernels ] || ln -sfn ../kernels mmload/kernels
numpy_want=$(awk '$1 == "numpy" {print $2}' "$ch/MANIFEST")
sets=$(awk '$1 == "sets" {$1 = ""; print}' "$ch/MANIFEST")
verify() {
  "$PY" - "$site" "$numpy_want" "$dry" "$sets" <<'PY'
import importlib, importlib.metadata as md, os, sys
site, want, dry, sets = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4].split()
site = os.path.realpath(site)
def where(m):
    return os.path.realpath(getattr(m, "__file__", "") or "")
bad = []
import numpy
print(f"numpy {numpy.__version__} from {'wheels' if where(numpy).startswith(site) else where(numpy)}")
if want and (numpy.__version__ != want or not where(numpy).startswith(site)):
    bad.append(f"numpy is {numpy.__version__} at {where(numpy)}, not {want} from {site}")
import numba, numba.cuda
print(f"numba {numba.__version__}, numba-cuda {md.version('numba-cuda')}, cuda available: {numba.cuda.is_available()}")
need = ["webdataset", "av", "soundfile"] + [{"dali": "nvidia.dali", "cudf": "cudf"}[s] for s in sets if s in ("dali", "cudf")]
for name in need:
    dist = {"nvidia.dali": "nvidia-dali-cuda130", "cudf": "cudf-cu13"}.get(name, name)
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        # on the CPU, cuDF cannot import without a driver: there its wheel's presence must do
        try:
            ver = md.version(dist)
        except md.PackageNotFoundError:
            ver = None
        if dry and ver and name in ("cudf", "nvidia.dali"):
            print(f"{name} {ver} installed (import failed without a GPU: {type(e).__name__}: {str(e)[:60]})")
        else:
            bad.append(f"import {name}: {type(e).__name__}: {str(e)[:100]}")
for b in bad:
    print("BAD", b)
sys.exit(1 if bad else 0)
PY
}
step verify "$T_VERIFY" bash -c "$(declare -f verify); PY=$PY site=$site numpy_want=$numpy_want dry=$dry sets='$sets'; verify" \
  || { cat "$out/verify.log" >&2; die "the install does not verify"; }
hostinfo() {
  if [ "$dry" = 1 ]; then echo "no GPU (dry run)"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available(), 'numpy', numpy.__version__)"
}
step host "$T_HOST" bash -c "$(declare -f hostinfo); PY=$PY dry=$dry; hostinfo" && cp "$out/host.log" "$out/host.txt" \
  || { cat "$out/host.log" >&2; die "host check failed"; }
[ "$dry" = 1 ] || grep -q "gpu True" "$out/host.txt" || die "torch sees no GPU (use --dry-run on a CPU machine)"
echo "setup done in $SECONDS s"

# -- tests and benchmarks: each bounded, failures reported in the table -------------------------
fail=0
# shellcheck disable=SC2086
step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --timeout=60 \
  -o addopts="--strict-markers -ra --import-mode=importlib" --junitxml="$out/junit.xml" \
  ${MMLOAD_GPU_TESTS:-tests/gpu tests/kernels tests/features} || fail=1
tail -n 5 "$out/tests.log"
if [ "$dry" = 1 ]; then
  step kernels "$T_KERNELS" "$PY" benchmarks/kernels_bench.py --dry-run || fail=1
  echo "gpu_image: skipped (dry run: needs a GPU and DALI)" >"$out/image.log"
  step join "$T_JOIN" "$PY" benchmarks/join_bench.py --device cpu --rows "${JOIN_ROWS:-200000}" \
    --json "$out/join.json" || fail=1
else
  step kernels "$T_KERNELS" "$PY" benchmarks/kernels_bench.py --json "$out/kernels.json" || fail=1
  step image "$T_IMAGE" "$PY" benchmarks/gpu_image.py --images "${GPU_IMAGES:-4096}" \
    --data "$T/gpu_image_data" --json "$out/gpu_image.json" || fail=1
  step join "$T_JOIN" "$PY" benchmarks/join_bench.py --device cuda --rows "${JOIN_ROWS:-2000000}" \
    --json "$out/join.json" || fail=1
fi
step table "$T_TABLE" "$PY" - "$out" "$dry" <<<"$TABLE_PY" || fail=1
cat "$out/table.log"
echo "gpu_check: $SECONDS s on this host (budget $budget s); exit $fail"
exit "$fail"
