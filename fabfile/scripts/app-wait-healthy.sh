#!/usr/bin/env bash
# app.restart: wait until a service's running container is healthy (or has no
# health check).
#   app-wait-healthy.sh TIMEOUT SERVICE COMPOSE...
# COMPOSE...: the stack's docker compose command. Prints "== status STATE HEALTH"
# and exits 0 (healthy), 4 (unhealthy, exited, dead) or 5 (timed out).
timeout=$1 service=$2
shift 2
end=$(( $(date +%s) + timeout ))
while :; do
  id=$("$@" ps -q "$service" | head -n 1)
  st=$( [ -n "$id" ] && docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" || echo 'no container')
  case "$st" in
    "running healthy"|"running none") echo "== status $st"; exit 0;;
    *unhealthy*|exited*|dead*) echo "== status $st"; exit 4;;
  esac
  [ "$(date +%s)" -ge "$end" ] && { echo "== status $st (timed out)"; exit 5; }
  sleep 0.5
done
