#!/usr/bin/env bash
# monitoring.push: put back what monitoring-install.sh replaced (a file that
# was new is removed).
#   monitoring-rollback.sh ROOT STAGING REL...
root=$1 staging=$2
shift 2
for rel in "$@"; do
  live="$root/$rel" prev="$staging/.previous/$rel"
  if [ -e "$prev" ]; then mv -f "$prev" "$live"; else rm -f "$live"; fi
done
