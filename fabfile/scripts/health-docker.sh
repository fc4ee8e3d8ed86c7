#!/usr/bin/env bash
# health: docker ps + ONE docker inspect of the stack, then Prometheus readiness
# and df, side by side.
#   health-docker.sh PROJECT PARTS TIMEOUT PROMETHEUS_URL PATH...
# PARTS: which of "services prometheus disk" to report (space-separated);
# PATH...: the stack's and the backups' directories (the data volume is found).
# Run by health-probes.sh ($T: its temporary directory). Prints "== services"
# (one "@@c SERVICE|STATE|HEALTH|EXIT|PID|ID|VOLUME" line per container),
# "== prometheus" (its answer, then "@@rc N") and "== disk" (@@path lines,
# "@@docker ROOT", then "@@df" and df's table).
# The docker CLI, not compose: compose parses the whole project first and costs
# ten times as much CPU. Prometheus is not published: as root we nsenter its
# network namespace and use the server's curl (a few ms), otherwise docker exec
# its wget.
project=$1 parts=" $2 " timeout=$3 url=$4
shift 4
paths=("$@")
format='@@c {{index .Config.Labels "com.docker.compose.service"}}|{{.State.Status}}|'
format+='{{if .State.Health}}{{.State.Health.Status}}{{end}}|{{.State.ExitCode}}|'
format+='{{.State.Pid}}|{{.Id}}|{{range .Mounts}}'
format+='{{if eq .Destination "/var/lib/postgresql/data"}}{{.Source}}{{end}}{{end}}'
ids=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter label=com.docker.compose.oneoff=False)
info=''
# shellcheck disable=SC2086 # one word per container id
if [ -n "$ids" ]; then info=$(docker inspect --format "$format" $ids 2>/dev/null); fi
prom_pid=''; prom_id=''; volume=''
while IFS='|' read -r svc state _ _ pid id vol; do
  if [ "$svc" = '@@c prometheus' ] && [ "$state" = running ]; then
    prom_pid=$pid; prom_id=$id; fi
  if [ -n "$vol" ]; then volume=$vol; fi
done <<<"$info"
case $parts in *" services "*)
  echo '== services'; printf '%s\n' "$info";;
esac
case $parts in *" prometheus "*)
  ( echo '== prometheus'
    if [ -z "$prom_id" ]; then echo 'no running prometheus container'; rc=1
    elif [ "$EUID" = 0 ] && [ "${prom_pid:-0}" -gt 0 ] && command -v nsenter >/dev/null; then
      nsenter -t "$prom_pid" -n curl -sS -f --max-time "$timeout" "$url" 2>&1; rc=$?
    else docker exec "$prom_id" wget -q -O - "$url" 2>&1; rc=$?; fi
    echo "@@rc $rc" ) >"$T/docker.prometheus" &
esac
case $parts in *" disk "*)
  ( echo '== disk'
    root=${volume:-$(docker info --format '{{.DockerRootDir}}' 2>/dev/null)}
    set --
    for p in "$root" "${paths[@]}"; do
      if [ -n "$p" ] && [ -e "$p" ]; then
        echo "@@path $p"; set -- "$@" "$p"; fi
    done; echo "@@docker $root"; echo @@df; df -P -k "$@" 2>&1
  ) >"$T/docker.disk" &
esac
wait
for part in prometheus disk; do
  case $parts in *" $part "*) cat "$T/docker.$part";; esac
done
