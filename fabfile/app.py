"""app: day-to-day operations on the running stack (Kamal's ``app`` commands).

``status`` (every service, release, lock), ``logs``, ``exec`` and the
``psql`` / ``redis-cli`` shells, ``restart`` of one service, and the
maintenance page (``maintenance-on`` / ``maintenance-off``). All of them work
the same from a laptop (``fab -H vps app.status``) and on the server
(``inv app.status``).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from invoke import Collection, Exit

from . import clock
from .config import SERVICES, Settings
from .core import host_for, ops_task, settings_for
from .deploy.history import log_line
from .deploy.release import ROLLING, state_dir
from .errors import OpsError
from .host import Host, sudo_wrap
from .progress import step
from .shell import script
from .stack import compose, compose_argv
from .stream import stream

# --- status ---------------------------------------------------------------------

STATUS = script(__file__, "scripts/app-status.sh")
WAIT_HEALTHY = script(__file__, "scripts/app-wait-healthy.sh")
PROBE_SITE = script(__file__, "scripts/app-probe-site.sh")


def maintenance_dir(settings: Settings) -> str:
    """The directory nginx mounts at /etc/nginx/maintenance (page + flag file)."""
    return f"{settings.root}/docker/nginx/maintenance"


def maintenance_flag(settings: Settings) -> str:
    """While this file exists nginx answers 503 with the maintenance page."""
    return f"{maintenance_dir(settings)}/on"


def status_command(settings: Settings) -> str:
    """Containers of the stack, their images' digests, release, lock, maintenance flag."""
    from .lock import holder_read_script, lock_dir

    return STATUS.command(settings.compose_project, state_dir(settings),
                          maintenance_flag(settings), holder_read_script(lock_dir(settings)))


@dataclass
class ServiceStatus:
    service: str
    state: str = "missing"
    health: str = ""
    image: str = ""
    image_id: str = ""
    digest: str = ""
    started: str = ""
    uptime_seconds: int | None = None
    restarts: int = 0
    exit_code: int = 0
    ports: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "running" and self.health in ("healthy", "")


@dataclass
class StackStatus:
    host: str
    services: list[ServiceStatus]
    release: str = ""
    lock: str = ""
    maintenance: str = ""

    @property
    def healthy(self) -> bool:
        return all(s.ok for s in self.services)

    def as_dict(self) -> dict:
        return {
            "host": self.host, "healthy": self.healthy, "release": self.release or None,
            "lock": self.lock or None, "maintenance": self.maintenance or None,
            "services": [{**asdict(s), "ok": s.ok} for s in self.services],
        }


def _epoch(iso: str) -> float | None:
    """Docker's RFC 3339 time (nanoseconds) -> epoch seconds."""
    if not iso or iso.startswith("0001-"):
        return None
    base = iso.split(".")[0].rstrip("Z")
    try:
        return datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def parse_status(text: str, host_name: str) -> StackStatus:
    now = time.time()
    digests: dict[str, str] = {}
    rows: list[list[str]] = []
    status = StackStatus(host_name, [])
    lock_text: list[str] = []
    for line in text.splitlines():
        if line.startswith("@@now "):
            now = float(line.split()[1])
        elif line.startswith("@@c "):
            parts = line[4:].split("|")
            if len(parts) == 10:
                rows.append(parts)
        elif line.startswith("@@i "):
            image_id, _, repo_digests = line[4:].partition("|")
            digests[image_id] = repo_digests.split(",")[0] if repo_digests else ""
        elif line.startswith("@@release "):
            status.release = line[len("@@release "):].strip()
        elif line.startswith("@@lock "):
            lock_text.append(line[len("@@lock "):])
        elif line.startswith("@@maintenance"):
            status.maintenance = line[len("@@maintenance"):].strip() or "on"
    if lock_text:
        from .lock import parse_holder

        holder = parse_holder("\n".join(lock_text))
        if holder is not None:
            status.lock = (str(holder) if holder.mode == "exclusive"
                           else f"backups (shared): {holder}")
    for service in SERVICES:
        mine = [r for r in rows if r[0] == service]
        # The best container counts (two during a rolling replace).
        mine.sort(key=lambda r: (r[2] != "running", r[3] not in ("healthy", "")))
        s = ServiceStatus(service)
        if mine:
            best = mine[0]
            s.containers = [r[1].lstrip("/") for r in mine]
            s.state, s.health, s.image, s.image_id = best[2], best[3], best[4], best[5]
            s.digest = digests.get(best[5], "").rpartition("@")[2]
            s.started = best[6]
            started = _epoch(best[6])
            if started is not None and s.state == "running":
                s.uptime_seconds = max(0, int(now - started))
            s.restarts = int(best[7]) if best[7].isdigit() else 0
            s.exit_code = int(best[8]) if best[8].lstrip("-").isdigit() else 0
            s.ports = best[9].split()
        status.services.append(s)
    return status


def human_duration(seconds: int | None) -> str:
    """3d4h, 2h5m, 5m3s, 12s ('-' when unknown)."""
    if seconds is None:
        return "-"
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def format_status(status: StackStatus) -> str:
    head = ("SERVICE", "STATE", "HEALTH", "UPTIME", "RESTARTS", "IMAGE", "DIGEST", "PORTS")
    table = [head]
    for s in status.services:
        state = s.state if s.state != "exited" else f"exited ({s.exit_code})"
        table.append((s.service, state, s.health or "-", human_duration(s.uptime_seconds),
                      str(s.restarts), s.image or "-", s.digest[:19] or "-",
                      " ".join(s.ports) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in table]
    lines.append("")
    lines.append(f"release:     {status.release or 'none recorded (never deployed?)'}")
    lines.append(f"deploy lock: {status.lock or 'free'}")
    lines.append("maintenance: " + (f"ON ({status.maintenance}): the site answers 503; "
                                    "app.maintenance-off ends it" if status.maintenance
                                    else "off"))
    bad = [s.service for s in status.services if not s.ok]
    lines.append(f"{status.host}: " + ("all services healthy" if not bad
                                       else f"NOT healthy: {', '.join(bad)}"))
    return "\n".join(lines)


def read_status(host: Host, settings: Settings) -> StackStatus:
    r = host.check(status_command(settings), sudo=True, timeout=60)
    if "@@now" not in r.stdout:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise OpsError(f"{host.name}: could not read the stack's state: "
                       f"{detail[-1] if detail else 'no output'}")
    return parse_status(r.stdout, host.name)


@ops_task(help={"json_": "print JSON (for machines) instead of the table"})
def status(c, json_=False):
    """Show every service: state, health, image and digest, uptime, restarts, ports.

    Also the current release, who holds the deploy lock and whether the
    maintenance page is on. Exits 1 if any service is missing, stopped or
    not healthy (0 when all are).
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    st = read_status(host, settings)
    print(json.dumps(st.as_dict(), indent=2) if json_ else format_status(st))
    sys.stdout.flush()
    if not st.healthy:
        raise Exit(code=1)


# --- logs -------------------------------------------------------------------------


def _services(value, allow_all: bool = True) -> list[str]:
    """``backend,frontend`` (or a list of them) -> checked service names."""
    items = value if isinstance(value, list | tuple) else [value]
    names = [n.strip() for item in items for n in str(item or "").split(",") if n.strip()]
    for n in names:
        if n not in SERVICES:
            raise OpsError(f"unknown service {n!r}; choose from {', '.join(SERVICES)}")
    if not names and not allow_all:
        raise OpsError(f"name a service: one of {', '.join(SERVICES)}")
    return names


def logs_command(settings: Settings, services: list[str], follow: bool = False,
                 since: str = "", tail: str = "", grep: str = "") -> str:
    args = ["logs", "--no-color", "--timestamps"]
    if follow:
        args.append("--follow")
    if since:
        args += ["--since", since]
    args += ["--tail", str(tail) if tail not in ("", None) else ("100" if follow else "all")]
    cmd = compose(settings, *args, *services) + " 2>&1"
    if grep:
        cmd += f" | grep --line-buffered -E -e {shlex.quote(grep)}"
    return cmd


@ops_task(iterable=["service"], help={
    "service": "a service to show (repeat, or comma-separate; default: all of them)",
    "follow": "keep streaming new lines until Ctrl-C",
    "since": "only lines since this time: 10m, 2h, or 2026-01-31T12:00:00",
    "tail": "how many lines of each service to start with (default: all, 100 with --follow)",
    "grep": "only lines matching this regular expression (grep -E)",
})
def logs(c, service=None, follow=False, since="", tail="", grep=""):
    """Show the services' logs, streamed as they come (--follow until Ctrl-C).

    Lines carry the service name and a timestamp. Ctrl-C stops the logs on the
    server too.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    names = _services(service or [])
    if tail not in ("", None) and not str(tail).isdigit():
        raise OpsError(f"--tail must be a number of lines (got {tail!r})")
    rc = stream(host, logs_command(settings, names, follow, since, tail, grep))
    if grep and rc == 1:  # grep found nothing
        rc = 0
    if rc:
        raise Exit(code=rc)


# --- exec and the database shells ------------------------------------------------------


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def exec_command(settings: Settings, service: str, argv: list[str], tty: bool) -> str:
    return compose(settings, "exec", *([] if tty else ["-T"]), service, *argv)


def shell_argv(program: str, env_lines: str, args: list[str]) -> list[str]:
    """``sh -c`` inside the container: credentials come from ITS environment."""
    return ["sh", "-c", f'{env_lines}; exec {program} "$@"', program, *args]


def psql_argv(command: str = "") -> list[str]:
    return shell_argv('psql -U "$POSTGRES_USER" -d "$POSTGRES_DB"',
                      'export PGPASSWORD="$POSTGRES_PASSWORD"',
                      ["-c", command] if command else [])


def redis_argv(command: str = "") -> list[str]:
    return shell_argv("redis-cli", 'export REDISCLI_AUTH="$REDIS_PASSWORD"',
                      shlex.split(command) if command else [])


def run_in(c, settings: Settings, host: Host, service: str, argv: list[str]) -> int:
    """Run ``argv`` in the service's container: with a PTY on a terminal, else plain."""
    tty = _interactive()
    command = exec_command(settings, service, argv, tty)
    if host.use_sudo:
        command = sudo_wrap(command)
    # invoke/fabric's run: a real PTY (raw mode, window size, stdin forwarded)
    # on a terminal; otherwise stdin and output pass through as they come.
    r = c.run(command, pty=tty, warn=True, hide=False, in_stream=None if tty else sys.stdin)
    return r.exited


def _finish(rc: int) -> None:
    sys.stdout.flush()
    if rc:
        raise Exit(code=rc)


@ops_task(name="exec", positional=["service", "command"], help={
    "service": "the service whose container runs the command",
    "command": "the command line to run (quote it); sh for a shell",
})
def exec_(c, service=None, command=None):
    """Run a command in a service's container (with a real terminal when you are at one).

    fab -H vps app.exec backend 'ls -la /app'; fab -H vps app.exec backend sh
    for a shell. On a terminal the command gets a real one (colours, Ctrl-C,
    full-screen programs); otherwise its input and output are passed through.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    name = _services(service, allow_all=False)
    if len(name) != 1:
        raise OpsError("name one service")
    _finish(run_in(c, settings, host, name[0], shlex.split(command or "") or ["sh"]))


@ops_task(help={"command": "run this SQL and exit instead of an interactive psql"})
def psql(c, command=""):
    """Open psql on the stack's database (credentials from the container, never shown)."""
    settings = settings_for(c)
    host = host_for(c, settings)
    _finish(run_in(c, settings, host, "postgres", psql_argv(command)))


@ops_task(name="redis-cli", help={"command": "run this redis command and exit (e.g. 'dbsize')"})
def redis_cli(c, command=""):
    """Open redis-cli on the stack's Redis (password from the container, never shown)."""
    settings = settings_for(c)
    host = host_for(c, settings)
    _finish(run_in(c, settings, host, "redis", redis_argv(command)))


# --- restart ----------------------------------------------------------------------------


def wait_healthy_cmd(settings: Settings, service: str, timeout: int) -> str:
    """Wait until the service's running container is healthy; ``== status`` lines."""
    return WAIT_HEALTHY.command(int(timeout), service, *compose_argv(settings))


def restart_service(host: Host, settings: Settings, service: str) -> str:
    """Restart one service and wait for it to be healthy; returns how it was done."""
    from .deploy import runner as deploy
    from .deploy.history import log_append
    from .deploy.release import Plan, parse_containers
    from .deploy.scripts import inspect_containers_cmd
    from .lock import stack_lock
    from .shell import sections

    timeout = int(settings.deploy.health_timeout_seconds)
    current = f"echo '== current'; cat {shlex.quote(state_dir(settings))}/current 2>/dev/null"
    with stack_lock(host, settings, f"app.restart {service}", report=current) as lock:
        release = " ".join(sections(lock.report_text).get("current", [])).strip()
        containers = parse_containers(
            host.check(inspect_containers_cmd(settings), sudo=True).stdout.splitlines())
        running = [x for x in containers if x.service == service and x.running]
        nginx_up = any(x.running for x in containers if x.service == "nginx")
        if service in ROLLING and running and nginx_up:
            # Deploy's path: a new container beside the old, healthy before the old goes.
            plan = Plan({}, {}, {}, containers, rolling=[service])
            with step(f"{service}: replace beside the old container"):
                deploy.converge(host, settings, plan)
            how = "replaced beside the old container (no downtime)"
        else:
            with step(f"{service}: restart and wait until healthy") as s:
                lock.step(f"{service}: restart")
                host.run(compose(settings, "restart", service), sudo=True, timeout=timeout + 60)
                r = host.check(wait_healthy_cmd(settings, service, timeout), sudo=True,
                               timeout=timeout + 60)
                s.note = r.stdout.strip().splitlines()[-1:][0].removeprefix("== status ") \
                    if r.stdout.strip() else ""
                if r.failed:
                    raise OpsError(f"{host.name}: {service} did not become healthy after the "
                                   f"restart ({s.note or 'no status'}); see app.logs "
                                   f"--service {service}")
            how = "restarted"
        lock.finish("restart", log_append(settings, log_line(
            clock.iso(), deploy.local_user(), "restart", release, {}, f"{service} {how}")))
        return how


def _who() -> str:
    from .deploy.runner import local_user

    return local_user()


@ops_task(positional=["service"], help={"service": "the service to restart"})
def restart(c, service=None):
    """Restart one service and wait until it is healthy again.

    backend and frontend take deploy's no-downtime path: a new container
    starts beside the old one and the old one goes only once the new one is
    healthy. Other services are restarted in place (nginx: a few seconds
    without answers). Holds the deploy lock meanwhile.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    names = _services(service, allow_all=False)
    if len(names) != 1:
        raise OpsError("name one service")
    how = restart_service(host, settings, names[0])
    host.say(f"{host.name}: {names[0]} {how}; healthy")


# --- maintenance mode ------------------------------------------------------------------


def probe_site_cmd(settings: Settings) -> str:
    """``site <code> <retry-after>`` and ``health <code>`` as the public sees them."""
    from .ssl import local_address

    addr = local_address(settings)
    target = f"[{addr}]" if ":" in addr else addr
    port = settings.publish.https
    base = f"https://{settings.domain}:{port}"
    return PROBE_SITE.command(f"{settings.domain}:{port}:{target}", base + "/",
                              base + settings.health.backend_path)


def probe_site(host: Host, settings: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in host.check(probe_site_cmd(settings), timeout=60).stdout.splitlines():
        key, _, rest = line.partition(" ")
        out[key] = rest.strip()
    return out


def _expect(host: Host, settings: Settings, want_site: str, tries: int = 20) -> dict:
    seen: dict = {}
    for _ in range(tries):
        seen = probe_site(host, settings)
        code = seen.get("site", "000").split()[0]
        if (code == "503") == (want_site == "503") and code != "000":
            return seen
        time.sleep(0.5)
    return seen


@ops_task(name="maintenance-on", help={
    "reason": "a short note kept with the flag (shown by app.status)",
})
def maintenance_on(c, reason=""):
    """Put up the maintenance page: the site answers 503 with Retry-After.

    /health (for outside monitors and our checks), ACME challenges on port 80
    and Grafana keep working. It stays on -- across deploys too, which say so
    -- until app.maintenance-off. Checks the site really answers 503.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    note = f"since {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} by {_who()}"
    if reason:
        note += " - " + " ".join(str(reason).split())[:120]
    host.run(f"mkdir -p {shlex.quote(maintenance_dir(settings))}", sudo=True)
    host.write_file(maintenance_flag(settings), note + "\n", sudo=True)
    seen = _expect(host, settings, "503")
    site = seen.get("site", "000 -").split()
    if site[0] != "503":
        host.run(f"rm -f {shlex.quote(maintenance_flag(settings))}", sudo=True)
        raise OpsError(f"{host.name}: the site still answers HTTP {site[0]} with the flag set: "
                       "the running nginx has no maintenance block yet; deploy first, then "
                       "retry (flag removed again)")
    host.say(f"{host.name}: maintenance mode ON: the site answers 503 (Retry-After "
             f"{site[1] if len(site) > 1 else '-'}s); {settings.health.backend_path} answers "
             f"{seen.get('health', '000')}")


@ops_task(name="maintenance-off")
def maintenance_off(c):
    """Take the maintenance page down: the site serves normally again (checked)."""
    settings = settings_for(c)
    host = host_for(c, settings)
    host.run(f"rm -f {shlex.quote(maintenance_flag(settings))}", sudo=True)
    seen = _expect(host, settings, "200")
    code = seen.get("site", "000").split()[0]
    if code == "503" or code == "000":
        raise OpsError(f"{host.name}: the flag is gone but the site answers HTTP {code}; "
                       "check app.status and app.logs --service nginx")
    host.say(f"{host.name}: maintenance mode OFF: the site answers HTTP {code}")


def maintenance_note(host: Host, settings: Settings) -> str:
    """A warning line when the maintenance page is up ('' when it is not)."""
    r = host.check(f"head -c 200 {shlex.quote(maintenance_flag(settings))}", sudo=True)
    if r.failed:
        return ""
    return (f"{host.name}: note: maintenance mode is still ON ({r.stdout.strip()}): the "
            "site answers 503; run app.maintenance-off when you are done")


ns = Collection("app", status, logs, exec_, psql, redis_cli, restart,
                maintenance_on, maintenance_off)
