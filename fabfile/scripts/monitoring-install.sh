#!/usr/bin/env bash
# monitoring.push: move the changed files from staging into place, keeping the
# previous ones under STAGING/.previous/ (monitoring-rollback.sh puts them back).
#   monitoring-install.sh ROOT STAGING REL...
set -e
root=$1 staging=$2
shift 2
for rel in "$@"; do
  live="$root/$rel" prev="$staging/.previous/$rel"
  mkdir -p "$(dirname "$live")" "$(dirname "$prev")"
  if [ -e "$live" ]; then cp -p "$live" "$prev"; fi
  mv -f "$staging/$rel" "$live"
done
