#!/usr/bin/env bash
# provision: the server's facts in one round trip. Read-only.
#   provision-facts.sh PACKAGE...
# Prints "== os" (ID VERSION_ID), "== pid1" (its command, "systemd-booted"),
# "== packages" (dpkg's "NAME STATUS" for each PACKAGE it knows), "== compose"
# (docker compose's version) and "== tools" (the commands found).
echo '== os'
# shellcheck disable=SC1091 # the server's own file
. /etc/os-release 2>/dev/null; echo "${ID:-unknown} ${VERSION_ID:-0}"
echo '== pid1'
cat /proc/1/comm 2>/dev/null; [ -d /run/systemd/system ] && echo systemd-booted
echo '== packages'
dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null
echo '== compose'
docker compose version --short 2>/dev/null
echo '== tools'
for t in ufw crontab systemctl python3 docker certbot; do
  command -v "$t" >/dev/null 2>&1 && echo "$t"
done
true
