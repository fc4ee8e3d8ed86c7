#!/bin/sh
# Inside a one-off container of the redis service (redis stopped), with the
# decompressed RDB on stdin: move the current files aside into ASIDE and install
# the RDB both as DBFILE and, when AOF is on, as the base of a fresh multi-part
# AOF (Redis 7 loads the AOF, not the RDB, when appendonly is yes).
#   redis-install.sh DIR ASIDE DBFILE AOF(yes|no) AOFDIR
set -eu
dir="$1"; aside="$2"; dbfile="$3"; aof="$4"; aofdir="$5"
cd "$dir"
owner=$(stat -c %u:%g .)
mkdir "$aside"
cat > "$aside/.incoming.rdb"
sync
for f in "$dbfile" "$aofdir" appendonly.aof; do
  if [ -e "$f" ]; then mv "$f" "$aside/"; fi
done
mv "$aside/.incoming.rdb" "$dbfile"
if [ "$aof" = yes ]; then
  mkdir "$aofdir"
  cp "$dbfile" "$aofdir/appendonly.aof.1.base.rdb"
  : > "$aofdir/appendonly.aof.1.incr.aof"
  {
    echo 'file appendonly.aof.1.base.rdb seq 1 type b'
    echo 'file appendonly.aof.1.incr.aof seq 1 type i'
  } > "$aofdir/appendonly.aof.manifest"
  chown -R "$owner" "$aofdir"
fi
chown "$owner" "$dbfile"
sync
echo installed
