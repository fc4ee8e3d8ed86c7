#!/usr/bin/env bash
# What the running services see and loaded, for the health gate's proof.
#
#   proof.sh ROOT PROJECT NGINX_URL PROMETHEUS_URL RELS [MOUNTS...]
#
# == host: the sha256 of each of RELS (managed files relative to ROOT, one a
# line) on the host. Then for each MOUNTS argument ("SERVICE" then the paths
# inside its container, one a line) and each running container of SERVICE:
# == seen.SERVICE (the sha256 of those paths inside it); nginx: == nginx-config-id
# (what it serves at NGINX_URL, when set); prometheus: == prometheus-ctime (the
# files' change times) and == prometheus-reload (its reload metrics at
# PROMETHEUS_URL).
set -u
root=$1 project=$2 nginx_url=$3 prometheus_url=$4 rels=$5
shift 5

echo '== host'
if [ -n "$rels" ]; then
  mapfile -t files <<< "$rels"
  (cd "$root" && sha256sum -- "${files[@]}") 2>&1
fi
for mount in "$@"; do
  mapfile -t paths <<< "$mount"
  service=${paths[0]}
  paths=("${paths[@]:1}")
  for c in $(docker ps -q --filter "label=com.docker.compose.project=$project" \
      --filter "label=com.docker.compose.service=$service" --filter status=running); do
    echo "== seen.$service"
    docker exec "$c" sha256sum -- "${paths[@]}" 2>&1
    if [ "$service" = nginx ] && [ -n "$nginx_url" ]; then
      echo '== nginx-config-id'
      docker exec "$c" wget -qO- -T 5 "$nginx_url" 2>&1
    fi
    if [ "$service" = prometheus ]; then
      echo '== prometheus-ctime'
      docker exec "$c" stat -c '%Z %n' -- "${paths[@]}" 2>&1
      echo '== prometheus-reload'
      docker exec "$c" wget -qO- -T 5 "$prometheus_url" 2>&1 \
        | grep -E '^prometheus_config_last_reload_success'
    fi
  done
done
exit 0
