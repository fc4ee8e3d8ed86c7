#!/bin/sh
# monitoring.status, inside the prometheus container: its active targets, then
# "@@alerts" and its alerts (the API's JSON).
#   monitoring-status.sh PORT
base="http://127.0.0.1:$1/api/v1"
wget -q -O - "$base/targets?state=active" && echo && echo @@alerts &&
  wget -q -O - "$base/alerts"
