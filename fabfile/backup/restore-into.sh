#!/usr/bin/env bash
# Create DATABASE and restore ARCHIVE into it in one transaction (dropped again
# on any failure; nothing else is touched), then print the row count of every
# table (count<TAB>rows<TAB>table). Runs after common.sh.
#   restore-into.sh ARCHIVE DATABASE PSQL_SH COUNT_ROWS_SQL -- DOCKER_COMPOSE...
# shellcheck disable=SC2154  # DC, D: set by common.sh
archive=$1; db=$2; psql_sh=$3; count_sql=$4
# psql DATABASE [-v name=value]... < SQL, in the postgres container (psql.sh).
psql_in() { "${DC[@]}" exec -T postgres sh -c "$psql_sh" sh "$@"; }

printf '%s\n' 'CREATE DATABASE :"new" TEMPLATE template0 OWNER :"owner";' |
  psql_in postgres -v new="$db" >/dev/null || fail "cannot create database $db"
drop_new() {
  printf '%s\n' 'DROP DATABASE IF EXISTS :"db";' |
    psql_in postgres -v db="$db" >/dev/null 2>&1 || true
}
trap drop_new EXIT
decompressor "$archive"
set +e
"${D[@]}" < "$archive" | "${DC[@]}" exec -T postgres sh -c \
  'export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" PGDATABASE="$POSTGRES_DB"
   exec pg_restore --exit-on-error --single-transaction --no-password -d "$1"' sh "$db"
st=("${PIPESTATUS[@]}")
set -e
[ "${st[0]}" = 0 ] || fail "the archive does not decompress (exit ${st[0]})"
[ "${st[1]}" = 0 ] || fail "pg_restore into $db failed (exit ${st[1]})"
trap - EXIT
echo "restored=1"

printf '%s;\n' "$count_sql" | psql_in "$db" |
  awk -F'|' '{n=$NF; sub(/[|][^|]*$/, ""); printf "count\t%s\t%s\n", n, $0}' ||
  fail "counting the rows of $db failed"
