#!/bin/sh
# monitoring.push, inside the grafana container: reload Grafana's provisioning
# (datasources, dashboards). The admin password stays in the container: it goes
# to curl on stdin (-K -), never in an argument.
#   monitoring-grafana-reload.sh PORT
# Prints "KIND HTTP_CODE" for each; exits 1 unless both answered 200.
set -u
port=$1
esc() { printf '%s' "$1" | sed 's/[\\"]/\\&/g'; }
rc=0
for kind in datasources dashboards; do
  code=$(printf 'user = "%s:%s"\n' "$(esc "${GF_SECURITY_ADMIN_USER:-admin}")" \
           "$(esc "${GF_SECURITY_ADMIN_PASSWORD:-}")" \
         | curl -sS -K - -X POST -o /dev/null -w '%{http_code}' --max-time 30 \
           "http://127.0.0.1:$port/api/admin/provisioning/$kind/reload") || code="curl failed"
  echo "$kind $code"
  [ "$code" = 200 ] || rc=1
done
exit $rc
