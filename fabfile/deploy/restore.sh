#!/usr/bin/env bash
# Put back a snapshot's files and image tags.
#
#   restore.sh ROOT TAR RELS TAGS
#
# RELS: the managed files now (relative to ROOT, one a line): those the
# snapshot TAR does not have go away (a deploy added them). Only the files
# that differ are extracted: the others keep their inode and times (a
# service's "loaded after its files changed" stays true). Prints == changed and
# the files it changed (the services that mount them reload). TAGS: "image-id
# ref" lines, tagged again.
set -eu
root=$1 T=$2 rels=$3 tags=$4
cd "$root"
tar tf "$T" > "$T.list"
echo '== changed'
while IFS= read -r f; do
  [ -n "$f" ] || continue
  if ! grep -qxF -- "$f" "$T.list"; then
    if [ -e "$f" ]; then echo "$f"; fi
    rm -f -- "$f"
  fi
done <<< "$rels"
rm -f "$T.list"
tar df "$T" 2>&1 \
  | grep -E "Contents differ|Size differs|Mode differs|Uid differs|Gid differs|No such file|Cannot stat" \
  | sed -E "s/^tar: //; s/: .*//" | sort -u > "$T.changed" || true
cat "$T.changed"
if [ -s "$T.changed" ]; then tar xf "$T" -T "$T.changed"; fi
rm -f "$T.changed"
while read -r id ref; do
  if [ -n "$id" ]; then docker tag "$id" "$ref"; fi
done <<< "$tags"
