#!/usr/bin/env bash
# Containers of the stack that deploy starts or questions.
#
#   containers.sh scale-up PROJECT ENV_FILE COMPOSE_FILE SERVICE COUNT TIMEOUT KNOWN
#   containers.sh diagnose PROJECT
#
# scale-up: start one more container of SERVICE (the new config) and wait for
# the *new* one's health only (KNOWN: the IDs that existed before, one a line;
# compose up --wait would also judge the old ones). Prints == new <id> <name>;
# exits 0 once it is healthy, non-zero with == status and its diagnosis if it
# turns unhealthy (4), exits (4) or is not healthy after TIMEOUT seconds (5).
# Created, not started: nginx finds the service through Docker's DNS, so the
# new container stays off nginx's network (PROJECT_edge) until it is healthy --
# a broken release never gets a request.
#
# diagnose: the diagnosis of every container of PROJECT that is not healthy.
#
# A diagnosis: == diag NAME, == exit STATE CODE OOMKILLED, == health-log (JSON),
# == logs (prefixed "| ", so that none is taken for a marker), == end-diag.
set -eu
command=$1 project=$2

diag() {
  echo "== diag $(docker inspect --format '{{.Name}}' "$1" 2>/dev/null)"
  echo "== exit $(docker inspect --format '{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}' \
    "$1" 2>/dev/null)"
  echo '== health-log'
  docker inspect --format '{{if .State.Health}}{{json .State.Health.Log}}{{end}}' "$1" \
    2>/dev/null || true
  echo '== logs'
  docker logs --tail 30 "$1" 2>&1 | sed 's/^/| /'
  echo '== end-diag'
}

status() {
  docker inspect --format \
    '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"
}

diagnose() {
  docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$project" |
    xargs -r docker inspect --format \
      '{{.Id}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' |
    while read -r id st h; do
      [ "$st $h" = "running healthy" ] || [ "$st $h" = "running none" ] || diag "$id"
    done
}

scale_up() {
  local env_file=$1 compose_file=$2 service=$3 count=$4 timeout=$5 known=$6
  local edge="${project}_edge" new="" id aliases st end
  docker compose --project-name "$project" --env-file "$env_file" -f "$compose_file" \
    up --no-start --no-deps --no-recreate --scale "$service=$count" "$service" 2>&1
  for id in $(docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$project" \
      --filter "label=com.docker.compose.service=$service"); do
    grep -qxF -- "$id" <<< "$known" || new=$id
  done
  [ -n "$new" ] || { echo '== status no new container'; exit 3; }
  echo "== new $new $(docker inspect --format '{{.Name}}' "$new" | sed 's,^/,,')"
  aliases=$(docker inspect --format \
    "{{with index .NetworkSettings.Networks \"$edge\"}}{{range .Aliases}}{{.}} {{end}}{{end}}" "$new")
  if [ -n "$aliases" ]; then docker network disconnect "$edge" "$new"; fi
  docker start "$new" >/dev/null
  end=$(( $(date +%s) + timeout ))
  while :; do
    st=$(status "$new")
    case "$st" in
      "running healthy"|"running none")
        join_edge "$edge" "$new" "$aliases"; echo "== status $st"; exit 0;;
      *unhealthy*|exited*|dead*) echo "== status $st"; diag "$new"; exit 4;;
    esac
    if [ "$(date +%s)" -ge "$end" ]; then
      echo "== status $st (timed out)"; diag "$new"; exit 5
    fi
    sleep 0.5
  done
}

# The healthy container joins nginx's network again, under its aliases.
join_edge() {
  local edge=$1 id=$2 aliases=$3 a
  [ -n "$aliases" ] || return 0
  set --
  for a in $aliases; do set -- "$@" --alias "$a"; done
  docker network connect "$@" "$edge" "$id"
}

case "$command" in
  scale-up) shift 2; scale_up "$@";;
  diagnose) diagnose;;
  *) echo "containers.sh: unknown command $command" >&2; exit 2;;
esac
