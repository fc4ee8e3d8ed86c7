#!/usr/bin/env bash
# The stack's state for deploy's plan, or the health gate.
#
#   plan.sh MODE PROJECT ENV_FILE COMPOSE_FILE FORMAT REFS REGISTRIES \
#           DOMAIN PORT ADDRESS TIMEOUT PATHS
#
# MODE gate: == containers (one line per container of PROJECT, docker inspect
# --format FORMAT), then == http.
# MODE state / pull: (pull: docker login to REGISTRIES -- one a line, docker.io
# for Docker Hub -- when ENV_FILE has REGISTRY_USERNAME/REGISTRY_PASSWORD, then
# compose pull) == hashes (the wanted config hashes), == images ("ref image-id"
# of each of REFS, one a line; "missing" when it is not here), == containers,
# and == http when DOMAIN is set: what does not depend on the pull runs while it
# pulls. A refused login prints "== login-failed REGISTRY: reason" (exit 3).
#
# == http: "path status" of each of PATHS (one a line) fetched through nginx
# (https://DOMAIN:PORT, resolved to ADDRESS) in parallel, TIMEOUT seconds each.
set -eu
mode=$1 project=$2 env_file=$3 compose_file=$4 format=$5 refs=$6 registries=$7
domain=$8 port=$9 address=${10} timeout=${11} paths=${12}

compose() {
  docker compose --project-name "$project" --env-file "$env_file" -f "$compose_file" "$@"
}

containers() {
  docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$project" |
    xargs -r docker inspect --format "$format"
}

http() {
  echo '== http'
  while IFS= read -r path; do
    [ -n "$path" ] || continue
    printf '%s %s\n' "$path" "$(curl -sk -o /dev/null -w '%{http_code}' --max-time "$timeout" \
      -H 'X-Maicivy-Check: health' --resolve "$domain:$port:$address" \
      "https://$domain:$port$path")" &
  done <<< "$paths"
  wait
}

env_value() { sed -n "s/^$1=//p" "$env_file" 2>/dev/null | tail -n 1; }
unquoted() {
  local v
  case "$1" in \"*\"|\'*\') v=${1#?}; v=${v%?};; *) v=$1;; esac
  printf '%s' "$v"
}

# The password reaches docker on its stdin (printf is a builtin: never in a
# process's argv, never in our output).
login() {
  local user password registry
  user=$(unquoted "$(env_value REGISTRY_USERNAME)")
  password=$(unquoted "$(env_value REGISTRY_PASSWORD)")
  if [ -z "$user" ] || [ -z "$password" ]; then return 0; fi
  while IFS= read -r registry; do
    [ -n "$registry" ] || continue
    if [ "$registry" = docker.io ]; then set --; else set -- "$registry"; fi
    if ! printf '%s' "$password" | docker login --username "$user" --password-stdin "$@" \
        >/dev/null 2>"$T/login"; then
      echo "== login-failed $registry: $(grep -v '^WARNING' "$T/login" | tail -n 1)"
      exit 3
    fi
  done <<< "$registries"
}

if [ "$mode" = gate ]; then
  echo '== containers'
  containers || true
  http
  exit 0
fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
compose config --hash '*' > "$T/hashes" & hashes=$!
# A container removed between ps and inspect (an interrupted deploy's): look again.
{ containers || { sleep 1; containers; }; } > "$T/containers" & listed=$!
# A failed job says what failed, after the others ended (they write into $T).
fail() { echo "$1" >&2; wait; exit 1; }
if [ -n "$domain" ]; then http > "$T/http" & fi
if [ "$mode" = pull ]; then
  login
  compose pull --quiet
fi
i=0
while IFS= read -r ref; do
  [ -n "$ref" ] || continue
  printf '%s %s\n' "$ref" "$(docker image inspect --format '{{.Id}}' "$ref" 2>/dev/null \
    || echo missing)" > "$T/image.$i" &
  i=$((i + 1))
done <<< "$refs"
wait "$hashes" || fail "docker compose config --hash failed"
wait "$listed" || fail "reading the containers (docker inspect) failed"
wait
echo '== hashes'; cat "$T/hashes"
echo '== images'; cat "$T"/image.*
echo '== containers'; cat "$T/containers"
if [ -n "$domain" ]; then cat "$T/http"; fi
