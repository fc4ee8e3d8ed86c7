#!/usr/bin/env bash
# Let nginx see the new container, retire the old ones, then reload again.
#
#   swap.sh PROJECT ENV_FILE COMPOSE_FILE GRACE SICK FINE
#
# nginx asks Docker's DNS for the service at request time (cached 5 s); a
# reload empties that cache: first it sees old + new, so that requests keep
# flowing while the old containers (FINE: IDs separated by spaces) drain and
# stop (GRACE seconds); as soon as they have stopped, the new one only. Old
# containers that are not healthy (SICK: a failed release being rolled back)
# are removed *before* that first reload.
set -eu
project=$1 env_file=$2 compose_file=$3 grace=$4
read -r -a sick <<< "$5"
read -r -a fine <<< "$6"

N=$(docker compose --project-name "$project" --env-file "$env_file" -f "$compose_file" ps -q nginx)
reload() { docker exec "$N" nginx -t -q && docker exec "$N" nginx -s reload; }

if [ "${#sick[@]}" -gt 0 ]; then docker rm -f "${sick[@]}" >/dev/null; fi
reload
if [ "${#fine[@]}" -gt 0 ]; then
  sleep 1
  docker stop -t "$grace" "${fine[@]}" >/dev/null
  reload
  docker rm -f "${fine[@]}" >/dev/null
fi
