#!/usr/bin/env bash
# sandbox, inside the container: point apt at the mounted local repository only
# (no mirror is reachable); the other sources are kept as *.offline.
#   sandbox-offline-apt.sh REPO_MOUNT [APT_DIR]   (APT_DIR: /etc/apt)
set -e
repo=$1
cd "${2:-/etc/apt}"
for f in sources.list sources.list.d/*.list sources.list.d/*.sources; do
  [ -f "$f" ] && [ "$f" != sources.list.d/maicivy-local.list ] && mv "$f" "$f.offline"
done
echo "deb [trusted=yes] file:$repo ./" > sources.list.d/maicivy-local.list
true
