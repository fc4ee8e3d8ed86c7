#!/bin/sh
# Inside the redis container: check an RDB read from stdin with redis-check-rdb.
f=$(mktemp) || exit 1
trap 'rm -f "$f"' EXIT
cat > "$f" || exit 1
redis-check-rdb "$f" 2>&1
