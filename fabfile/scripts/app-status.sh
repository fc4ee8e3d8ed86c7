#!/usr/bin/env bash
# app.status: the stack's containers, their images' digests, the release, the
# lock holder and the maintenance flag, in one read-only round trip.
#   app-status.sh PROJECT STATE_DIR FLAG HOLDER
# HOLDER: a command printing who holds the stack lock ("== ..." lines).
# Prints "@@now", one "@@c SERVICE|NAME|STATE|HEALTH|IMAGE|IMAGE_ID|STARTED|
# RESTARTS|EXIT|PORTS" line per container, "@@i IMAGE_ID|DIGEST,..." per image,
# "@@release", "@@lock ..." and "@@maintenance NOTE" (when the flag is up).
project=$1 state=$2 flag=$3 holder=$4
format='@@c {{index .Config.Labels "com.docker.compose.service"}}|{{.Name}}|{{.State.Status}}|'
format+='{{if .State.Health}}{{.State.Health.Status}}{{end}}|{{.Config.Image}}|{{.Image}}|'
format+='{{.State.StartedAt}}|{{.RestartCount}}|{{.State.ExitCode}}|'
format+='{{range $p, $c := .NetworkSettings.Ports}}{{range $c}}{{.HostIp}}:{{.HostPort}}->{{$p}} '
format+='{{end}}{{end}}'
echo "@@now $(date +%s)"
ids=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter label=com.docker.compose.oneoff=False)
if [ -n "$ids" ]; then
  # shellcheck disable=SC2086 # one word per container id
  docker inspect --format "$format" $ids
  # shellcheck disable=SC2086
  for i in $(docker inspect --format '{{.Image}}' $ids | sort -u); do
    docker image inspect --format '@@i {{.Id}}|{{range .RepoDigests}}{{.}},{{end}}' "$i"
  done
fi
echo "@@release $(cat "$state/current" 2>/dev/null)"
( bash -c "$holder" ) 2>/dev/null | head -c 2000 | tr -cd '[:print:]\n' | sed 's/^/@@lock /'
if [ -e "$flag" ]; then
  echo "@@maintenance $(head -c 200 "$flag" | head -n 1 | tr -cd '[:print:]')"
fi
true
