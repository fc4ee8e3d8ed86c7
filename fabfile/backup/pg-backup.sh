#!/usr/bin/env bash
# Dump, compress, fsync, verify and rename one Postgres backup; print its facts
# (key=value and count<TAB>rows<TAB>table lines). Runs after common.sh.
#   pg-backup.sh DIR COMPRESSION LABEL PG_DUMP_SH -- DOCKER_COMPOSE...
# The data goes from the container straight into $DIR under a temporary name
# (.NAME.dump.gz.partial), is read back whole, and only then renamed into place.
# shellcheck disable=SC2154  # DC, Z, ZEXT, ZTOOL, D, name: set by common.sh
dir=$1; compression=$2; label=$3; pg_dump_sh=$4
# In the postgres container, as the stack's superuser over the local socket (the
# password, if needed, from the container's own environment: never argv).
pg() {
  "${DC[@]}" exec -T postgres sh -c \
    'export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" PGDATABASE="$POSTGRES_DB"
     '"$1" sh </dev/null
}

mkdir -p -- "$dir" || fail "cannot create the backup directory $dir"
work=$(mktemp -d) || fail "cannot create a temporary directory"
tmp=; gtmp=
trap 'rm -rf -- "$work"; [ -z "$tmp" ] || rm -f -- "$tmp" "$gtmp"' EXIT
pick_compressor "$compression"
versions=$(pg 'pg_dump --version && psql -XtAq -c "SHOW server_version" &&
               psql -XtAq -c "SELECT current_database()"') ||
  fail "postgres does not answer (is the postgres service running?)"
echo "pg_dump_version=$(sed -n 1p <<<"$versions")"
echo "server_version=$(sed -n 2p <<<"$versions")"
echo "database=$(sed -n 3p <<<"$versions")"
echo "compressor=$ZTOOL"
new_name postgres "$label"
data=$dir/$name.dump.$ZEXT; tmp=$dir/.$name.dump.$ZEXT.partial
gdata=$dir/$name.globals.sql.$ZEXT; gtmp=$dir/.$name.globals.sql.$ZEXT.partial

# The dump: the in-container steps report on stderr (see pg-dump.sh).
set +e
"${DC[@]}" exec -T postgres sh -c "$pg_dump_sh" sh </dev/null 2> "$work/dump.err" |
  "${Z[@]}" > "$tmp"
st=("${PIPESTATUS[@]}")
set -e
[ "${st[1]}" = 0 ] || fail "writing the compressed dump to $dir failed (disk full?) (exit ${st[1]})"
last=$(grep -v -e "^count" -e "^status_" -e "^raw_sha256=" "$work/dump.err" | sed -n '/./h; ${x;p}') || true
[ "${st[0]}" = 0 ] ||
  fail "pg_dump failed in the postgres container (exit ${st[0]}): $(tail -n 1 "$work/dump.err")"
grep -qx "status_dump=0" "$work/dump.err" || fail "pg_dump failed in the postgres container: $last"
grep -qx "status_restore=0" "$work/dump.err" || fail "pg_restore cannot read the whole dump: $last"
grep -qx "status_tee=0" "$work/dump.err" ||
  fail "streaming the dump out of the postgres container failed: $last"

# Roles and other globals (a writer that fails, disk full, also kills the dump).
set +e
pg 'exec pg_dumpall --globals-only' | "${Z[@]}" > "$gtmp"
st=("${PIPESTATUS[@]}")
set -e
[ "${st[1]}" = 0 ] || fail "writing the globals dump to $dir failed (disk full?) (exit ${st[1]})"
[ "${st[0]}" = 0 ] ||
  fail "pg_dumpall --globals-only failed in the postgres container (exit ${st[0]})"
sync -- "$gtmp" || fail "cannot fsync $gtmp"
finish_file "$tmp"

# Read the file back from the disk: it must decompress to the stream pg_restore read.
read_back "$tmp"
want=$(sed -n "s/^raw_sha256=//p" "$work/dump.err")
[ "$(cut -d" " -f1 < "$work/raw")" = "$want" ] || fail "the archive read back from $dir does \
not decompress to the dump pg_restore read (disk or compressor error)"
grep "^count" "$work/dump.err" || [ $? = 1 ]  # 1: no table (an empty database)
decompressor "$gtmp"
set +e
"${D[@]}" < "$gtmp" | wc -c > /dev/null
st=("${PIPESTATUS[@]}")
set -e
[ "${st[0]}" = 0 ] || fail "the globals dump does not decompress (exit ${st[0]})"
[ "${st[1]}" = 0 ] || fail "reading the globals dump failed (exit ${st[1]})"

echo "sha256=$(cut -d" " -f1 < "$work/sha")"
echo "raw_sha256=$want"
echo "size=$(stat -c %s -- "$tmp")"
echo "globals_sha256=$(sha256sum < "$gtmp" | cut -d" " -f1)"
echo "globals_size=$(stat -c %s -- "$gtmp")"
mv -f -- "$tmp" "$data" && mv -f -- "$gtmp" "$gdata" && tmp= ||
  fail "cannot rename the verified backup into place"
sync -- "$dir" || true
echo "file=${data##*/}"
echo "globals_file=${gdata##*/}"
echo "finished=$(date -u +%s.%N)"
