#!/usr/bin/env bash
# Installed by maicivy-ops (ssl.obtain / ssl.renew) as {root}/ssl/deploy-hook.sh;
# rewritten on every run. certbot runs it after it obtained or renewed a
# certificate, with RENEWED_LINEAGE=<config dir>/live/<name>, as
#   deploy-hook.sh [CERTS_DIR PROJECT ENV_FILE COMPOSE_FILE NAME...]
# (CERTS_DIR: where nginx reads <name>/; PROJECT, ENV_FILE, COMPOSE_FILE: the
# stack's docker compose; NAME...: the certificates of this stack). Without
# arguments (how certbot runs it: its stored renewal configurations name the
# hook's path only) it reads them, one per line, from deploy-hook.values
# beside it, which maicivy-ops writes with the hook.
# It copies the new certificate into the directory nginx reads, checks nginx's
# configuration and reloads nginx (no restart). If nginx rejects the new files,
# the previous ones are restored.
set -euo pipefail
values="$(dirname "$0")/deploy-hook.values"
if [ $# -eq 0 ] && [ -r "$values" ]; then
  mapfile -t stored < "$values"
  set -- "${stored[@]}"
fi
if [ $# -lt 4 ]; then
  echo "maicivy deploy hook: cannot read the stack's values from $values;" \
       "run ssl.renew, which rewrites them and installs the certificate for nginx" >&2
  exit 1
fi
certs=$1 project=$2 env_file=$3 compose_file=$4
shift 4
lineage="${RENEWED_LINEAGE:?this hook is run by certbot, with RENEWED_LINEAGE set}"
name="$(basename "$lineage")"
compose() {
  docker compose --project-name "$project" --env-file "$env_file" -f "$compose_file" "$@"
}
known=0
for n in "$@"; do [ "$n" = "$name" ] && known=1; done
if [ "$known" != 1 ]; then
  echo "maicivy deploy hook: $name is not a certificate of this stack; left alone"
  exit 0
fi
dest="$certs/$name"
umask 077
mkdir -p "$dest"
cert_key="$(openssl x509 -in "$lineage/fullchain.pem" -noout -pubkey | sha256sum)"
key_key="$(openssl pkey -in "$lineage/privkey.pem" -pubout | sha256sum)"
if [ "$cert_key" != "$key_key" ]; then
  echo "maicivy deploy hook: $lineage: certificate and key do not match; nothing installed" >&2
  exit 1
fi
install -m 644 "$lineage/fullchain.pem" "$dest/.fullchain.pem.new"
install -m 600 "$lineage/privkey.pem" "$dest/.privkey.pem.new"
for f in fullchain.pem privkey.pem; do
  if [ -e "$dest/$f" ]; then cp -p "$dest/$f" "$dest/.$f.prev"; fi
done
mv -f "$dest/.privkey.pem.new" "$dest/privkey.pem"
mv -f "$dest/.fullchain.pem.new" "$dest/fullchain.pem"
if ! compose ps --status running --services 2>/dev/null | grep -x nginx >/dev/null; then
  rm -f "$dest/.fullchain.pem.prev" "$dest/.privkey.pem.prev"
  echo "maicivy deploy hook: installed $name; nginx is not running, it will use it when it starts"
  exit 0
fi
if ! compose exec -T nginx nginx -t -q; then
  for f in fullchain.pem privkey.pem; do
    if [ -e "$dest/.$f.prev" ]; then mv -f "$dest/.$f.prev" "$dest/$f"; fi
  done
  echo "maicivy deploy hook: nginx rejects the new $name certificate; previous one restored" >&2
  exit 1
fi
compose exec -T nginx nginx -s reload
rm -f "$dest/.fullchain.pem.prev" "$dest/.privkey.pem.prev"
echo "maicivy deploy hook: installed $name and reloaded nginx"
