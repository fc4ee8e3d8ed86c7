#!/usr/bin/env bash
# Take the stack lock exclusively and hold it until our stdin closes (see the
# module doc of fabfile/lock.py). $1: the lock directory; $2: our token; $3: who
# holds it (lock.owner); $4: the task; $5: seconds to wait for backups holding it
# shared; $6: who, for the journal; $7: the report, shell run once the lock is ours
# (with $D and $T set), whose output goes between "== locked" and "== ready".
#
# Prints "== busy" + the holder and exits 75 (lock.BUSY) when another exclusive
# task holds it; "== waiting" + the backups while it waits for them; then
# "== journal" (its last lines, read before our "started" line), "== locked",
# the report, and "== ready".
D=$1 T=$2 _info=$3 _task=$4 _wait=$5 _by=$6 _report=$7
mkdir -p "$D" && chmod 700 "$D" || exit 1
exec 9>>"$D/lock" || exit 1
shared() {
  for f in "$D"/lock.shared.*; do [ -f "$f" ] && [ -d "/proc/${f##*.}" ] && cat -- "$f"; done
}
if ! flock -n -x 9; then
  if flock -n -s 9; then  # only backups hold it (shared): wait for them
    flock -u 9
    echo '== waiting'; shared
    flock -x -w "$_wait" 9 || { echo '== busy'; shared; exit 75; }
  else
    echo '== busy'; cat "$D/lock.owner" 2>/dev/null; exit 75
  fi
fi
# A step of a former holder may still run (its holder was killed): wait for it.
exec 8>>"$D/lock.step"
flock -n -x 8 || { echo '== waiting-step'; flock -x 8; }
printf '%s\n' "$T" > "$D/lock.token"
echo '== journal'; tail -n 300 "$D/journal" 2>/dev/null
# Keep the journal small: the last 2000 lines once it passes 5000.
if [ "$(wc -l < "$D/journal" 2>/dev/null || echo 0)" -gt 5000 ]; then
  tail -n 2000 "$D/journal" > "$D/journal.tmp" && mv -f "$D/journal.tmp" "$D/journal"
fi
printf '%s %s started task=%s by=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "${T:0:8}" \
  "$_task" "$_by" >> "$D/journal"
flock -u 8; exec 8>&-
echo '== locked'
eval "$_report"
# A keeper holds the lock too, for as long as the task's connection (the first
# ancestor that is not a shell or sudo: sshd, or the local inv process) lives:
# killing this shell (the first pid in lock.owner) does not free the lock.
W=$PPID
while [ "$W" -gt 1 ]; do
  case "$(cat "/proc/$W/comm" 2>/dev/null)" in
    bash|sh|dash|sudo) W=$(sed -E 's/.*\) [A-Za-z] ([0-9]+) .*/\1/' "/proc/$W/stat");;
    *) break;;
  esac
done
( while [ -d "/proc/$W" ]; do sleep 1 9>&-; done ) </dev/null >/dev/null 2>&1 7>&- 8>&- &
k=$!
printf '%s pid %s %s\n' "$_info" "$$" "$k" > "$D/lock.owner"
echo '== ready'
# Hold the lock until our stdin closes (end of the task or lost connection).
cat >/dev/null 9>&-
kill "$k" 2>/dev/null
[ "$(cat "$D/lock.token" 2>/dev/null)" = "$T" ] && rm -f "$D/lock.token" "$D/lock.owner"
true
