#!/bin/sh
# Inside the redis container: wait until redis answers and has loaded its data
# (at most TIMEOUT_SECONDS), then print its key count.
#   redis-wait.sh TIMEOUT_SECONDS
REDISCLI_AUTH="$REDIS_PASSWORD"; export REDISCLI_AUTH
timeout="$1"; start=$(date +%s)
while :; do
  if [ "$(redis-cli PING 2>/dev/null | tr -d '\r')" = PONG ] &&
     redis-cli INFO persistence 2>/dev/null | grep -q '^loading:0'; then
    break
  fi
  [ $(( $(date +%s) - start )) -lt "$timeout" ] || {
    echo "FAILED: redis did not come back within ${timeout}s" >&2; exit 1; }
  sleep 0.2
done
keys=$(redis-cli INFO keyspace | tr -d '\r' | sed -n 's/^db[0-9]*:keys=\([0-9]*\).*/\1/p')
echo "keys=$(echo "$keys" | awk '{s+=$1} END {print s+0}')"
