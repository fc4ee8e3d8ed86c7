#!/usr/bin/env bash
# Run the command $4 only while we hold the stack lock (see fabfile/lock.py): $1 the
# lock directory, $2 our token, $3 the step's label for the journal. A step of ours
# holds lock.step shared, so a new holder waits for it before it takes over.
# Prints "== lost-lock <holder>" and exits 76 (lock.LOST) without running it when
# the lock is no longer ours; otherwise exits with the command's status.
D=$1 T=$2 label=$3 command=$4
exec 8>>"$D/lock.step" && flock -s 8 || exit 1
if flock -n "$D/lock" true || [ "$(cat "$D/lock.token" 2>/dev/null)" != "$T" ]; then
  echo "== lost-lock $(cat "$D/lock.owner" 2>/dev/null)"; exit 76
fi
printf '%s %s step %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "${T:0:8}" "$label" \
  >> "$D/journal"
bash -c "$command"
rc=$?
printf '%s %s step-end rc=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "${T:0:8}" "$rc" \
  >> "$D/journal"
exit "$rc"
