#!/usr/bin/env bash
# Host.write_file's one command: the bytes on stdin go to $1 (the path), mode $2
# (octal), verified against $3 (size) and $4 (sha256). The temporary file beside it
# is 0600 from creation (umask + mktemp), fsynced, read back, chmodded and renamed;
# it is removed on any failure (also when the connection drops: stdin ends short,
# the check fails). Prints "ok <size> <sha256>"; a failure's last line is
# "FAILED: <cause>" on stderr.
set -u
umask 077
path=$1 mode=$2 size=$3 sha=$4
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
tmp=$(mktemp -p "$(dirname -- "$path")" ".${path##*/}.XXXXXXXX" 2>&1) || fail "$tmp"
trap 'rm -f -- "$tmp"' EXIT
err=$(cat 2>&1 > "$tmp") || fail "${err:-cat failed}"
err=$(sync -- "$tmp" 2>&1) || fail "${err:-fsync failed}"
got=$(stat -c %s -- "$tmp") || fail "cannot stat $tmp"
[ "$got" = "$size" ] || fail "wrote $got of $size bytes (connection lost?)"
got_sha=$(sha256sum < "$tmp") || fail "cannot read $tmp back"
[ "${got_sha%% *}" = "$sha" ] || fail "the bytes read back differ from those sent"
chmod "$mode" -- "$tmp" || fail "cannot chmod $tmp"
err=$(mv -f -- "$tmp" "$path" 2>&1) || fail "${err:-mv failed}"
trap - EXIT
echo "ok $got ${got_sha%% *}"
