#!/usr/bin/env bash
# Run tests N times in a row while other processes keep every core busy (issue 15: the suite
# must not depend on an idle machine). Usage:
#   bash benchmarks/stress_tests.sh [N] [pytest args...]     (default: 5 runs of the whole suite)
# Prints one line per run (with the load average before and after it) and exits non-zero if any
# run failed. STRESS_BUSY=N starts N busy loops instead of one per core (0: the load comes from
# elsewhere, e.g. benchmarks/mutants.py keeping the cores busy).
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests)
py="${PYTHON:-python}"
cores=$(nproc)
busy="${STRESS_BUSY:-$cores}"
pids=()
for _ in $(seq "$busy"); do
  "$py" -c "while True: pass" &
  pids+=($!)
done
trap '[ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null' EXIT
echo "stress: $busy busy-loop processes on $cores cores; $runs runs of: pytest ${args[*]}"
failed=0
for i in $(seq "$runs"); do
  start=$(date +%s)
  load0=$(cut -d' ' -f1 /proc/loadavg)
  if out=$("$py" -m pytest -q -p no:cacheprovider "${args[@]}" 2>&1); then status=passed; else status=FAILED; failed=1; fi
  summary=$(printf '%s\n' "$out" | tail -n 1)
  load1=$(cut -d' ' -f1 /proc/loadavg)
  echo "run $i: $status in $(( $(date +%s) - start )) s (load $load0 -> $load1): $summary"
  if [ "$status" = FAILED ]; then
    printf '%s\n' "$out" > "stress-run-$i.log"
    printf '%s\n' "$out" | grep -E "^(FAILED|ERROR)" | head -20
    echo "  (the whole output: stress-run-$i.log)"
  fi
done
exit $failed
