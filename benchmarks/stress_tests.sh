#!/usr/bin/env bash
# Run tests N times in a row while other processes keep every core busy (issue 15: the suite
# must not depend on an idle machine). Usage:
#   bash benchmarks/stress_tests.sh [N] [pytest args...]     (default: 5 runs of the whole suite)
# Prints one line per run and exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests)
py="${PYTHON:-python}"
cores=$(nproc)
pids=()
for _ in $(seq "$cores"); do
  "$py" -c "while True: pass" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
echo "stress: $cores busy-loop processes on $cores cores; $runs runs of: pytest ${args[*]}"
failed=0
for i in $(seq "$runs"); do
  start=$(date +%s)
  if out=$("$py" -m pytest -q -p no:cacheprovider "${args[@]}" 2>&1); then status=passed; else status=FAILED; failed=1; fi
  summary=$(printf '%s\n' "$out" | tail -n 1)
  echo "run $i: $status in $(( $(date +%s) - start )) s: $summary"
  if [ "$status" = FAILED ]; then printf '%s\n' "$out" | grep -E "^(FAILED|ERROR)" | head -20; fi
done
exit $failed
