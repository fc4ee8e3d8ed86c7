#!/usr/bin/env bash
# Decompress ARCHIVE into redis-install.sh (INSTALL_SH), run in a one-off
# container of the redis service with its volume mounted (redis stopped).
# Runs after common.sh.
#   rdb-install.sh ARCHIVE INSTALL_SH DIR ASIDE DBFILE AOF AOFDIR -- DOCKER_COMPOSE...
# shellcheck disable=SC2154  # DC, D: set by common.sh
archive=$1; install_sh=$2; shift 2
decompressor "$archive"
set +e
"${D[@]}" < "$archive" |
  "${DC[@]}" run --rm --no-deps -T --entrypoint sh redis -c "$install_sh" sh "$@"
st=("${PIPESTATUS[@]}")
set -e
[ "${st[0]}" = 0 ] || fail "the archive does not decompress"
[ "${st[1]}" = 0 ] || fail "installing the RDB into the redis volume failed"
