#!/usr/bin/env bash
# doctor: every fact it judges, gathered in one read-only round trip.
#   doctor-facts.sh ROOT BACKUP_DIR ENV_FILE STATE_DIR CERTS_DIR REQUIRED KINDS HOLDER NAME...
# REQUIRED: the .env entries that must be set; KINDS: the backup kinds (both
# space-separated); HOLDER: a command printing who holds the stack lock;
# NAME...: the TLS names. Prints "@@key value" lines and @@section blocks.
export LC_ALL=C
root=$1 backup_dir=$2 env=$3 state=$4 certs=$5 holder=$8
read -ra required <<<"$6"
read -ra kinds <<<"$7"
shift 8
echo "@@now $(date +%s.%N)"
echo '@@df'
docker_root=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null)
paths=()
for p in "$docker_root" "$root" "$backup_dir"; do
  [ -n "$p" ] && [ -e "$p" ] && paths+=("$p")
done
for p in "${paths[@]}"; do echo "@@path $p"; done
df -P -k "${paths[@]}" 2>/dev/null | tail -n +2
echo '@@inodes'
df -P -i "${paths[@]}" 2>/dev/null | tail -n +2
echo '@@mem'
grep -E '^(MemTotal|MemAvailable):' /proc/meminfo
echo "@@docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo "@@compose $(docker compose version --short 2>/dev/null)"
echo "@@ntp $(timedatectl show -p NTPSynchronized --value 2>/dev/null)"
echo "@@addresses $(hostname -I 2>/dev/null)"
for n in "$@"; do
  echo "@@dns $n $(timeout 5 getent ahosts "$n" 2>/dev/null | awk '{print $1}' | sort -u \
    | tr '\n' ' ')"
done
echo '@@ports'
docker ps --format '{{.Names}}|{{.Label "com.docker.compose.project"}}|{{.Label "com.docker.compose.service"}}|{{.Ports}}' 2>/dev/null
echo "@@ufw $(ufw status 2>/dev/null | head -n 1)"
for n in "$@"; do
  echo "@@cert $n"
  [ -f "$certs/$n/fullchain.pem" ] && openssl x509 -in "$certs/$n/fullchain.pem" -noout \
    -serial -issuer -subject -enddate -nameopt RFC2253 2>&1
done
for kind in "${kinds[@]}"; do
  # shellcheck disable=SC2012 # newest first; our own file names
  m=$(ls -1t "$backup_dir/$kind"/*.json 2>/dev/null | head -n 1)
  if [ -n "$m" ]; then
    echo "@@backup $kind $(stat -c %Y "$m") $(grep -c '"offsite"' "$m") $m"
  else
    echo "@@backup $kind none"
  fi
done
if [ -f "$env" ]; then
  echo "@@env $(stat -c '%a %U' "$env")"
  for n in "${required[@]}"; do
    v=$(grep -m1 "^$n=" "$env") || { echo "@@unset $n"; continue; }
    v=${v#*=}; v=${v%\"}; v=${v#\"}
    case "$v" in ''|CHANGE_ME) echo "@@unset $n";; esac
  done
else
  echo '@@env missing'
fi
( bash -c "$holder" ) 2>/dev/null | head -c 2000 | tr -cd '[:print:]\n' | sed 's/^/@@holder /'
if [ -e "$state/lock.owner" ]; then
  echo "@@ownerfile $(stat -c %Y "$state/lock.owner") $(head -c 300 "$state/lock.owner" \
    | head -n 1 | tr -cd '[:print:]')"
fi
echo '@@journal'
tail -n 300 "$state/journal" 2>/dev/null
true
