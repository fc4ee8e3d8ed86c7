#!/usr/bin/env bash
# monitoring.test-alert: Prometheus' alerts, then "@@logs" and Alertmanager's
# log since SINCE, in one round trip.
#   monitoring-test-alert-probe.sh PROMETHEUS_PORT SINCE COMPOSE...
# COMPOSE...: the stack's docker compose command.
port=$1 since=$2
shift 2
"$@" exec -T prometheus wget -q -O - "http://127.0.0.1:$port/api/v1/alerts"
echo
echo @@logs
"$@" logs --no-color --since "$since" alertmanager 2>&1
