#!/usr/bin/env bash
# A self-signed stand-in certificate for each name that has none yet: nginx
# cannot start without a certificate file; on first boot it stands in until
# certbot issues the real one (ssl.obtain).
#   stack-self-signed.sh DAYS CERTS_DIR NAME...
# Writes CERTS_DIR/NAME/{fullchain,privkey}.pem; prints "created NAME" for each
# one it made. Exits 1 at the first one it cannot make.
days=$1 certs=$2
shift 2
for name in "$@"; do
  d="$certs/$name"
  mkdir -p "$d" || exit 1
  if [ ! -s "$d/fullchain.pem" ] || [ ! -s "$d/privkey.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
      -subj "/CN=$name" -keyout "$d/privkey.pem.tmp" -out "$d/fullchain.pem.tmp" 2>/dev/null \
      && chmod 600 "$d/privkey.pem.tmp" && mv -f "$d/privkey.pem.tmp" "$d/privkey.pem" \
      && mv -f "$d/fullchain.pem.tmp" "$d/fullchain.pem" || exit 1
    echo "created $name"
  fi
done
