#!/usr/bin/env bash
# What deploy reads on the server: the managed files' hashes, the current
# release, the releases kept and the names (never values) of unset .env secrets.
#
#   state.sh MODE D ROOT ENV_FILE KEEP RELS
#
# D is the deploy state directory ({root}/.deploy), RELS the managed files
# relative to ROOT, one a line. MODE:
#   report  run by the stack lock's holder once the lock is ours ($T, the lock's
#           token, in the environment): first snapshots the managed files for
#           this attempt's rollback (attempts/<id>/files.tar) -- unless the
#           previous deploy was interrupted ($D/attempt still names its attempt):
#           its snapshot, taken before it changed anything, stays the rollback
#           target (== base <id> interrupted). KEEP attempts are kept.
#   probe   read-only, without the lock (deploy --dry-run): == busy + the holder
#           when a deploy holds the lock; ends with == ready.
#   state   the state only.
set -uo pipefail
mode=$1 D=$2 R=$3 env_file=$4 keep=$5 rels=$6

existing=()  # the managed files that exist (tar fails on missing names)
while IFS= read -r f; do
  if [ -n "$f" ] && [ -f "$R/$f" ]; then existing+=("$f"); fi
done <<< "$rels"

if [ "$mode" = report ]; then
  cd "$R" || exit 1
  B=$(cat "$D/attempt" 2>/dev/null)
  if [ -n "$B" ] && [ -f "$D/attempts/$B/files.tar" ]; then
    echo "== base $B interrupted"
    if [ -f "$D/attempts/$B/images" ]; then echo "== base-images"; cat "$D/attempts/$B/images"; fi
  else
    B=$(date -u +%Y%m%dT%H%M%SZ)-$(printf %.8s "${T:-}")
    mkdir -p "$D/attempts/$B" && tar cf "$D/attempts/$B/files.tar" -T /dev/null -- "${existing[@]}" \
      || exit 1
    echo "$B" > "$D/attempt.tmp" && mv -f "$D/attempt.tmp" "$D/attempt"
    echo "== base $B"
    find "$D/attempts" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | head -n -"$keep" |
      while read -r a; do [ "$a" = "$B" ] || rm -rf -- "${D:?}/attempts/$a"; done
  fi
  rm -rf "$D/pre"  # the single snapshot of former versions
fi

if [ "$mode" = probe ] && [ -e "$D/lock" ] && ! flock -n "$D/lock" true; then
  echo '== busy'
  cat "$D/lock.owner" 2>/dev/null
fi

echo '== hashes'
if cd "$R" 2>/dev/null; then
  for f in "${existing[@]}"; do sha256sum -- "$f"; done
fi
echo '== current'
cat "$D/current" 2>/dev/null
echo '== releases'
ls -1 "$D/releases" 2>/dev/null
echo '== unset'
if [ -f "$env_file" ]; then
  sed -n -E 's/^(POSTGRES_PASSWORD|REDIS_PASSWORD|GF_SECURITY_ADMIN_PASSWORD|POSTGRES_USER|POSTGRES_DB)=(CHANGE_ME)?$/\1/p' \
    "$env_file"
else
  echo '.env'
fi
if [ "$mode" = probe ]; then echo '== ready'; fi
exit 0
