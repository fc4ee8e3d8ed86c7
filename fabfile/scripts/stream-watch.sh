#!/usr/bin/env bash
# Run the command $1 in its own process group, and end that whole group when our
# stdin reaches EOF (Ctrl-C on our side, or the connection died): closing an SSH
# channel does not signal a command that has no terminal. Exits with its status.
exec 3<&0
setsid bash -c "$1" </dev/null & p=$!
# The watcher reads fd 3 (our stdin): a background job's own stdin is /dev/null.
# (its output goes nowhere: it must never hold our stdout/stderr open)
# shellcheck disable=SC2016 # $1 is the watcher's own argument
setsid bash -c 'cat >/dev/null; kill -TERM -- -"$1" 2>/dev/null || kill -TERM "$1"' _ "$p" \
  <&3 >/dev/null 2>&1 & w=$!
exec 3<&-
wait "$p"; rc=$?
# (before its setsid the watcher has no process group of its own yet)
kill -TERM -- -"$w" 2>/dev/null || kill -TERM "$w" 2>/dev/null
exit "$rc"
