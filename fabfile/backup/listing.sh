#!/usr/bin/env bash
# One round trip for backup.list and friends: every file of each backup
# directory (file<TAB>KIND<TAB>FILE<TAB>SIZE) and every manifest's content on
# one line (manifest<TAB>KIND<TAB>FILE<TAB>JSON); KIND is the directory's name.
#   listing.sh DIR...
for d in "$@"; do
  [ -d "$d" ] || continue
  k=${d##*/}
  find "$d" -maxdepth 1 -type f -printf "file\t$k\t%f\t%s\n"
  for m in "$d"/*.json; do
    [ -f "$m" ] || continue
    printf 'manifest\t%s\t%s\t' "$k" "${m##*/}"; tr -d '\n' < "$m"; echo
  done
done
