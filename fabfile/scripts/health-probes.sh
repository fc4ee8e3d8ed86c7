#!/usr/bin/env bash
# health: run every probe in the background under a timeout, then print results.
#   health-probes.sh LIMIT PARALLEL ID COMMAND [ID COMMAND...]
# LIMIT: seconds before a probe is stopped (timeout -k 1); PARALLEL: 1 runs the
# probes side by side, 0 one after another (the benchmark's baseline).
# Each COMMAND runs with bash -c, with $T a temporary directory of its own.
# Output, per probe: "@@probe ID EXIT_CODE MILLISECONDS" then (the end of) what
# it printed. Exit code 124: the probe timed out; 125: it did not report.
set -u
export LC_ALL=C
limit=$1 parallel=$2
shift 2
T=$(mktemp -d "${TMPDIR:-/tmp}/maicivy-health.XXXXXX") || exit 90
export T
trap 'rm -rf "$T"' EXIT
probe() {
  local id=$1 t=${EPOCHREALTIME:-0.0}
  local start=${t/./}
  timeout -k 1 "$limit" bash -c "$2" >"$T/$id.out" 2>&1 </dev/null
  local rc=$?
  t=${EPOCHREALTIME:-0.0}
  echo "$rc $(( (${t/./} - start) / 1000 ))" >"$T/$id.rc"
}
ids=()
while [ $# -ge 2 ]; do
  ids+=("$1")
  if [ "$parallel" = 1 ]; then probe "$1" "$2" & else probe "$1" "$2"; fi
  shift 2
done
wait
for id in "${ids[@]}"; do
  rc='125 0'; if [ -f "$T/$id.rc" ]; then read -r rc <"$T/$id.rc"; fi
  echo "@@probe $id $rc"
  tail -c 8192 "$T/$id.out" 2>/dev/null; echo
done
