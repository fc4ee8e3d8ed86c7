#!/usr/bin/env bash
# Read an existing archive: print its sha256 (compared with the manifest by the
# caller), check it whole, print its size. Runs after common.sh.
#   check-archive.sh postgres ARCHIVE -- DOCKER_COMPOSE...
#       one read: sha256 and full decompression together (+ raw_sha256); its
#       contents are read whole by pg_restore when it is restored.
#   check-archive.sh redis ARCHIVE CHECK_SH -- DOCKER_COMPOSE...
#       sha256, then decompression into redis-check-rdb (keys, expires).
kind=$1; archive=$2
[ -f "$archive" ] || fail "$archive does not exist"
work=$(mktemp -d) || fail "cannot create a temporary directory"
trap 'rm -rf -- "$work"' EXIT
case "$kind" in
  postgres)
    read_back "$archive"
    echo "raw_sha256=$(cut -d" " -f1 < "$work/raw")" ;;
  redis)
    sha=$(sha256sum < "$archive") || fail "cannot read $archive to checksum it"
    echo "sha256=${sha%% *}"
    redis_verify "$archive" "$3" ;;
  *) fail "unknown backup kind $kind" ;;
esac
echo "size=$(stat -c %s -- "$archive")"
