#!/usr/bin/env bash
# Keep a release (its files and image tags), make it current, prune old ones.
#
#   record.sh D ROOT RELEASE KEEP REPO IMAGES RELS TAGS
#
# D: the deploy state directory; the release goes to D/releases/RELEASE
# (files.tar of the managed files RELS -- relative to ROOT, one a line -- and
# the images file, IMAGES' text). TAGS: "image-id tag" lines (the tags that keep
# the release's images from being pruned). Then only the KEEP newest releases
# stay, their tags (REPO*) too, and unused images are pruned.
set -eu
D=$1 root=$2 release=$3 keep=$4 repo=$5 images=$6 rels=$7 tags=$8
RD="$D/releases/$release"
mkdir -p "$RD"
cd "$root"
existing=()
while IFS= read -r f; do
  if [ -n "$f" ] && [ -f "$f" ]; then existing+=("$f"); fi
done <<< "$rels"
tar cf "$RD/files.tar" -T /dev/null -- "${existing[@]}"
printf '%s' "$images" > "$RD/images"
while read -r id tag; do
  if [ -n "$id" ]; then docker tag "$id" "$tag"; fi
done <<< "$tags"
echo "$release" > "$D/current.tmp" && mv -f "$D/current.tmp" "$D/current"
find "$D/releases" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | head -n -"$keep" |
  while read -r old; do
    docker images --format '{{.Repository}}:{{.Tag}}' | grep -F ":$old" | grep -F "$repo" \
      | xargs -r docker rmi >/dev/null || true
    rm -rf -- "${D:?}/releases/$old"
  done
docker image prune -f >/dev/null || true
