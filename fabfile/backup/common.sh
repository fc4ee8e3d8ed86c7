#!/usr/bin/env bash
# The start of every host-side backup script: scripts.py runs this text followed
# by the script's own file, as one `bash -c`. Strict mode, private files, one
# `FAILED: what went wrong` line on stderr, the compressor choice, and the
# pieces the dump, save, check and restore scripts share.
#
# Arguments: the script's own, then `--`, then the `docker compose ...` command
# of the stack (into DC): `bash -c TEXT NAME ARG... -- docker compose -p P ...`.
# DC, Z, ZEXT, ZTOOL, D and name are used by the script that follows; dir and work
# are its own (the backup directory, its private temporary directory).
# shellcheck disable=SC2034,SC2154
set -Eeuo pipefail
umask 077
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP
# A command that fails outside any check ends the script (set -e): name it.
trap 'rc=$?; [[ $- != *e* ]] || printf "FAILED: step exited %s: %s\n" "$rc" "$BASH_COMMAND" >&2' ERR
own=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do own+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi
DC=("$@")
set -- "${own[@]}"
echo "started=$(date -u +%s.%N)"

# pick_compressor gzip|zstd: Z (the command), ZEXT, ZTOOL (its version line).
# pigz uses every core; gzip otherwise; zstd falls back to them with a warning.
pick_compressor() {
  case "$1" in
    zstd)
      if command -v zstd >/dev/null 2>&1; then
        Z=(zstd -q -T0 -3 -c); ZEXT=zst; ZTOOL="$(zstd -V 2>&1 | head -n 1)"; return
      fi
      echo "warning: zstd is not installed on the server; compressing with gzip" >&2 ;;
  esac
  if command -v pigz >/dev/null 2>&1; then
    Z=(pigz -6 -c -p "$(nproc)"); ZTOOL="$(pigz -V 2>&1 | head -n 1)"
  else
    Z=(gzip -6 -c); ZTOOL="$(gzip -V 2>&1 | head -n 1)"
  fi
  ZEXT=gz
}

# decompressor FILE: D, the command that decompresses FILE (by its name).
decompressor() {
  case "$1" in
    *.zst|*.zst.partial)
      command -v zstd >/dev/null 2>&1 ||
        fail "zstd is not installed on the server (apt-get install zstd)"
      D=(zstd -q -d -c) ;;
    *.gz|*.gz.partial)
      if command -v pigz >/dev/null 2>&1; then D=(pigz -d -c); else D=(gzip -d -c); fi ;;
    *) fail "unknown compression of $1 (expected .gz or .zst)" ;;
  esac
}

# new_name KIND [LABEL]: a fresh name KIND-<UTC stamp>[-n][-LABEL] in $dir, into $name.
new_name() {
  local kind=$1 suffix=${2:+-$2} stamp i=1
  stamp=$(date -u +%Y%m%dT%H%M%SZ); name=$kind-$stamp$suffix
  while compgen -G "$dir/$kind-$stamp*" >/dev/null ||
        compgen -G "$dir/.$kind-$stamp*" >/dev/null; do
    i=$((i+1)); stamp=${stamp%%-*}-$i; name=$kind-$stamp$suffix
  done
  echo "name=$name"
}

# finish_file FILE: fsync it, then drop it from the page cache so the check reads the disk.
finish_file() {
  sync -- "$1" || fail "cannot fsync $1"
  dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true
}

# read_back ARCHIVE: read it ONCE: its sha256 (into $work/sha, printed) and the
# sha256 of what it decompresses to (into $work/raw), checksum and decompression together.
read_back() {
  local archive=$1 shapid shast
  decompressor "$archive"
  rm -f -- "$work/f"; mkfifo -- "$work/f" || fail "cannot create a fifo in $work"
  sha256sum < "$work/f" > "$work/sha" &
  shapid=$!
  exec 3> "$work/f"  # a writer of our own: the checksum ends even if tee never ran
  set +e
  tee "$work/f" < "$archive" | "${D[@]}" | sha256sum > "$work/raw"
  st=("${PIPESTATUS[@]}")
  exec 3>&-
  wait "$shapid"; shast=$?
  set -e
  [ "${st[0]}" = 0 ] || fail "cannot read $archive to checksum it"
  [ "$shast" = 0 ] && [ -s "$work/sha" ] || fail "cannot checksum the archive"
  # The checksum first: a damaged file is told by it, whatever else fails.
  echo "sha256=$(cut -d" " -f1 < "$work/sha")"
  [ "${st[1]}" = 0 ] || fail "the archive does not decompress (corrupted or truncated)"
}

# redis_verify ARCHIVE CHECK_SH: decompress it into redis-check-rdb (in the redis
# container, CHECK_SH = redis-check.sh) and print its keys, expires and RDB version.
redis_verify() {
  local archive=$1 check_sh=$2
  decompressor "$archive"
  set +e
  "${D[@]}" < "$archive" | "${DC[@]}" exec -T redis sh -c "$check_sh" sh > "$work/check"
  st=("${PIPESTATUS[@]}")
  set -e
  [ "${st[0]}" = 0 ] ||
    fail "the archive does not decompress (corrupted or truncated) (exit ${st[0]})"
  [ "${st[1]}" = 0 ] ||
    fail "redis-check-rdb rejects the RDB (corrupted or truncated) (exit ${st[1]})"
  grep -q "RDB looks OK" "$work/check" ||
    fail "redis-check-rdb rejects the RDB: $(grep -m1 -i "error\|fail" "$work/check")"
  echo "keys=$(sed -n "s/.*\[info\] \([0-9]*\) keys read.*/\1/p" "$work/check")"
  echo "expires=$(sed -n "s/.*\[info\] \([0-9]*\) expires.*/\1/p" "$work/check")"
  echo "rdb_version=$(sed -n "s/.*RDB version \([0-9]*\).*/\1/p;s/.*AUX FIELD redis-ver = .\([0-9.]*\).*/\1/p" "$work/check" | head -n 1)"
}
