"""doctor: a preflight of the server, before the first deploy and when in doubt.

One read-only script (scripts/doctor-facts.sh) gathers the facts on the
server (one round trip); pure functions below judge them. Each line is ok /
warn / fail with what to do.
Nothing is changed.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from invoke import Exit

from .addresses import host_port, is_loopback
from .config import Settings
from .core import host_for, ops_task, settings_for
from .deploy.release import state_dir
from .host import Host
from .lock import holder_read_script, interrupted, lock_dir, parse_holder
from .shell import script
from .ssl import parse_x509
from .stack import GENERATED_SECRETS, cert_dir, tls_domains

OK, WARN, FAIL = "ok", "warn", "fail"
EXIT_CODES = {OK: 0, WARN: 1, FAIL: 2}
MIN_DOCKER = (20, 10)
MIN_COMPOSE = (2, 20)
REQUIRED_ENV = (*GENERATED_SECRETS, "POSTGRES_USER", "POSTGRES_DB")
STALE_LOCK_SECONDS = 3600


@dataclass
class Check:
    check: str
    status: str
    detail: str
    fix: str = ""


# --- gathering ---------------------------------------------------------------------


def _backup_kinds() -> tuple[str, ...]:
    return ("postgres", "redis")


FACTS = script(__file__, "scripts/doctor-facts.sh")


def facts_command(settings: Settings) -> str:
    """The command printing ``@@name`` sections with everything doctor judges. Read-only."""
    return FACTS.command(settings.root, settings.backup.dir, settings.env_file,
                         state_dir(settings), cert_dir(settings, "").rstrip("/"),
                         " ".join(REQUIRED_ENV), " ".join(_backup_kinds()),
                         holder_read_script(lock_dir(settings)), *tls_domains(settings))


def parse_facts(text: str) -> dict:
    facts: dict = {"paths": [], "df": [], "inodes": [], "mem": {}, "dns": {}, "ports": [],
                   "certs": {}, "backups": {}, "unset": [], "holder": [], "journal": []}
    section = None
    cert = None
    for line in text.splitlines():
        if line.startswith("@@"):
            key, _, rest = line[2:].partition(" ")
            section, cert = key, None
            if key == "now":
                facts["now"] = float(rest or 0)
            elif key == "path":
                facts["paths"].append(rest)
                section = "df"
            elif key in ("docker", "compose", "ntp", "ufw", "env"):
                facts[key] = rest.strip()
            elif key == "addresses":
                facts["addresses"] = rest.split()
            elif key == "dns":
                name, _, addrs = rest.partition(" ")
                facts["dns"][name] = addrs.split()
            elif key == "cert":
                cert = rest.strip()
                facts["certs"][cert] = []
            elif key == "backup":
                parts = rest.split(" ", 3)
                facts["backups"][parts[0]] = parts[1:]
            elif key == "unset":
                facts["unset"].append(rest.strip())
            elif key == "holder":
                facts["holder"].append(rest)
            elif key == "ownerfile":
                facts["ownerfile"] = rest
            continue
        if section == "df" and line.strip():
            facts["df"].append(line.split())
        elif section == "inodes" and line.strip():
            facts["inodes"].append(line.split())
        elif section == "mem":
            k, _, v = line.partition(":")
            if v.split():
                facts["mem"][k] = int(v.split()[0])
        elif section == "ports" and line.strip():
            facts["ports"].append(line)
        elif section == "cert" and cert:
            facts["certs"][cert].append(line)
        elif section == "journal":
            facts["journal"].append(line)
    return facts


# --- judging --------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    m = re.match(r"v?(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else ()


def disk_checks(settings: Settings, facts: dict) -> list[Check]:
    out = []
    warn, crit = settings.health.disk_warn_percent, settings.health.disk_critical_percent
    seen = set()
    for rows, what, unit in ((facts["df"], "disk", "space"), (facts["inodes"], "inodes",
                                                              "inodes")):
        for fields in rows:
            if len(fields) < 6 or not fields[4].rstrip("%").isdigit():
                continue
            mount, used = fields[5], int(fields[4].rstrip("%"))
            if (what, mount) in seen:
                continue
            seen.add((what, mount))
            detail = f"{used}% of the {unit} used on {mount}"
            if used >= crit:
                out.append(Check(f"{what} {mount}", FAIL, detail,
                                 "free space now: prune old images (docker image prune -a), "
                                 "backups (backup.prune), logs"))
            elif used >= warn:
                out.append(Check(f"{what} {mount}", WARN, detail,
                                 "plan for more space or prune images and old backups"))
            else:
                out.append(Check(f"{what} {mount}", OK, detail))
    if not out:
        out.append(Check("disk", WARN, "df gave nothing", "check the paths exist"))
    return out


def memory_check(facts: dict) -> Check:
    mem = facts["mem"]
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    if not total:
        return Check("memory", WARN, "cannot read /proc/meminfo", "")
    detail = f"{avail / 1048576:.1f} GiB available of {total / 1048576:.1f} GiB"
    if avail / total < 0.05:
        return Check("memory", FAIL, detail, "stop what uses the memory or add RAM/swap")
    if total < 1.8 * 1048576 or avail / total < 0.15:
        return Check("memory", WARN, detail, "the stack wants about 2 GiB; add RAM or swap")
    return Check("memory", OK, detail)


def _version_check(key: str, label: str, version: str, minimum: tuple, missing: str,
                   fix: str) -> Check:
    if not version:
        return Check(key, FAIL, missing, fix)
    if _version(version) < minimum:
        return Check(key, FAIL, f"{label} {version} is too old",
                     f"upgrade to {'.'.join(map(str, minimum))} or later")
    return Check(key, OK, f"{label} {version}")


def docker_checks(facts: dict) -> list[Check]:
    return [
        _version_check("docker", "Docker", facts.get("docker", ""), MIN_DOCKER,
                       "no Docker engine answers",
                       "run provision (installs Docker), or start it: systemctl start docker"),
        _version_check("compose", "Compose", facts.get("compose", ""), MIN_COMPOSE,
                       "no docker compose plugin",
                       "install docker-compose-plugin (provision does)"),
    ]


def clock_check(facts: dict, skew: float | None, uncertainty: float) -> Check:
    ntp = facts.get("ntp", "")
    parts = []
    if skew is not None:
        parts.append(f"{skew:+.1f}s from this machine (+/- {uncertainty:.1f}s)")
    parts.append({"yes": "NTP synchronised", "no": "NTP NOT synchronised"}.get(
        ntp, "NTP state unknown"))
    detail = ", ".join(parts)
    if skew is not None and abs(skew) - uncertainty > 30:
        return Check("clock", FAIL, detail, "fix the server's clock: timedatectl set-ntp true "
                     "(TLS, certificates and backups ages depend on it)")
    if (skew is not None and abs(skew) - uncertainty > 2) or ntp == "no":
        return Check("clock", WARN, detail, "enable time sync: timedatectl set-ntp true")
    return Check("clock", OK, detail)


def dns_checks(facts: dict) -> list[Check]:
    mine = set(facts.get("addresses", []))
    out = []
    for name, addrs in facts["dns"].items():
        if not addrs:
            out.append(Check(f"dns {name}", FAIL, "does not resolve",
                             f"create an A (and AAAA) record for {name} pointing at this "
                             f"server ({', '.join(sorted(mine)) or 'its public address'})"))
        elif mine & set(addrs):
            out.append(Check(f"dns {name}", OK, f"-> {', '.join(addrs)} (this server)"))
        else:
            out.append(Check(f"dns {name}", WARN,
                             f"-> {', '.join(addrs)}, not one of this server's addresses "
                             f"({', '.join(sorted(mine)) or 'none seen'})",
                             "point the record at this server (fine if it is behind NAT or "
                             "a load balancer that forwards to it)"))
    return out


_PORT = re.compile(r"^(?P<ip>\[?[0-9a-fA-F.:]*\]?):(?P<hp>\d+)(?:-\d+)?->(?P<cp>[\d-]+)/"
                   r"(?P<proto>\w+)$")


def exposed_ports(lines: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(container, project, service, host address:port, container port) published publicly."""
    out = []
    for line in lines:
        parts = line.split("|", 3)
        if len(parts) != 4:
            continue
        name, project, service, ports = parts
        for item in ports.split(","):
            m = _PORT.match(item.strip())
            if not m:
                continue
            ip = m.group("ip").strip("[]")
            if is_loopback(ip):
                continue
            out.append((name, project, service, host_port(ip or '::', m.group('hp')),
                        f"{m.group('cp')}/{m.group('proto')}"))
    return out


def ports_check(settings: Settings, facts: dict) -> Check:
    allowed = {str(settings.publish.http), str(settings.publish.https)}
    bad = []
    for name, project, service, published, cport in exposed_ports(facts["ports"]):
        ours = project == settings.compose_project and service == "nginx"
        if ours and published.rsplit(":", 1)[1] in allowed:
            continue
        bad.append(f"{name} {published}->{cport}")
    ufw = facts.get("ufw", "") or "ufw not installed"
    if bad:
        return Check("published ports", FAIL,
                     f"reachable from outside whatever ufw says ({ufw}): {'; '.join(bad)}",
                     "Docker's iptables rules bypass ufw: publish these on 127.0.0.1 "
                     "(127.0.0.1:PORT:PORT) or not at all")
    return Check("published ports", OK, f"only nginx's {settings.publish.http}/"
                 f"{settings.publish.https} are public ({ufw})")


def cert_checks(settings: Settings, facts: dict, now: float) -> list[Check]:
    out = []
    for name, lines in facts["certs"].items():
        info = parse_x509(name, "file", "\n".join(lines), now)
        label = f"certificate {name}"
        if info.error or info.days_left is None:
            out.append(Check(label, WARN, info.error or "unreadable",
                             "deploy creates a stand-in, ssl.obtain the real certificate"))
        elif info.self_signed:
            out.append(Check(label, WARN, f"self-signed stand-in, {info.days_left:.0f} days left",
                             "run ssl.obtain once DNS points here"))
        elif info.days_left < settings.tls.critical_days:
            out.append(Check(label, FAIL, f"{info.days_left:.0f} days left",
                             "run ssl.renew now and check why renewal (cron) failed"))
        elif info.days_left < settings.tls.warn_days:
            out.append(Check(label, WARN, f"{info.days_left:.0f} days left",
                             "run ssl.renew; check the renewal cron job"))
        else:
            out.append(Check(label, OK, f"{info.days_left:.0f} days left ({info.issuer})"))
    return out


def backup_checks(settings: Settings, facts: dict, now: float) -> list[Check]:
    out = []
    max_age = float(settings.backup.max_age_hours)
    offsite = bool(settings.backup.s3.bucket)
    for kind, fields in facts["backups"].items():
        label = f"backup {kind}"
        if not fields or fields[0] == "none":
            out.append(Check(label, WARN, "no backup yet",
                             f"run backup.{kind} (cron runs it once provisioned)"))
            continue
        age = (now - float(fields[0])) / 3600
        detail = f"newest {age:.1f} h old"
        if offsite:
            detail += ", off-site copy " + ("recorded" if fields[1] != "0" else "MISSING")
        if age > max_age:
            out.append(Check(label, FAIL, detail, f"no backup in {max_age:g} h: check the cron "
                             f"job's log and run backup.{kind}"))
        elif offsite and fields[1] == "0":
            out.append(Check(label, WARN, detail, "run backup.check; check the S3 settings"))
        else:
            out.append(Check(label, OK, detail))
    if not offsite:
        out.append(Check("backup off-site", WARN, "no off-site copy configured",
                         "set backup.s3.bucket: a backup on the same disk dies with it"))
    return out


def env_check(settings: Settings, facts: dict) -> Check:
    env = facts.get("env", "missing")
    if env == "missing":
        return Check(".env", FAIL, f"{settings.env_file} does not exist",
                     "run provision (creates it with strong random secrets)")
    mode, _, owner = env.partition(" ")
    problems, fixes = [], []
    if mode != "600":
        problems.append(f"mode {mode} (others can read the secrets)")
        fixes.append(f"chmod 600 {settings.env_file}")
    if facts["unset"]:
        problems.append(f"unset: {', '.join(facts['unset'])}")
        fixes.append("run provision (fills the generated secrets) and set the others in .env")
    if problems:
        return Check(".env", FAIL, "; ".join(problems), "; ".join(fixes))
    return Check(".env", OK, f"mode 600, owner {owner}, secrets set")


def _since(owner: str) -> float | None:
    m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", owner)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def lock_check(facts: dict, now: float) -> Check:
    """The stack lock: held too long, an owner file left behind, an interrupted task."""
    holder = parse_holder("\n".join(facts.get("holder", [])))
    if holder is not None and holder.mode == "shared":
        return Check("deploy lock", OK, f"backups running now ({holder})")
    if holder is not None:
        owner = str(holder)
        since = _since(owner)
        age = f"{(now - since) / 3600:.1f} h" if since else "an unknown time"
        if since is None or now - since > STALE_LOCK_SECONDS:
            return Check("deploy lock", WARN, f"held for {age} by {owner}",
                         "if that task is not running any more: deploy.unlock")
        return Check("deploy lock", OK, f"a task holds it now ({owner})")
    if facts.get("ownerfile"):
        _, _, owner = facts["ownerfile"].partition(" ")
        return Check("deploy lock", WARN, f"free, but an owner file is left ({owner.strip()})",
                     "a task was killed; deploy.unlock (or remove the lock.owner file)")
    stopped = interrupted(facts.get("journal", []))
    if stopped is not None:
        return Check("deploy lock", WARN, f"free; the last task did not finish: "
                     f"{stopped.describe()}", "deploy --dry-run shows what the next deploy "
                     "converges; deploy again")
    return Check("deploy lock", OK, "free")


def judge(settings: Settings, facts: dict, *, ssh: Check, sudo: Check,
          skew: float | None, uncertainty: float) -> list[Check]:
    now = facts.get("now") or time.time()
    return [
        ssh, sudo,
        *disk_checks(settings, facts),
        memory_check(facts),
        *docker_checks(facts),
        clock_check(facts, skew, uncertainty),
        *dns_checks(facts),
        ports_check(settings, facts),
        *cert_checks(settings, facts, now),
        *backup_checks(settings, facts, now),
        env_check(settings, facts),
        lock_check(facts, now),
    ]


def overall(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.check) for c in checks)
    out = []
    for c in checks:
        out.append(f"{c.status.upper():4}  {c.check.ljust(width)}  {c.detail}")
        if c.fix and c.status != OK:
            out.append(f"{'':4}  {'':{width}}  -> {c.fix}")
    return "\n".join(out)


# --- the task ----------------------------------------------------------------------------


def access_checks(host: Host, settings: Settings) -> tuple[Check, Check, bool]:
    """SSH/host key and privileges; (ssh, sudo, privileged commands work)."""
    r = host.check("id -un; id -u; sudo -n true 2>/dev/null && echo sudo-ok", timeout=30)
    lines = r.stdout.split()
    user = lines[0] if lines else "?"
    if host.is_remote:
        ssh = Check("ssh", OK, f"connected to {host.name}, host key verified against "
                    "known_hosts")
    else:
        ssh = Check("ssh", OK, "running on the server itself (no SSH)")
    root = len(lines) > 1 and lines[1] == "0"
    if root:
        return ssh, Check("sudo", OK, f"running as root ({user})"), True
    if "sudo-ok" in lines and settings.sudo:
        return ssh, Check("sudo", OK, f"{user}: sudo -n works"), True
    if "sudo-ok" in lines:
        return ssh, Check("sudo", FAIL, f"{user} is not root and settings.sudo is false",
                          "set sudo: true in maicivy.yaml"), False
    return ssh, Check("sudo", FAIL, f"{user} is not root and sudo -n asks for a password",
                      f"allow {user} passwordless sudo (NOPASSWD) or connect as root"), False


def run_doctor(host: Host, settings: Settings) -> list[Check]:
    ssh, sudo, privileged = access_checks(host, settings)
    t0 = time.time()
    r = host.check(facts_command(settings), sudo=privileged, timeout=120)
    t1 = time.time()
    facts = parse_facts(r.stdout)
    skew = None
    uncertainty = (t1 - t0) / 2
    if host.is_remote and facts.get("now"):
        skew = facts["now"] - (t0 + t1) / 2
    return judge(settings, facts, ssh=ssh, sudo=sudo, skew=skew, uncertainty=uncertainty)


@ops_task(help={"json_": "print JSON (for machines) instead of the lines"})
def doctor(c, json_=False):
    """Preflight: is this server ready for (and still fit for) the stack? Changes nothing.

    Checks SSH and the host key, sudo -n, disk space and inodes, memory, the
    Docker and Compose versions, the clock, that DNS of domain and
    grafana_domain points at this server, ports published past ufw (Docker's
    rules bypass it), certificate days left, backup freshness and the
    off-site copy, .env (mode 600, secrets set) and a stale deploy lock.
    Each line says ok / warn / fail and what to do. Exit 0 all ok, 1 a
    warning, 2 a failure.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    checks = run_doctor(host, settings)
    status = overall(checks)
    if json_:
        print(json.dumps({"host": host.name, "status": status, "exit_code": EXIT_CODES[status],
                          "checks": [asdict(x) for x in checks]}, indent=2))
    else:
        print(format_checks(checks))
        print(f"{status.upper()}: {host.name}, {len(checks)} checks")
    sys.stdout.flush()
    if status != OK:
        raise Exit(code=EXIT_CODES[status])
