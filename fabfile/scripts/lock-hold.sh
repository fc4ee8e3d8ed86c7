#!/usr/bin/env bash
# Hold the flock $1 until our stdin closes (fabfile/lock.py: server_lock, and the
# stack lock taken shared by a backup). $2: seconds to wait for it; $3: who holds it
# (written beside the lock for the next one to read); $4: "shared" or "exclusive".
# Prints LOCKED once it holds, or "BUSY <holder>" and exits 75 (lock.BUSY).
lock=$1 wait=$2 info=$3 mode=$4
mkdir -p -- "$(dirname -- "$lock")" || exit 2
exec 9>>"$lock" || exit 2
if [ "$mode" = shared ]; then
  flag=-s me=$lock.shared.$$ holder=$lock.owner
else
  flag=-x me=$lock.holder holder=$lock.holder
fi
if ! flock "$flag" -w "$wait" 9; then
  printf 'BUSY %s\n' "$(cat -- "$holder" 2>/dev/null)"; exit 75
fi
printf '%s\n' "$info" > "$me"
# A second process keeps fd 9 open too, while it waits for our stdin to close.
exec 7<&0
cat <&7 >/dev/null & c=$!
exec 7<&-
echo LOCKED
wait "$c"
if [ "$mode" = shared ]; then rm -f "$me"; fi
