#!/bin/sh
# monitoring.push, inside the alertmanager container: fill in the secrets again
# (entrypoint.sh reload), SIGHUP, and prove the new configuration loaded.
#   monitoring-alertmanager-reload.sh PORT
sh /etc/alertmanager/entrypoint.sh reload && sleep 1 &&
  wget -q -O - "http://127.0.0.1:$1/metrics" \
  | grep -qx 'alertmanager_config_last_reload_successful 1'
