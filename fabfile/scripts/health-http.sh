#!/usr/bin/env bash
# health: the checks through nginx, all in ONE curl (--parallel), with SNI.
#   health-http.sh TIMEOUT PORT ADDRESS KEY HOST PATH [KEY HOST PATH...]
# Run by health-probes.sh ($T: its temporary directory). Each transfer opens its
# own connection (--parallel-immediate) with a full handshake (--no-sessionid: a
# resumed TLS session sends no certificate), so each reports the certificate it
# was served (curl >= 7.88 %{certs}; older curl: openssl afterwards). A
# certificate check requests /../ (PATH) with --path-as-is: nginx refuses it
# itself (400), no upstream is involved. --max-time is per transfer. Prints one
# "~~t FILE|CODE|SECONDS|EXIT|ERROR" line per transfer and its certificate's
# fields, then "@@body KEY" + the body of each HTTP check, and "@@openssl KEY"
# blocks when curl printed no certificate.
timeout=$1 port=$2 address=$3
shift 3
target=$address
case "$address" in *:*) target="[$address]";; esac
resolve=() transfers=() bodies=() certs=()
while [ $# -ge 3 ]; do
  key=$1 host=$2 path=$3
  shift 3
  case " ${resolve[*]} " in
    *" $host:$port:$target "*) ;;
    *) resolve+=("$host:$port:$target");;
  esac
  transfers+=(-o "$T/http.$key" "https://$host:$port$path")
  if [ "$path" = "/../" ]; then certs+=("$key" "$host"); else bodies+=("$key"); fi
done
args=(-s -k --no-sessionid --path-as-is --parallel --parallel-immediate --parallel-max 16
      --max-time "$timeout"
      # past the maintenance page (app.maintenance-on): the real site is checked
      -H 'X-Maicivy-Check: health')
for r in "${resolve[@]}"; do args+=(--resolve "$r"); done
# (a --write-out starting with "@" would name a file to read the format from)
args+=(-w '~~t %{filename_effective}|%{http_code}|%{time_total}|%{exitcode}|%{errormsg}\n%{certs}')
curl "${args[@]}" "${transfers[@]}" 2>/dev/null >"$T/http.curl"
grep -E '^(~~t |(Subject|Issuer|Serial Number|Expire date):)' "$T/http.curl"
for k in "${bodies[@]}"; do
  echo "@@body $k"; head -c 2000 "$T/http.$k" 2>/dev/null; echo
done
if [ ${#certs[@]} -gt 0 ] && ! grep -q '^Expire date:' "$T/http.curl"; then
  set -- "${certs[@]}"
  while [ $# -ge 2 ]; do  # curl older than 7.88 has no %{certs}
    echo "@@openssl $1"
    timeout "$timeout" openssl s_client -connect "$target:$port" -servername "$2" \
      </dev/null 2>/dev/null \
      | openssl x509 -noout -serial -issuer -subject -enddate -nameopt RFC2253
    rc=$?
    shift 2
  done
  exit "$rc"
fi
