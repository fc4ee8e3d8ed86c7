#!/bin/sh
# Inside the redis container: BGSAVE and wait until LASTSAVE moves past the
# value it had before (and no save is running), then print where the RDB is.
#   redis-save.sh TIMEOUT_SECONDS
# The password comes from the container's environment, never argv.
REDISCLI_AUTH="$REDIS_PASSWORD"; export REDISCLI_AUTH
timeout="$1"
r() { redis-cli "$@" 2>&1 | tr -d '\r'; }
ping=$(r PING)
[ "$ping" = PONG ] || { echo "FAILED: redis does not answer PING ($ping)" >&2; exit 1; }
start=$(date +%s)
while :; do
  before=$(r LASTSAVE)
  now=$(r TIME | head -n 1)
  # LASTSAVE has a resolution of one second: make sure ours is a later second.
  [ "$before" -lt "$now" ] 2>/dev/null || sleep 1
  out=$(r BGSAVE SCHEDULE)
  case "$out" in
    *started*|*scheduled*) break ;;
    *"already in progress"*) sleep 0.2 ;;
    *) echo "FAILED: redis refused BGSAVE: $out" >&2; exit 1 ;;
  esac
  [ $(( $(date +%s) - start )) -lt "$timeout" ] || {
    echo "FAILED: a save already running did not finish within ${timeout}s" >&2; exit 1; }
done
while :; do
  last=$(r LASTSAVE)
  info=$(r INFO persistence)
  if [ "$last" -gt "$before" ] 2>/dev/null &&
     echo "$info" | grep -q '^rdb_bgsave_in_progress:0'; then
    break
  fi
  [ $(( $(date +%s) - start )) -lt "$timeout" ] || {
    echo "FAILED: BGSAVE did not finish within ${timeout}s (LASTSAVE did not move)" >&2; exit 1; }
  sleep 0.2
done
echo "$info" | grep -q '^rdb_last_bgsave_status:ok' || {
  status=$(echo "$info" | grep '^rdb_last_bgsave_status')
  echo "FAILED: redis reports that BGSAVE failed ($status)" >&2
  exit 1; }
echo "lastsave=$last"
echo "rdb=$(r CONFIG GET dir | sed -n 2p)/$(r CONFIG GET dbfilename | sed -n 2p)"
echo "aof=$(r CONFIG GET appendonly | sed -n 2p)"
echo "appenddirname=$(r CONFIG GET appenddirname | sed -n 2p)"
echo "redis_version=$(r INFO server | sed -n 's/^redis_version://p')"
keys=$(r INFO keyspace | sed -n 's/^db[0-9]*:keys=\([0-9]*\).*/\1/p')
echo "keys_live=$(echo "$keys" | awk '{s+=$1} END {print s+0}')"
