#!/usr/bin/env bash
# ssl.status / health: the certificate nginx serves for each name (TLS
# handshake with SNI) and the file it loads, framed for the parser:
#   ssl-certs.sh TIMEOUT TARGET CERTS_DIR NAME...
# prints "@@now <unix time>", then for each NAME "@@cert NAME served" and
# "@@cert NAME file", each followed by openssl x509's fields (or its error).
# Read-only; always exits 0.
timeout=$1 target=$2 certs=$3
shift 3
fields() { openssl x509 -noout -serial -issuer -subject -enddate -nameopt RFC2253 "$@"; }
echo "@@now $(date +%s)"
for name in "$@"; do
  echo "@@cert $name served"
  timeout "$timeout" openssl s_client -connect "$target" -servername "$name" \
    </dev/null 2>/dev/null | fields 2>&1
  echo "@@cert $name file"
  fields -in "$certs/$name/fullchain.pem" 2>&1
done
true
