#!/usr/bin/env bash
# Who holds the stack lock in the directory $1, without taking it: prints
# "== exclusive <owner>", or "== shared <holder>" per backup sharing it, or
# nothing when it is free.
D=$1
[ -e "$D/lock" ] || exit 0
if flock -n "$D/lock" true; then exit 0; fi
if flock -n -s "$D/lock" true; then
  for f in "$D"/lock.shared.*; do
    [ -f "$f" ] && [ -d "/proc/${f##*.}" ] && echo "== shared $(cat -- "$f")"
  done
else
  echo "== exclusive $(cat "$D/lock.owner" 2>/dev/null)"
fi
true
