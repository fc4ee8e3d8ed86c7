#!/usr/bin/env bash
# deploy --dry-run's facts, read-only: the containers, their images' digests
# and the digest each image reference has now in its registry, in parallel.
#
#   facts.sh PROJECT FORMAT ACCEPT TARGETS
#
# == containers: docker inspect --format FORMAT of each container of PROJECT;
# then "@@image ID REPO-DIGEST..." of each image they run; then for each TARGETS
# line ("REF URL", URL the registry's manifest of REF) "@@remote REF DIGEST" or
# "@@remote REF ?HTTP CODE": a HEAD request (Accept: ACCEPT) with an anonymous
# bearer token when the registry asks for one: nothing is pulled.
set -u
project=$1 format=$2 accept="Accept: $3" targets=$4

field() {  # field NAME: the value of NAME="..." in $challenge
  printf '%s' "$challenge" | sed -n "s/.*$1=\"\\([^\"]*\\)\".*/\\1/p"
}

remote_digest() {
  local ref=$1 url=$2 head token digest code challenge
  head=$(curl -sSI --max-time 10 -H "$accept" "$url" 2>&1 | tr -d '\r')
  if printf '%s\n' "$head" | grep -qi '^www-authenticate: *bearer'; then
    challenge=$(printf '%s\n' "$head" | sed -n 's/^[Ww][Ww][Ww]-[Aa]uthenticate: *[Bb]earer *//p')
    token=$(curl -s --max-time 10 -G "$(field realm)" --data-urlencode "service=$(field service)" \
      --data-urlencode "scope=$(field scope)" \
      | sed -n 's/.*"\(access_\)\{0,1\}token": *"\([^"]*\)".*/\2/p')
    if [ -n "$token" ]; then
      head=$(curl -sSI --max-time 10 -H "$accept" -H "Authorization: Bearer $token" "$url" 2>&1 \
        | tr -d '\r')
    fi
  fi
  digest=$(printf '%s\n' "$head" | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p' | head -n 1)
  code=$(printf '%s\n' "$head" | sed -n '1s/^HTTP[^ ]* \([0-9]*\).*/\1/p')
  echo "@@remote $ref ${digest:-?HTTP ${code:-no answer}}"
}

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
echo '== containers'
docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$project" |
  xargs -r docker inspect --format "$format" | tee "$T/c"
for i in $(cut -d'|' -f5 "$T/c" | sort -u); do
  docker image inspect --format '@@image {{.Id}} {{range .RepoDigests}}{{.}} {{end}}' "$i" \
    2>/dev/null
done
n=0
while read -r ref url; do
  [ -n "$ref" ] || continue
  remote_digest "$ref" "$url" > "$T/r$n" &
  n=$((n + 1))
done <<< "$targets"
wait
cat "$T"/r* 2>/dev/null
exit 0
