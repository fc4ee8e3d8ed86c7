#!/usr/bin/env bash
# BGSAVE, copy the RDB out, compress, fsync, check, rename one Redis backup;
# print its facts (key=value lines). Runs after common.sh.
#   redis-backup.sh DIR COMPRESSION LABEL TIMEOUT SAVE_SH CHECK_SH -- DOCKER_COMPOSE...
# shellcheck disable=SC2154  # DC, Z, ZEXT, ZTOOL, name: set by common.sh
dir=$1; compression=$2; label=$3; timeout=$4; save_sh=$5; check_sh=$6

mkdir -p -- "$dir" || fail "cannot create the backup directory $dir"
work=$(mktemp -d) || fail "cannot create a temporary directory"
tmp=
trap 'rm -rf -- "$work"; [ -z "$tmp" ] || rm -f -- "$tmp"' EXIT
pick_compressor "$compression"
if ! "${DC[@]}" exec -T redis sh -c "$save_sh" sh "$timeout" </dev/null \
    > "$work/save" 2> "$work/save.err"; then
  msg=$(sed -n "s/^FAILED: //p" "$work/save.err" | head -n 1)
  [ -n "$msg" ] ||
    msg="redis does not answer (is the redis service running?): $(tail -n 1 "$work/save.err")"
  fail "$msg"
fi
cat "$work/save"
rdb=$(sed -n "s/^rdb=//p" "$work/save")
echo "compressor=$ZTOOL"
new_name redis "$label"
data=$dir/$name.rdb.$ZEXT; tmp=$dir/.$name.rdb.$ZEXT.partial

# A writer that fails (disk full) also kills the copy before it: the writer first.
set +e
"${DC[@]}" exec -T redis sh -c 'exec cat -- "$1"' sh "$rdb" </dev/null | "${Z[@]}" > "$tmp"
st=("${PIPESTATUS[@]}")
set -e
[ "${st[1]}" = 0 ] || fail "writing the compressed RDB to $dir failed (disk full?) (exit ${st[1]})"
[ "${st[0]}" = 0 ] ||
  fail "copying the RDB out of the redis container failed (exit ${st[0]})"
finish_file "$tmp"

sha256sum < "$tmp" > "$work/sha" &
shapid=$!
redis_verify "$tmp" "$check_sh"
wait "$shapid" || fail "cannot read $tmp to checksum it"
echo "sha256=$(cut -d" " -f1 < "$work/sha")"
echo "size=$(stat -c %s -- "$tmp")"
mv -f -- "$tmp" "$data" && tmp= || fail "cannot rename the verified backup into place"
sync -- "$dir" || true
echo "file=${data##*/}"
echo "finished=$(date -u +%s.%N)"
