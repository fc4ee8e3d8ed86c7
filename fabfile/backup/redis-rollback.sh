#!/bin/sh
# Inside a one-off container of the redis service: put back what
# redis-install.sh moved aside (when redis does not come back right).
#   redis-rollback.sh DIR ASIDE DBFILE AOFDIR
set -eu
dir="$1"; aside="$2"; dbfile="$3"; aofdir="$4"
cd "$dir"
[ -d "$aside" ] || exit 0
rm -rf "$dbfile" "$aofdir"
for f in "$aside"/* ; do [ -e "$f" ] && mv "$f" . ; done
rm -rf "$aside"
sync
echo rolledback
