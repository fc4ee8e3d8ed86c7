#!/usr/bin/env bash
# Break the stack lock in the directory $1 (deploy.unlock; $2: who breaks it, for
# the journal): kill its holders, drop the token (a resumed holder fails).
# Prints "== free", or "== owner <holder>" then "== broken" (or "== unknown",
# exit 3: no pids recorded; "== still-held", exit 4).
D=$1 by=$2
[ -e "$D/lock" ] || { echo "== free"; exit 0; }
if flock -n "$D/lock" true; then echo "== free"; exit 0; fi
owner=$(cat "$D/lock.owner" 2>/dev/null)
echo "== owner $owner"
read -r -a pids <<< "$(printf '%s\n' "$owner" | sed -n -E 's/.* pid ([0-9]+) ([0-9]+)$/\1 \2/p')"
[ "${#pids[@]}" -gt 0 ] || { echo "== unknown"; exit 3; }
kill -9 "${pids[@]}" 2>/dev/null
for _ in $(seq 50); do flock -n "$D/lock" true && break; sleep 0.2; done
flock -n "$D/lock" true || { echo "== still-held"; exit 4; }
t=$(cut -c1-8 "$D/lock.token" 2>/dev/null)
rm -f "$D/lock.token" "$D/lock.owner"
printf '%s %s unlocked by=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "${t:-????????}" "$by" \
  >> "$D/journal"
echo '== broken'
