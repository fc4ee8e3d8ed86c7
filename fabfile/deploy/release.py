"""Releases on the server: the pure half of ``deploy`` (no I/O here).

Everything deploy keeps on the server lives under ``{root}/.deploy``::

    lock                   flock(1) target; held by one long-lived SSH command
    lock.owner             who holds it, since when (informational)
    pre/files.tar          the managed files as they were before this deploy
    releases/<id>/files.tar, images    one directory per successful deploy
    current                id of the release that is live
    deploy.log             one line per deploy / rollback

A release's ``images`` file holds ``service ref image-id`` lines. Its image
IDs are also tagged ``<project>-release/<service>:<id>`` so that
``docker image prune`` keeps them until the release itself is pruned.

The functions below build shell scripts and parse their output; ``deploy.py``
runs them through :class:`~fabfile.host.Host`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..audit import IDENTITY_SH, log_line_with_identity
from ..config import SERVICES, Settings
from ..shell import sections
from ..stack import compose

# Services replaced with a second container beside the old one.
ROLLING = ("backend", "frontend")
_RELEASE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$")


def state_dir(settings: Settings) -> str:
    return f"{settings.root}/.deploy"


def relative(settings: Settings, paths: Iterable[str]) -> list[str]:
    """Paths under the stack root, relative to it (for tar -C root)."""
    root = settings.root + "/"
    return sorted(p[len(root):] for p in paths if p.startswith(root))


def release_tag(settings: Settings, service: str, release: str) -> str:
    """The tag that keeps a release's image from being pruned."""
    return f"{settings.compose_project}-release/{service}:{release}"


def image_refs(settings: Settings) -> dict[str, str]:
    """{service: image reference} as the rendered compose file names them."""
    return {s: settings.image(s) for s in SERVICES}


# --- what deploy reads when it takes the lock -----------------------------------------

# Attempts whose snapshot is kept (besides the one a deploy rolls back to).
KEEP_ATTEMPTS = 5


def deploy_report_script(settings: Settings, managed: Iterable[str]) -> str:
    """Run by the stack lock's holder once the lock is ours (``$D``, ``$T`` are set).

    Snapshots the managed files for this attempt's rollback
    (``attempts/<id>/files.tar``) -- unless the previous deploy was interrupted
    (``$D/attempt`` still names its attempt): then its snapshot, taken before it
    changed anything, stays the rollback target (``== base <id> interrupted``),
    so an interrupted deploy never replaces the last good state. Then the
    hashes, the current release and the names of unset .env secrets.
    """
    root = shlex.quote(settings.root)
    rels = relative(settings, managed)
    quoted = " ".join(shlex.quote(r) for r in rels)
    return "\n".join([
        f"R={root}",
        'cd "$R" || exit 1',
        'B=$(cat "$D/attempt" 2>/dev/null)',
        'if [ -n "$B" ] && [ -f "$D/attempts/$B/files.tar" ]; then',
        '  echo "== base $B interrupted"',
        '  [ -f "$D/attempts/$B/images" ] && '
        '{ echo "== base-images"; cat "$D/attempts/$B/images"; }',
        "else",
        '  B=$(date -u +%Y%m%dT%H%M%SZ)-$(printf %.8s "$T")',
        f"  set -- ; for f in {quoted}; do [ -f \"$f\" ] && set -- \"$@\" \"$f\"; done",
        '  mkdir -p "$D/attempts/$B" && tar cf "$D/attempts/$B/files.tar" -T /dev/null -- "$@" '
        "|| exit 1",
        '  echo "$B" > "$D/attempt.tmp" && mv -f "$D/attempt.tmp" "$D/attempt"',
        '  echo "== base $B"',
        f'  ls -1 "$D/attempts" | sort | head -n -{KEEP_ATTEMPTS} | while read -r a; do '
        '[ "$a" = "$B" ] || rm -rf -- "$D/attempts/$a"; done',
        "fi",
        'rm -rf "$D/pre"',  # the single snapshot of former versions
        *_state_lines(settings, quoted, snapshot=False),
    ])


def attempt_dir(settings: Settings, attempt: str) -> str:
    return f"{state_dir(settings)}/attempts/{attempt}"


def save_images_cmd(settings: Settings, attempt: str,
                    images: Mapping[str, tuple[str, str]]) -> str:
    """Record the images that ran before this attempt changed anything."""
    path = shlex.quote(f"{attempt_dir(settings, attempt)}/images")
    return f"printf '%s' {shlex.quote(images_text(images))} > {path}"


def end_attempt_cmd(settings: Settings) -> str:
    """The attempt ended in a known state: the next deploy snapshots afresh."""
    return f"rm -f {shlex.quote(state_dir(settings) + '/attempt')}"


def probe_script(settings: Settings, managed: Iterable[str]) -> str:
    """What the deploy lock reports, read-only, without the lock (for --dry-run)."""
    d = shlex.quote(state_dir(settings))
    root = shlex.quote(settings.root)
    quoted = " ".join(shlex.quote(r) for r in relative(settings, managed))
    return "\n".join([
        f"D={d}; R={root}",
        'if [ -e "$D/lock" ] && ! flock -n "$D/lock" true; then',
        "  echo '== busy'; cat \"$D/lock.owner\" 2>/dev/null",
        "fi",
        *_state_lines(settings, quoted, snapshot=False),
        "echo '== ready'",
    ])


def _state_lines(settings: Settings, quoted_rels: str, snapshot: bool) -> list[str]:
    env = shlex.quote(settings.env_file)
    lines = []
    if snapshot:
        # Only the managed files that exist: tar fails on missing names.
        lines += [
            "cd \"$R\" 2>/dev/null && {",
            f"  set -- ; for f in {quoted_rels}; do [ -f \"$f\" ] && set -- \"$@\" \"$f\"; done",
            '  rm -f "$D/pre/files.tar"; tar cf "$D/pre/files.tar" -T /dev/null -- "$@" || exit 1',
            "}",
        ]
    lines += [
        "echo '== hashes'",
        f"cd \"$R\" 2>/dev/null && for f in {quoted_rels}; do "
        "[ -f \"$f\" ] && sha256sum -- \"$f\"; done",
        "echo '== current'",
        'cat "$D/current" 2>/dev/null',
        "echo '== releases'",
        'ls -1 "$D/releases" 2>/dev/null',
        # Names (never values) of .env entries that are empty or CHANGE_ME.
        "echo '== unset'",
        f"[ -f {env} ] && sed -n -E 's/^(POSTGRES_PASSWORD|REDIS_PASSWORD|"
        f"GF_SECURITY_ADMIN_PASSWORD|POSTGRES_USER|POSTGRES_DB)=(CHANGE_ME)?$/\\1/p' {env}",
        f"[ -f {env} ] || echo '.env'",
        "true",
    ]
    return lines


@dataclass
class ServerState:
    """What the lock/probe command reported."""

    busy: str | None = None  # holder line when another deploy holds the lock
    hashes: dict[str, str] = field(default_factory=dict)  # rel path -> sha256
    current: str = ""
    releases: list[str] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)
    base: str = ""  # the attempt whose snapshot a failed deploy returns to
    base_interrupted: bool = False
    base_images: dict[str, tuple[str, str]] = field(default_factory=dict)


def parse_state(text: str) -> ServerState:
    sec = sections(text)
    state = ServerState()
    if "busy" in sec:
        busy = re.sub(r" pid \d+( \d+)?$", "", " ".join(sec["busy"]).strip())
        state.busy = busy or "another deploy (owner unknown)"
    for line in sec.get("hashes", []):
        digest, _, name = line.partition("  ")
        if name:
            state.hashes[name] = digest
    cur = sec.get("current", [])
    state.current = cur[0].strip() if cur else ""
    state.releases = sorted(r.strip() for r in sec.get("releases", [])
                            if _RELEASE_ID.match(r.strip()))
    state.unset = sorted(set(sec.get("unset", [])))
    base = " ".join(sec.get("base", [])).split()
    if base:
        state.base = base[0]
        state.base_interrupted = base[1:] == ["interrupted"]
    state.base_images = parse_images("\n".join(sec.get("base-images", [])))
    return state


# --- the plan: what converging to the wanted state takes ------------------------


_INSPECT = ("{{.Id}}|{{.Name}}|{{index .Config.Labels \"com.docker.compose.service\"}}|"
            "{{index .Config.Labels \"com.docker.compose.config-hash\"}}|{{.Image}}|"
            "{{.Config.Image}}|{{.State.Status}}|{{if .State.Health}}{{.State.Health.Status}}"
            "{{end}}|{{.Created}}")


def inspect_containers_cmd(settings: Settings) -> str:
    """One line per container of the project (id|name|service|hash|image|ref|state|health)."""
    label = shlex.quote(f"label=com.docker.compose.project={settings.compose_project}")
    return (f"docker ps -aq --no-trunc --filter {label} | "
            f"xargs -r docker inspect --format {shlex.quote(_INSPECT)}")


def plan_script(settings: Settings, refs: Mapping[str, str], pull: bool,
                http: bool = False) -> str:
    """(Pull, then) report wanted config hashes, image IDs and the containers.

    With ``http``, also the health URLs through nginx: when nothing needs to
    change, this one command is the health gate too. What does not depend on
    the pull runs while it pulls.
    """
    lines = [
        "set -e",
        'T=$(mktemp -d); trap \'rm -rf "$T"\' EXIT',
        f"{compose(settings, 'config', '--hash', '*')} > \"$T/hashes\" & hashes=$!",
        # A container removed between ps and inspect (an interrupted deploy's): look again.
        f"{{ {inspect_containers_cmd(settings)} || {{ sleep 1; "
        f"{inspect_containers_cmd(settings)}; }}; }} > \"$T/containers\" & containers=$!",
        # A failed job says what failed, after the others ended (they write into $T).
        'fail() { echo "$1" >&2; wait; exit 1; }',
    ]
    if http:
        lines.append("{ " + "\n".join(http_lines(settings)) + "\n} > \"$T/http\" & http=$!")
    if pull:
        lines += login_lines(settings, [settings.image(s) for s in ROLLING])
        lines.append(compose(settings, "pull", "--quiet"))
    for i, ref in enumerate(sorted(set(refs.values()))):
        q = shlex.quote(ref)
        lines.append(f"printf '%s %s\\n' {q} \"$(docker image inspect --format '{{{{.Id}}}}' "
                     f"{q} 2>/dev/null || echo missing)\" > \"$T/image.{i}\" &")
    lines += [
        'wait "$hashes" || fail "docker compose config --hash failed"',
        'wait "$containers" || fail "reading the containers (docker inspect) failed"',
        "wait",
        "echo '== hashes'; cat \"$T/hashes\"",
        "echo '== images'; cat \"$T\"/image.*",
        "echo '== containers'; cat \"$T/containers\"",
    ]
    if http:
        lines.append('cat "$T/http"')
    return "\n".join(lines)


def registry_host(ref: str) -> str:
    """The registry an image reference is pulled from ("" for Docker Hub)."""
    first, sep, _rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return ""


def login_lines(settings: Settings, refs: Iterable[str]) -> list[str]:
    """``docker login`` to the app images' registries when .env has credentials.

    REGISTRY_USERNAME / REGISTRY_PASSWORD are read from the server's .env by the
    shell; the password reaches docker on its stdin (printf is a builtin: never
    in a process's argv, never in our output). A refused login prints
    ``== login-failed REGISTRY: reason`` and stops (exit 3).
    """
    hosts = sorted({registry_host(r) for r in refs})
    env = shlex.quote(settings.env_file)
    unquote = 'case "$1" in \\"*\\"|\\\'*\\\') v=${1#?}; v=${v%?};; *) v=$1;; esac'
    lines = [
        f"_env() {{ sed -n \"s/^$1=//p\" {env} 2>/dev/null | tail -n 1; }}",
        f"_unq() {{ {unquote}; printf '%s' \"$v\"; }}",
        'RU=$(_unq "$(_env REGISTRY_USERNAME)"); RP=$(_unq "$(_env REGISTRY_PASSWORD)")',
        'if [ -n "$RU" ] && [ -n "$RP" ]; then',
    ]
    for h in hosts:
        where = shlex.quote(h) if h else ""
        label = shlex.quote(h or "docker.io")
        lines += [
            f"  if ! printf '%s' \"$RP\" | docker login --username \"$RU\" --password-stdin "
            f"{where} >/dev/null 2>\"$T/login\"; then",
            f"    echo \"== login-failed {label}: $(grep -v '^WARNING' \"$T/login\" | tail -n 1)\"",
            "    exit 3",
            "  fi",
        ]
    lines += ["fi", "unset RP"]
    return lines


@dataclass
class Container:
    id: str
    name: str
    service: str
    config_hash: str
    image_id: str
    ref: str
    state: str
    health: str
    created: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def short(self) -> str:
        return self.name.lstrip("/")


def parse_containers(lines: Iterable[str]) -> list[Container]:
    out = []
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) != 9:
            continue
        out.append(Container(*parts))
    return out


@dataclass
class Plan:
    """Which services need work to reach the wanted hashes and images."""

    wanted_hash: dict[str, str]
    wanted_image: dict[str, str]  # service -> image id (or "missing")
    refs: dict[str, str]
    containers: list[Container]
    rolling: list[str] = field(default_factory=list)  # replace beside the old one
    recreate: list[str] = field(default_factory=list)  # plain compose up

    def of(self, service: str) -> list[Container]:
        return [c for c in self.containers if c.service == service]

    def is_current(self, c: Container) -> bool:
        return (c.config_hash == self.wanted_hash.get(c.service)
                and c.image_id == self.wanted_image.get(c.service) and c.running)

    def good(self, service: str) -> list[Container]:
        return [c for c in self.of(service) if self.is_current(c)]

    def stale(self, service: str) -> list[Container]:
        return [c for c in self.of(service) if not self.is_current(c)]

    def ok(self, service: str) -> bool:
        return len(self.of(service)) == 1 and len(self.good(service)) == 1

    @property
    def unchanged(self) -> bool:
        return not self.rolling and not self.recreate

    def running_images(self) -> dict[str, tuple[str, str]]:
        """{service: (ref, image id)} of what runs now (the rollback target)."""
        out: dict[str, tuple[str, str]] = {}
        for c in sorted(self.containers, key=lambda c: c.created):
            if c.running and c.service:
                out.setdefault(c.service, (c.ref, c.image_id))
        return out


def parse_plan(text: str, refs: Mapping[str, str], nginx: str = "nginx") -> Plan:
    sec = sections(text)
    wanted_hash = {}
    for line in sec.get("hashes", []):
        name, _, digest = line.strip().partition(" ")
        if digest:
            wanted_hash[name] = digest.strip()
    ids = {}
    for line in sec.get("images", []):
        ref, _, image_id = line.strip().rpartition(" ")
        ids[ref] = image_id
    wanted_image = {s: ids.get(r, "missing") for s, r in refs.items()}
    plan = Plan(wanted_hash, wanted_image, dict(refs),
                parse_containers(sec.get("containers", [])))
    missing = sorted(s for s, i in wanted_image.items() if i == "missing")
    if missing:
        from ..errors import OpsError

        raise OpsError(f"image of {', '.join(missing)} is not on the server after the pull "
                       f"({', '.join(refs[s] for s in missing)}); check the image names and "
                       "the registry")
    nginx_up = any(c.running for c in plan.of(nginx))
    for service in SERVICES:
        if plan.ok(service):
            continue
        # A rolling replace needs something serving now and nginx in front.
        if service in ROLLING and nginx_up and any(c.running for c in plan.of(service)):
            plan.rolling.append(service)
        else:
            plan.recreate.append(service)
    return plan


# --- converging -------------------------------------------------------------------


def diag_function() -> str:
    """Bash ``diag ID``: what a failed container tells (exit code, OOM, health log, logs).

    Log lines are prefixed with ``| `` so that none is taken for a ``== `` marker.
    """
    return "\n".join([
        "diag() {",
        "  echo \"== diag $(docker inspect --format '{{.Name}}' \"$1\" 2>/dev/null)\"",
        "  echo \"== exit $(docker inspect --format '{{.State.Status}} {{.State.ExitCode}} "
        "{{.State.OOMKilled}}' \"$1\" 2>/dev/null)\"",
        "  echo '== health-log'",
        "  docker inspect --format '{{if .State.Health}}{{json .State.Health.Log}}{{end}}' "
        "\"$1\" 2>/dev/null || true",
        "  echo '== logs'",
        "  docker logs --tail 30 \"$1\" 2>&1 | sed 's/^/| /'",
        "  echo '== end-diag'",
        "}",
    ])


def scale_up_cmd(settings: Settings, service: str, count: int, timeout: int,
                 known: Iterable[str] = ()) -> str:
    """Start one more container of ``service`` (the new config) and wait for its health.

    Waits for the *new* container only (``known`` are the IDs that existed
    before): ``compose up --wait`` would also judge the old ones. Prints
    ``== new <id> <name>``; exits 0 once it is healthy, non-zero with ``== status``
    and the container's diagnosis (:func:`diag_function`) if it turns
    unhealthy, exits or is not healthy after ``timeout`` seconds.
    """
    label = shlex.quote(f"label=com.docker.compose.project={settings.compose_project}")
    svc = shlex.quote(f"label=com.docker.compose.service={service}")
    known_ids = " ".join(known)
    # Created, not started: nginx finds the service through Docker's DNS (resolver,
    # names re-resolved every few seconds), so the new container stays off nginx's
    # network (edge) until it is healthy -- a broken release never gets a request.
    up = compose(settings, "up", "--no-start", "--no-deps", "--no-recreate", "--scale",
                 f"{service}={count}", service)
    edge = shlex.quote(f"{settings.compose_project}_edge")
    aliases = ("{{with index .NetworkSettings.Networks \"" + f"{settings.compose_project}_edge"
               + "\"}}{{range .Aliases}}{{.}} {{end}}{{end}}")
    return "\n".join([
        "set -e",
        diag_function(),
        f"{up} 2>&1",
        f"known={shlex.quote(' ' + known_ids + ' ')}; new=",
        f"for id in $(docker ps -aq --no-trunc --filter {label} --filter {svc}); do",
        '  case "$known" in *" $id "*) ;; *) new="$id";; esac',
        "done",
        "[ -n \"$new\" ] || { echo '== status no new container'; exit 3; }",
        "echo \"== new $new $(docker inspect --format '{{.Name}}' \"$new\" | sed 's,^/,,')\"",
        f"aliases=$(docker inspect --format {shlex.quote(aliases)} \"$new\")",
        f"if [ -n \"$aliases\" ]; then docker network disconnect {edge} \"$new\"; fi",
        'docker start "$new" >/dev/null',
        "join() {",
        '  [ -n "$aliases" ] || return 0',
        "  set -- ; for a in $aliases; do set -- \"$@\" --alias \"$a\"; done",
        f'  docker network connect "$@" {edge} "$new"',
        "}",
        f"end=$(( $(date +%s) + {int(timeout)} ))",
        "while :; do",
        "  st=$(docker inspect --format '{{.State.Status}} {{if .State.Health}}"
        "{{.State.Health.Status}}{{else}}none{{end}}' \"$new\")",
        '  case "$st" in',
        '    "running healthy"|"running none") join; echo "== status $st"; exit 0;;',
        '    *unhealthy*|exited*|dead*) echo "== status $st"; diag "$new"; exit 4;;',
        "  esac",
        '  [ "$(date +%s)" -ge "$end" ] && { echo "== status $st (timed out)"; diag "$new"; '
        "exit 5; }",
        "  sleep 0.5",
        "done",
    ])


def diagnose_script(settings: Settings) -> str:
    """:func:`diag_function` of every container of the project that is not healthy."""
    label = shlex.quote(f"label=com.docker.compose.project={settings.compose_project}")
    fmt = shlex.quote("{{.Id}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
                      "{{else}}none{{end}}")
    return "\n".join([
        diag_function(),
        f"docker ps -aq --no-trunc --filter {label} | xargs -r docker inspect --format {fmt} |",
        "while read -r id st h; do",
        '  [ "$st $h" = "running healthy" ] || [ "$st $h" = "running none" ] || diag "$id"',
        "done",
    ])


@dataclass
class Diagnosis:
    """What a failed container told: for the terminal (``lines``) and one line (``short``)."""

    name: str
    state: str = ""
    exit_code: str = ""
    oom: bool = False
    health: list[str] = field(default_factory=list)  # "time: exit N: output", oldest first
    logs: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        out = [f"  {self.name}: state {self.state or '?'}"
               + (f", exit code {self.exit_code}" if self.state in ("exited", "dead") else "")
               + (", killed by the kernel (out of memory)" if self.oom else "")]
        if self.health:
            out.append("  last health checks:")
            out += [f"    {h}" for h in self.health]
        out.append(f"  last {len(self.logs)} log lines (docker logs --tail 30):"
                   if self.logs else "  no log output")
        out += [f"    {line}" for line in self.logs]
        return out

    @property
    def short(self) -> str:
        parts = []
        if self.oom:
            parts.append("out of memory (OOMKilled)")
        elif self.state in ("exited", "dead"):
            parts.append(f"exited with code {self.exit_code}")
        if self.health:
            parts.append(f"health check: {self.health[-1].split(': ', 1)[-1][:160]}")
        err = error_line(self.logs)
        if err:
            parts.append(f"log: {err[:200]}")
        return "; ".join(parts)


_ERRORISH = re.compile(r"(Traceback|Error\b|Exception\b|\w+Error:|panic:|FATAL|[Ff]atal|"
                       r"ERROR|[Ee]xception:)")


def error_line(logs: Iterable[str]) -> str:
    """The last log line that looks like an error (else the last line)."""
    logs = [ln for ln in logs if ln.strip()]
    for line in reversed(logs):
        if _ERRORISH.search(line) and not line.startswith("Traceback"):
            return line.strip()
    return logs[-1].strip() if logs else ""


def parse_diagnoses(text: str) -> list[Diagnosis]:
    """The :func:`diag_function` blocks of a command's output."""
    out: list[Diagnosis] = []
    current: Diagnosis | None = None
    where = ""
    for line in text.splitlines():
        if line.startswith("== diag"):
            current = Diagnosis(line[len("== diag"):].strip().lstrip("/") or "?")
            out.append(current)
            where = ""
            continue
        if current is None:
            continue
        if line.startswith("== exit"):
            parts = line[len("== exit"):].split()
            if len(parts) == 3:
                current.state, current.exit_code = parts[0], parts[1]
                current.oom = parts[2] == "true"
            continue
        if line.startswith("== health-log"):
            where = "health"
            continue
        if line.startswith("== logs"):
            where = "logs"
            continue
        if line.startswith("== end-diag"):
            current, where = None, ""
            continue
        if where == "health" and line.strip():
            try:
                entries = json.loads(line)
            except ValueError:
                continue
            for e in (entries or [])[-3:]:
                output = " ".join(str(e.get("Output", "")).split())[:300]
                when = str(e.get("End") or e.get("Start") or "")[11:19]
                current.health.append(f"{when}: exit {e.get('ExitCode')}: "
                                      f"{output or '(no output)'}")
        elif where == "logs" and line.startswith("| "):
            current.logs.append(line[2:])
        elif where == "logs" and line == "|":
            current.logs.append("")
    return out


def nginx_reload_cmd(settings: Settings) -> str:
    """Test nginx's config, then reload it (re-resolves the upstream names)."""
    return (compose(settings, "exec", "-T", "nginx", "nginx", "-t", "-q") + " && "
            + compose(settings, "exec", "-T", "nginx", "nginx", "-s", "reload"))


def swap_cmd(settings: Settings, old: Iterable[Container], grace: int = 30) -> str:
    """Let nginx see the new container, retire the old ones, then reload again.

    nginx asks Docker's DNS for ``backend`` at request time (cached 5 s); a
    reload empties that cache: first it sees old + new, so that requests keep
    flowing while the old container drains and stops (it refuses new
    connections at once and nginx retries the other replica:
    ``proxy_next_upstream``); as soon as it has stopped, the new one only
    (the old address would no longer answer at all). Old containers that are
    not healthy (a failed release being rolled back) are removed *before*
    that first reload.
    """
    old = list(old)
    sick = " ".join(shlex.quote(c.id) for c in old if c.health not in ("healthy", ""))
    fine = " ".join(shlex.quote(c.id) for c in old if c.health in ("healthy", ""))
    nginx = compose(settings, "ps", "-q", "nginx")
    lines = [
        "set -e",
        f"N=$({nginx})",
        'reload() { docker exec "$N" nginx -t -q && docker exec "$N" nginx -s reload; }',
    ]
    if sick:
        lines.append(f"docker rm -f {sick} >/dev/null")
    lines.append("reload")
    if fine:
        lines += [
            "sleep 1",
            f"docker stop -t {int(grace)} {fine} >/dev/null",
            "reload",
            f"docker rm -f {fine} >/dev/null",
        ]
    return "\n".join(lines)


def remove_cmd(old: Iterable[Container]) -> str:
    ids = " ".join(shlex.quote(c.id) for c in old)
    return f"docker rm -f {ids} >/dev/null"


def up_cmd(settings: Settings, timeout: int) -> str:
    return compose(settings, "up", "-d", "--remove-orphans", "--wait", "--wait-timeout",
                   str(timeout))


# Which service reads which managed files (bind mounts compose cannot see change).
RELOADS = {
    "nginx": ("docker/nginx/",),
    "prometheus": ("monitoring/prometheus/",),
    "grafana": ("monitoring/grafana/",),
    "alertmanager": ("monitoring/alertmanager/",),
}


def reloads_for(changed_rel: Iterable[str]) -> list[str]:
    """Services to reload because a file they mount changed."""
    changed = list(changed_rel)
    return [svc for svc, prefixes in RELOADS.items()
            if any(p.startswith(prefixes) for p in changed)]


def reload_cmd(settings: Settings, service: str) -> str:
    if service == "nginx":
        return nginx_reload_cmd(settings)
    if service == "prometheus":
        return compose(settings, "kill", "-s", "HUP", "prometheus")
    if service == "alertmanager":  # its entrypoint fills the secrets in again, then SIGHUP
        return compose(settings, "exec", "-T", "alertmanager", "sh",
                       "/etc/alertmanager/entrypoint.sh", "reload")
    return compose(settings, "restart", service)


# --- health gate -------------------------------------------------------------------


def gate_script(settings: Settings) -> str:
    """Compose health of every service, then HTTP status through nginx."""
    return "\n".join(["echo '== containers'", inspect_containers_cmd(settings),
                      *http_lines(settings)])


def http_lines(settings: Settings) -> list[str]:
    """``== http`` then ``path status`` of each health URL, fetched in parallel."""
    addr = settings.publish.bind
    if addr in ("0.0.0.0", "::", ""):
        addr = "127.0.0.1"
    port = settings.publish.https
    domain = settings.domain
    timeout = settings.health.timeout_seconds
    lines = ["echo '== http'"]
    for path in (settings.health.backend_path, settings.health.backend_deep_path,
                 settings.health.frontend_path):
        url = f"https://{domain}:{port}{path}"
        lines.append(
            f"printf '%s %s\\n' {shlex.quote(path)} \"$(curl -sk -o /dev/null "
            f"-w '%{{http_code}}' --max-time {timeout} -H 'X-Maicivy-Check: health' "
            f"--resolve {shlex.quote(f'{domain}:{port}:{addr}')} {shlex.quote(url)})\" &"
        )
    lines.append("wait")
    return lines


def gate_failures(text: str, services: Iterable[str] = SERVICES) -> list[str]:
    """What is wrong according to :func:`gate_script`'s output ([] = healthy)."""
    sec = sections(text)
    containers = parse_containers(sec.get("containers", []))
    problems = []
    for service in services:
        mine = [c for c in containers if c.service == service]
        if not mine:
            problems.append(f"{service}: no container")
            continue
        bad = [c for c in mine if not c.running or c.health not in ("healthy", "")]
        for c in bad:
            problems.append(f"{service}: {c.health or c.state}")
    for line in sec.get("http", []):
        path, _, code = line.strip().rpartition(" ")
        if not path:
            path, code = code, "000"
        if not code.startswith("2"):
            problems.append(f"GET {path} through nginx: HTTP {code or '000'}")
    return problems


# --- proof of the running configuration ------------------------------------------
#
# "reloading" must mean the new configuration serves. After a deploy or a
# rollback the gate reads back, from inside each container that mounts managed
# files, the bytes it sees (sha256) and what it loaded: nginx answers the
# config id embedded in the nginx.conf it runs (render.embedded_config_id);
# Prometheus' last successful reload must postdate its files.

NGINX_CONFIG_ID_PATH = "/config-id"


def mounted_files(compose_text: str, managed_rel: Iterable[str],
                  root: str = "") -> dict[str, dict[str, str]]:
    """{service: {managed file (relative to the root): its path inside the container}}.

    Read from the compose file's bind mounts (relative sources are relative to
    its directory, ``docker/``); a file is seen through a directory mount or a
    single-file one alike.
    """
    import posixpath

    import yaml

    data = yaml.safe_load(compose_text) or {}
    root = root.rstrip("/")
    managed = sorted(managed_rel)
    out: dict[str, dict[str, str]] = {}
    for service, svc in (data.get("services") or {}).items():
        for entry in (svc or {}).get("volumes") or []:
            if isinstance(entry, dict):
                if entry.get("type", "bind") != "bind":
                    continue
                source, target = str(entry.get("source", "")), str(entry.get("target", ""))
            else:
                parts = str(entry).split(":")
                if len(parts) < 2:
                    continue
                source, target = parts[0], parts[1]
            if source.startswith("."):
                source = posixpath.normpath(posixpath.join("docker", source))
            elif root and source.startswith(root + "/"):
                source = source[len(root) + 1:]
            else:
                continue
            for rel in managed:
                if rel == source:
                    out.setdefault(service, {})[rel] = target
                elif rel.startswith(source + "/"):
                    out.setdefault(service, {})[rel] = target.rstrip("/") + rel[len(source):]
    return out


@dataclass
class Proof:
    """What the running services must show: the files they see and what they loaded."""

    mounts: dict[str, dict[str, str]]  # service -> {rel: container path}
    expected: dict[str, str] | None = None  # rel -> sha256; None: the files on the host
    nginx_config_id: str | None = None  # None: the nginx.conf has no id (older release)


def proof_lines(settings: Settings, proof: Proof) -> list[str]:
    """Shell lines reporting, per service, the files' digests inside its container
    (``== seen.SERVICE``), the host's (``== host``), nginx's served config id and
    Prometheus' reload state."""
    from ..render import NGINX_STATUS_PORT

    root = shlex.quote(settings.root)
    rels = sorted({rel for files in proof.mounts.values() for rel in files})
    project = shlex.quote(f"label=com.docker.compose.project={settings.compose_project}")
    lines = ["echo '== host'",
             f"(cd {root} && sha256sum -- {' '.join(shlex.quote(r) for r in rels)}) 2>&1"
             if rels else "true"]
    for service, files in sorted(proof.mounts.items()):
        svc = shlex.quote(f"label=com.docker.compose.service={service}")
        paths = " ".join(shlex.quote(p) for p in files.values())
        lines += [
            f"for c in $(docker ps -q --filter {project} --filter {svc} "
            "--filter status=running); do",
            f"  echo '== seen.{service}'",
            f"  docker exec \"$c\" sha256sum -- {paths} 2>&1",
        ]
        if service == "nginx" and proof.nginx_config_id:
            url = f"http://127.0.0.1:{NGINX_STATUS_PORT}{NGINX_CONFIG_ID_PATH}"
            lines += ["  echo '== nginx-config-id'",
                      f"  docker exec \"$c\" wget -qO- -T 5 {url} 2>&1"]
        if service == "prometheus":
            url = f"http://127.0.0.1:{settings.ports.prometheus}/metrics"
            lines += [
                "  echo '== prometheus-ctime'",
                f"  docker exec \"$c\" stat -c '%Z %n' -- {paths} 2>&1",
                "  echo '== prometheus-reload'",
                f"  docker exec \"$c\" wget -qO- -T 5 {url} 2>&1 | "
                "grep -E '^prometheus_config_last_reload_success'",
            ]
        lines.append("done")
    lines.append("true")
    return lines


def proof_failures(text: str, proof: Proof) -> list[str]:
    """What differs between the running services and the files they should run."""
    sec = sections(text)
    host = {}
    for line in sec.get("host", []):
        digest, _, rel = line.partition("  ")
        if rel:
            host[rel] = digest
    expected = proof.expected if proof.expected is not None else host
    problems = []
    for service, files in sorted(proof.mounts.items()):
        if f"seen.{service}" not in sec:
            continue  # no running container: the health gate says so
        seen = {}
        for line in sec.get(f"seen.{service}", []):
            digest, _, path = line.partition("  ")
            if path:
                seen[path] = digest
        for rel, path in sorted(files.items()):
            want = expected.get(rel)
            if want is None:
                continue
            if path not in seen:
                problems.append(f"{service}: cannot read {path} inside its container")
            elif seen[path] != want:
                problems.append(f"{service}: {path} inside its container is not the "
                                f"{rel} deployed (the container does not see the new file)")
        if service == "nginx" and proof.nginx_config_id:
            served = " ".join(sec.get("nginx-config-id", [])).strip() or "nothing"
            if served != proof.nginx_config_id:
                problems.append(f"nginx: serves configuration {served[:40]}, not the deployed "
                                f"{proof.nginx_config_id} (the reload did not take effect)")
        if service == "prometheus":
            problems += _prometheus_problems(sec, files)
    return problems


def _prometheus_problems(sec: dict[str, list[str]], files: Mapping[str, str]) -> list[str]:
    metrics = {}
    for line in sec.get("prometheus-reload", []):
        name, _, value = line.partition(" ")
        try:
            metrics[name] = float(value)
        except ValueError:
            pass
    ok = metrics.get("prometheus_config_last_reload_successful")
    when = metrics.get("prometheus_config_last_reload_success_timestamp_seconds")
    if ok is None or when is None:
        return ["prometheus: cannot read its reload state (/metrics)"]
    if ok != 1:
        return ["prometheus: its last configuration reload failed (see its log)"]
    wanted = set(files.values())
    changed = [int(parts[0]) for line in sec.get("prometheus-ctime", [])
               if len(parts := line.split(" ", 1)) == 2 and parts[0].isdigit()
               and parts[1] in wanted]
    if changed and when < max(changed):
        return ["prometheus: runs a configuration loaded before its files last changed "
                "(not reloaded)"]
    return []


# --- recording releases, restoring them -----------------------------------------


def images_text(images: Mapping[str, tuple[str, str]]) -> str:
    return "".join(f"{s} {ref} {i}\n" for s, (ref, i) in sorted(images.items()))


def parse_images(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def record_script(settings: Settings, release: str, managed: Iterable[str],
                  images: Mapping[str, tuple[str, str]], log_line: str) -> str:
    """Keep this release (files + image tags), make it current, prune, log."""
    d = state_dir(settings)
    rd = f"{d}/releases/{release}"
    rels = " ".join(shlex.quote(r) for r in relative(settings, managed))
    lines = [
        "set -e",
        f"D={shlex.quote(d)}; RD={shlex.quote(rd)}",
        'mkdir -p "$RD"',
        f"cd {shlex.quote(settings.root)}",
        f"set -- ; for f in {rels}; do [ -f \"$f\" ] && set -- \"$@\" \"$f\"; done",
        'tar cf "$RD/files.tar" -T /dev/null -- "$@"',
        f"printf '%s' {shlex.quote(images_text(images))} > \"$RD/images\"",
    ]
    for service, (_ref, image_id) in sorted(images.items()):
        lines.append(f"docker tag {shlex.quote(image_id)} "
                     f"{shlex.quote(release_tag(settings, service, release))}")
    lines += [
        f"echo {shlex.quote(release)} > \"$D/current.tmp\" && mv -f \"$D/current.tmp\" "
        "\"$D/current\"",
        *prune_lines(settings),
        *([log_append(settings, log_line)] if log_line else []),
    ]
    return "\n".join(lines)


def prune_lines(settings: Settings) -> list[str]:
    """Drop releases beyond ``deploy.keep_releases`` (their tags too), prune images."""
    keep = int(settings.deploy.keep_releases)
    repo = f"{settings.compose_project}-release/"
    return [
        f"for old in $(ls -1 \"$D/releases\" | sort | head -n -{keep}); do",
        f"  docker images --format '{{{{.Repository}}}}:{{{{.Tag}}}}' | "
        f"grep -F \":$old\" | grep -F {shlex.quote(repo)} | xargs -r docker rmi >/dev/null || true",
        '  rm -rf "$D/releases/$old"',
        "done",
        "docker image prune -f >/dev/null || true",
    ]


def log_append(settings: Settings, line: str) -> str:
    """sh: append ``line`` to the deploy log, with the server-side identity after it."""
    log = f"{state_dir(settings)}/deploy.log"
    return "\n".join([IDENTITY_SH, log_line_with_identity(shlex.quote(line), shlex.quote(log))])


def log_line(when: str, user: str, result: str, release: str,
             images: Mapping[str, tuple[str, str]], detail: str = "") -> str:
    """One deploy log line: time, local user, result, release, image refs and IDs.

    The server appends its own view of who ran it (server_user, sudo_user,
    ssh_from: fabfile/audit.py) when it writes the line.
    """
    imgs = ",".join(f"{s}={ref}@{i.removeprefix('sha256:')[:12]}"
                    for s, (ref, i) in sorted(images.items()))
    out = f"{when} user={user} result={result} release={release or '-'} images={imgs or '-'}"
    if detail:
        out += " detail=" + json.dumps(detail)
    return out


def restore_script(settings: Settings, tar: str, managed_now: Iterable[str],
                   images: Mapping[str, tuple[str, str]]) -> str:
    """Put back a snapshot's files (removing managed files it did not have) and image tags."""
    root = shlex.quote(settings.root)
    rels = " ".join(shlex.quote(r) for r in relative(settings, managed_now))
    lines = [
        "set -e",
        f"cd {root}",
        f"T={shlex.quote(tar)}",
        'tar tf "$T" > "$T.list"',
        # Report which files the restore changes (services that mount them reload).
        "echo '== changed'",
        # Files this deploy added, which the snapshot did not have, go away.
        f"for f in {rels}; do grep -qxF -- \"$f\" \"$T.list\" || "
        "{ [ -e \"$f\" ] && echo \"$f\"; rm -f -- \"$f\"; }; done",
        'rm -f "$T.list"',
        # Only the files that differ are extracted: the others keep their inode
        # and times (a service's "loaded after its files changed" stays true).
        'tar df "$T" 2>&1 | grep -E "Contents differ|Size differs|Mode differs|Uid differs|'
        'Gid differs|No such file|Cannot stat" | sed -E "s/^tar: //; s/: .*//" | sort -u '
        '> "$T.changed" || true',
        'cat "$T.changed"',
        'if [ -s "$T.changed" ]; then tar xf "$T" -T "$T.changed"; fi',
        'rm -f "$T.changed"',
    ]
    for _service, (ref, image_id) in sorted(images.items()):
        lines.append(f"docker tag {shlex.quote(image_id)} {shlex.quote(ref)}")
    return "\n".join(lines)
