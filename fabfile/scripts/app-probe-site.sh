#!/usr/bin/env bash
# app.maintenance-on/off: the site and the backend's health as the public sees
# them, through nginx on the server.
#   app-probe-site.sh RESOLVE SITE_URL HEALTH_URL
# RESOLVE: curl's --resolve (NAME:PORT:ADDRESS). Prints "site CODE RETRY_AFTER"
# ("-" without one) and "health CODE".
resolve=$1 site=$2 health=$3
h=$(curl -sk -o /dev/null -D - --max-time 10 --resolve "$resolve" "$site" | tr -d '\r')
code=$(printf '%s\n' "$h" | sed -n '1s/^HTTP[^ ]* \([0-9]*\).*/\1/p')
retry=$(printf '%s\n' "$h" | sed -n 's/^[Rr]etry-[Aa]fter: *//p')
echo "site ${code:-000} ${retry:--}"
echo "health $(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 --resolve "$resolve" "$health")"
