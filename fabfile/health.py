"""Health of the running stack, checked on the server, all checks at once.

One shell script is sent to the server (one SSH round trip from a laptop, or
run locally by ``inv`` on the server). It starts every check in the
background, each one bounded by ``health.timeout_seconds`` (``timeout``), waits
for all of them and prints their raw results; the verdicts are computed here
from those results by pure functions.

Checks: the site (frontend), the backend's ``/health`` and ``/health/deep``,
Grafana's ``/api/health`` -- all through nginx on the server's HTTPS port with
the real host names (SNI), so they prove the whole path; Prometheus
readiness (inside its container: it is not published); the state and health
of every compose service; the days left on the certificate nginx serves for
each name; the free space on the filesystems holding Docker's data (the
volumes), the stack and the backups.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass

from invoke import Exit

from .config import SERVICES, Settings
from .core import host_for, ops_task, settings_for
from .errors import OpsError
from .host import Host
from .ssl import cert_names, local_address, parse_x509, served_cert_command

OK, WARNING, CRITICAL = "ok", "warning", "critical"
EXIT_CODES = {OK: 0, WARNING: 1, CRITICAL: 2}
_ID = re.compile(r"^[a-z0-9_]+$")
# One short line per container. The docker CLI, not compose: compose parses the
# whole project first and costs ten times as much CPU, which the parallel
# checks would share on a small server.
PS_FORMAT = '@@ps {{.Label "com.docker.compose.service"}}|{{.State}}|{{.Status}}'


class HealthUnknown(OpsError):
    """The checks could not run at all: as bad as a critical result."""

    exit_code = 2


@dataclass
class Probe:
    """One command the script runs on the server, in the background."""

    id: str
    label: str
    command: str
    parts: tuple[str, ...] = ()  # the checks a combined probe makes (http)


@dataclass
class Row:
    check: str
    status: str
    detail: str
    seconds: float | None = None


# --- the probes -------------------------------------------------------------------


def http_endpoints(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(key, label, host name, path) of the checks made through nginx."""
    h = settings.health
    return [
        ("frontend", "frontend", settings.domain, h.frontend_path),
        ("backend", f"backend {h.backend_path}", settings.domain, h.backend_path),
        ("backend_deep", f"backend {h.backend_deep_path}", settings.domain, h.backend_deep_path),
        ("grafana", "grafana", settings.grafana_domain, "/api/health"),
    ]


# (a --write-out starting with "@" would name a file to read the format from)
_WRITE_OUT = "~~t %{filename_effective}|%{http_code}|%{time_total}|%{exitcode}|%{errormsg}\\n"


def _http_command(settings: Settings, keys: list[str], timeout: float) -> str:
    """One curl, all requests at once (--parallel), through nginx with SNI.

    Each transfer gets ``timeout`` (--max-time is per transfer); the bodies
    go to files in the script's temporary directory and are printed after.
    """
    port = settings.publish.https
    address = local_address(settings)
    target = f"[{address}]" if ":" in address else address
    chosen = [e for e in http_endpoints(settings) if e[0] in keys]
    hosts = sorted({host for _, _, host, _ in chosen})
    parts = ["curl -s -k --parallel --parallel-immediate --parallel-max 16",
             f"--max-time {timeout:g}"]
    parts += [f"--resolve {shlex.quote(f'{h}:{port}:{target}')}" for h in hosts]
    parts.append(f"-w '{_WRITE_OUT}'")
    for key, _, host, path in chosen:
        parts.append(f"-o \"$T/http.{key}\" {shlex.quote(f'https://{host}:{port}{path}')}")
    bodies = " ".join(key for key, _, _, _ in chosen)
    return (" ".join(parts) + f" 2>/dev/null; for k in {bodies}; do echo \"@@body $k\"; "
            "head -c 2000 \"$T/http.$k\" 2>/dev/null; echo; done")


def http_probe(settings: Settings, keys: list[str] | None = None) -> Probe:
    """The probe of the HTTP checks (all of them, or only ``keys``)."""
    keys = keys or [e[0] for e in http_endpoints(settings)]
    return Probe("http", "http", _http_command(settings, keys,
                                                float(settings.health.timeout_seconds)),
                 parts=tuple(keys))


def disk_paths(settings: Settings) -> list[tuple[str, str]]:
    """(label, path) of the filesystems whose free space is checked."""
    return [("data volume", ""), ("stack", settings.root), ("backups", settings.backup.dir)]


def _disk_command(settings: Settings) -> str:
    """df of the database volume (Docker's data root if there is none), stack, backups."""
    paths = " ".join(shlex.quote(p) for _, p in disk_paths(settings)[1:])
    volume = shlex.quote(f"{settings.compose_project}_postgres_data")
    return (
        f"root=$(docker volume inspect --format '{{{{.Mountpoint}}}}' {volume} 2>/dev/null "
        "|| docker info --format '{{.DockerRootDir}}' 2>/dev/null || true); "
        "set --; for p in \"$root\" " + paths + "; do "
        "if [ -n \"$p\" ] && [ -e \"$p\" ]; then echo \"@@path $p\"; set -- \"$@\" \"$p\"; fi; "
        "done; echo \"@@docker $root\"; echo @@df; df -P -k \"$@\""
    )


def _cert_command(settings: Settings, domain: str, timeout: float) -> str:
    """The certificate nginx serves for ``domain``: curl (>= 7.88) or openssl.

    ``/../`` with --path-as-is is refused by nginx itself (400), so no
    upstream is involved: only the TLS handshake matters here.
    """
    port = settings.publish.https
    address = local_address(settings)
    resolve = f"{domain}:{port}:{f'[{address}]' if ':' in address else address}"
    curl = (f"curl -sk --path-as-is --max-time {timeout + 1:g} --resolve {shlex.quote(resolve)} "
            f"-o /dev/null -w '%{{certs}}' {shlex.quote(f'https://{domain}:{port}/../')}")
    return (f"out=$({curl} 2>&1); case \"$out\" in *'Expire date:'*) "
            f"printf '%s\\n' \"$out\";; *) {served_cert_command(settings, domain, timeout)};; "
            "esac")


def curl_certs_to_x509(text: str) -> str:
    """curl's ``%{certs}`` (leaf first) as ``openssl x509 -serial -issuer ...`` lines."""
    names = {"Subject": "subject", "Issuer": "issuer", "Serial Number": "serial",
             "Expire date": "notAfter"}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if key == "Subject" and "subject" in out:
            break  # the next certificate of the chain
        if sep and key in names:
            out[names[key]] = value.strip()
    return "\n".join(f"{k}={v}" for k, v in out.items())


def _project_filter(settings: Settings) -> str:
    return (f"--filter label=com.docker.compose.project={shlex.quote(settings.compose_project)} "
            "--filter label=com.docker.compose.oneoff=False")


def _ps_command(settings: Settings) -> str:
    return f"docker ps -a {_project_filter(settings)} --format {shlex.quote(PS_FORMAT)}"


def _prometheus_ready(settings: Settings, timeout: float) -> str:
    """Prometheus' /-/ready from inside its network namespace (it is not published).

    As root: nsenter into the container's network namespace and use the
    server's curl (a few ms); otherwise ``docker exec`` its wget (~0.1 s more).
    """
    url = f"http://127.0.0.1:{settings.ports.prometheus}/-/ready"
    name = shlex.quote(f"{settings.compose_project}-prometheus-1")  # compose's own name
    return (f"c={name}; pid=$(docker inspect --format '{{{{.State.Pid}}}}' \"$c\" 2>/dev/null); "
            "if [ \"${pid:-0}\" -le 0 ]; then "
            f"c=$(docker ps -q {_project_filter(settings)} "
            "--filter label=com.docker.compose.service=prometheus --filter status=running); "
            "c=${c%%$'\\n'*}; "
            "if [ -z \"$c\" ]; then echo 'no running prometheus container'; exit 1; fi; "
            "pid=$(docker inspect --format '{{.State.Pid}}' \"$c\"); fi; "
            "if [ \"$EUID\" = 0 ] && [ \"${pid:-0}\" -gt 0 ] && command -v nsenter >/dev/null; "
            f"then exec nsenter -t \"$pid\" -n curl -sS -f --max-time {timeout + 1:g} {url}; fi; "
            f"exec docker exec \"$c\" wget -q -O - {url}")


def probes(settings: Settings) -> list[Probe]:
    """Every check of health.check, as commands to run on the server."""
    t = float(settings.health.timeout_seconds)
    out = [
        http_probe(settings),
        Probe("prometheus", "prometheus", _prometheus_ready(settings, t)),
        Probe("services", "services", _ps_command(settings)),
    ]
    for i, name in enumerate(cert_names(settings)):
        out.append(Probe(f"cert_{i}", f"certificate {name}", _cert_command(settings, name, t)))
    out.append(Probe("disk", "disk", _disk_command(settings)))
    return out


def probe_script(selected: list[Probe], timeout: float, parallel: bool = True) -> str:
    """Bash: run every probe in the background under ``timeout``, then print results.

    Output: ``@@probe <id> <exit code> <milliseconds>`` followed by (the end of)
    what the probe printed. Exit code 124 means the probe timed out.
    ``parallel=False`` runs them one after another (the benchmark's baseline).
    """
    for p in selected:
        if not _ID.match(p.id):
            raise ValueError(f"bad probe id {p.id!r}")
    ids = " ".join(p.id for p in selected)
    lines = [
        "set -u",
        "export LC_ALL=C",
        'T=$(mktemp -d "${TMPDIR:-/tmp}/maicivy-health.XXXXXX") || exit 90',
        "export T",
        "trap 'rm -rf \"$T\"' EXIT",
        "probe() {",
        "  local id=$1 t=${EPOCHREALTIME:-0.0}",
        "  local start=${t/./}",
        f"  timeout -k 1 {timeout + 1:g} bash -c \"$2\" >\"$T/$id.out\" 2>&1 </dev/null",
        "  local rc=$?",
        "  t=${EPOCHREALTIME:-0.0}",
        "  echo \"$rc $(( (${t/./} - start) / 1000 ))\" >\"$T/$id.rc\"",
        "}",
    ]
    for p in selected:
        lines.append(f"probe {p.id} {shlex.quote(p.command)}" + (" &" if parallel else ""))
    lines += [
        "wait",
        f"for id in {ids}; do",
        "  rc='125 0'; if [ -f \"$T/$id.rc\" ]; then read -r rc <\"$T/$id.rc\"; fi",
        "  echo \"@@probe $id $rc\"",
        "  tail -c 8192 \"$T/$id.out\" 2>/dev/null; echo",
        "done",
    ]
    return "\n".join(lines) + "\n"


def parse_probe_output(text: str) -> dict[str, tuple[int, int, str]]:
    """``{probe id: (exit code, milliseconds, output)}``."""
    results: dict[str, tuple[int, int, list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^@@probe ([a-z0-9_]+) (-?\d+) (-?\d+)$", line)
        if m:
            current = m.group(1)
            results[current] = (int(m.group(2)), int(m.group(3)), [])
        elif current is not None:
            results[current][2].append(line)
    return {k: (rc, ms, "\n".join(lines).strip("\n")) for k, (rc, ms, lines) in results.items()}


# --- verdicts ---------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def _timed_out(rc: int, output: str) -> bool:
    return rc in (124, 137) or (rc == 28 and "timed out" in output.lower())


def http_row(label: str, rc: int, output: str, timeout: float, seconds: float,
             expect=None) -> Row:
    """Verdict of a curl probe (body, then the HTTP status on the last line)."""
    if _timed_out(rc, output):
        return Row(label, CRITICAL, f"no answer within {timeout:g}s", seconds)
    body, _, code = output.rpartition("\n")
    code = code.strip()
    if rc != 0 or not code.isdigit() or code == "000":
        return Row(label, CRITICAL, f"unreachable: {_last_line(body or output)}", seconds)
    status = int(code)
    if not 200 <= status < 400:
        return Row(label, CRITICAL, f"HTTP {status}{_body_hint(body)}", seconds)
    if expect is not None:
        problem = expect(body)
        if problem:
            return Row(label, CRITICAL, f"HTTP {status} but {problem}", seconds)
    return Row(label, OK, f"HTTP {status}", seconds)


def http_rows(settings: Settings, keys: tuple[str, ...], rc: int, output: str,
              timeout: float) -> list[Row]:
    """Rows of the HTTP checks from the combined curl's write-out lines and bodies."""
    transfers: dict[str, list[str]] = {}
    bodies: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("~~t "):
            fields = (line[4:].split("|", 4) + [""] * 5)[:5]
            transfers[fields[0].rsplit("/http.", 1)[-1]] = fields[1:]
            current = None
        elif line.startswith("@@body "):
            current = line[7:].strip()
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    rows = []
    for key, label, _, _ in http_endpoints(settings):
        if key not in keys:
            continue
        if key not in transfers:
            detail = (f"no answer within {timeout:g}s" if _timed_out(rc, output)
                      else f"unreachable: {_last_line(output)}")
            rows.append(Row(label, CRITICAL, detail))
            continue
        code, took, exitcode, error = transfers[key]
        body = "\n".join(bodies.get(key, [])).strip("\n")
        curl_rc = int(exitcode) if exitcode.strip().isdigit() else (0 if code != "000" else 1)
        text = (error or "no answer") if curl_rc else body
        seconds = round(float(took), 3) if took.replace(".", "", 1).isdigit() else None
        expect = _grafana_ok if key == "grafana" else None
        rows.append(http_row(label, curl_rc, f"{text}\n{code}", timeout, seconds, expect))
    return rows


def _body_hint(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict) and isinstance(data.get("checks"), dict):
        bad = [f"{k}: {v.get('error') or v.get('status')}" for k, v in data["checks"].items()
               if isinstance(v, dict) and v.get("status") != "ok"]
        if bad:
            return " (" + "; ".join(bad)[:200] + ")"
    if isinstance(data, dict) and data.get("status"):
        return f" (status {data['status']})"
    return ""


def _grafana_ok(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return "the answer is not Grafana's health JSON"
    if isinstance(data, dict) and data.get("database", "ok") != "ok":
        return f"database {data.get('database')}"
    return ""


def _container(state: str, status: str) -> tuple[str, str]:
    """(verdict, detail) of one container from ``docker ps`` State and Status."""
    state = state.lower()
    m = re.search(r"\((healthy|unhealthy|health: starting)\)", status)
    health_ = m.group(1).replace("health: ", "") if m else ""
    if state != "running":
        code = re.match(r"Exited \((-?\d+)\)", status)
        detail = state or "unknown state"
        if code:
            detail += f" (exit code {code.group(1)})"
        return CRITICAL, detail
    if health_ in ("", "healthy"):
        return OK, health_ or "running (no health check)"
    if health_ == "starting":
        return WARNING, "starting"
    return CRITICAL, health_


def service_rows(settings: Settings, rc: int, output: str, seconds: float) -> list[Row]:
    """One row per compose service from ``docker ps --format PS_FORMAT``.

    A service with several containers (a deploy in progress) counts as its
    best one: it is what nginx can send traffic to.
    """
    if rc != 0:
        detail = ("docker did not answer in time" if _timed_out(rc, output)
                  else f"docker ps failed: {_last_line(output)}")
        return [Row(f"service {s}", CRITICAL, detail, seconds) for s in SERVICES]
    rank = {OK: 0, WARNING: 1, CRITICAL: 2}
    found: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        if not line.startswith("@@ps "):
            continue
        service, state, status = (line[5:].split("|", 2) + ["", ""])[:3]
        verdict = _container(state, status)
        if service not in found or rank[verdict[0]] < rank[found[service][0]]:
            found[service] = verdict
    rows = []
    for service in SERVICES:
        verdict, detail = found.get(service, (CRITICAL, "no container (not created)"))
        rows.append(Row(f"service {service}", verdict, detail, seconds))
    return rows


def cert_row(settings: Settings, name: str, rc: int, output: str, now: float,
             timeout: float, seconds: float) -> Row:
    label = f"certificate {name}"
    if _timed_out(rc, output):
        return Row(label, CRITICAL, f"no TLS answer within {timeout:g}s", seconds)
    if "Expire date:" in output:
        output = curl_certs_to_x509(output)
    info = parse_x509(name, "served", output, now)
    if info.error or info.days_left is None:
        return Row(label, CRITICAL, info.error or "unreadable certificate", seconds)
    days = info.days_left
    detail = f"{days:.0f} days left (expires {info.not_after[:10]}, {info.issuer})"
    if info.self_signed:
        detail += ", self-signed stand-in"
    if days < settings.tls.critical_days:
        return Row(label, CRITICAL, detail, seconds)
    if days < settings.tls.warn_days:
        return Row(label, WARNING, detail, seconds)
    return Row(label, OK, detail, seconds)


def disk_rows(settings: Settings, rc: int, output: str, seconds: float) -> list[Row]:
    """One row per filesystem (several of our paths can share one)."""
    if _timed_out(rc, output):
        return [Row("disk", CRITICAL, "df did not answer in time", seconds)]
    docker_root = ""
    paths: list[str] = []
    table: list[list[str]] = []
    in_df = False
    for line in output.splitlines():
        if line.startswith("@@docker "):
            docker_root = line[len("@@docker "):].strip()
        elif line.startswith("@@path "):
            paths.append(line[len("@@path "):])
        elif line == "@@df":
            in_df = True
        elif in_df and line.strip() and not line.startswith("Filesystem"):
            table.append(line.split())
    # df prints one line per argument, in order
    found = list(zip(paths, table, strict=False))
    labels = {p: label for label, p in disk_paths(settings) if p}
    by_mount: dict[str, tuple[int, int, list[str]]] = {}
    for path, fields in found:
        if len(fields) < 6 or not fields[4].rstrip("%").isdigit():
            continue
        mount, used = fields[5], int(fields[4].rstrip("%"))
        avail_kb = int(fields[3]) if fields[3].isdigit() else 0
        label = "data volume" if path == docker_root else labels.get(path, path)
        by_mount.setdefault(mount, (used, avail_kb, []))[2].append(label)
    if not by_mount:
        return [Row("disk", CRITICAL, f"df gave nothing: {_last_line(output)}", seconds)]
    rows = []
    for mount, (used, avail_kb, names) in by_mount.items():
        detail = f"{used}% used, {avail_kb / 1024 / 1024:.1f} GiB free ({', '.join(names)})"
        if used >= settings.health.disk_critical_percent:
            status = CRITICAL
        elif used >= settings.health.disk_warn_percent:
            status = WARNING
        else:
            status = OK
        rows.append(Row(f"disk {mount}", status, detail, seconds))
    return rows


def evaluate(settings: Settings, selected: list[Probe],
             results: dict[str, tuple[int, int, str]], now: float | None = None) -> list[Row]:
    """Turn raw probe results into the rows health.check prints."""
    timeout = float(settings.health.timeout_seconds)
    now = time.time() if now is None else now
    names = dict(zip((f"cert_{i}" for i in range(10)), cert_names(settings), strict=False))
    rows: list[Row] = []
    for p in selected:
        if p.id not in results:
            labels = [e[1] for e in http_endpoints(settings) if e[0] in p.parts] or [p.label]
            rows += [Row(label, CRITICAL, "the check did not report (script cut short?)")
                     for label in labels]
            continue
        rc, ms, output = results[p.id]
        seconds = round(ms / 1000, 3)
        if p.id == "http":
            rows.extend(http_rows(settings, p.parts, rc, output, timeout))
        elif p.id == "prometheus":
            if _timed_out(rc, output):
                rows.append(Row(p.label, CRITICAL, f"no answer within {timeout:g}s", seconds))
            elif rc == 0:
                rows.append(Row(p.label, OK, "ready", seconds))
            else:
                rows.append(Row(p.label, CRITICAL, f"not ready: {_last_line(output)}", seconds))
        elif p.id == "services":
            rows.extend(service_rows(settings, rc, output, seconds))
        elif p.id.startswith("cert_"):
            rows.append(cert_row(settings, names[p.id], rc, output, now, timeout, seconds))
        elif p.id == "disk":
            rows.extend(disk_rows(settings, rc, output, seconds))
    return rows


def overall(rows: list[Row]) -> str:
    if any(r.status == CRITICAL for r in rows):
        return CRITICAL
    if any(r.status == WARNING for r in rows):
        return WARNING
    return OK


# --- output -----------------------------------------------------------------------

_COLOURS = {OK: "\033[32m", WARNING: "\033[33m", CRITICAL: "\033[31m"}
_WORDS = {OK: "OK", WARNING: "WARN", CRITICAL: "CRIT"}


def format_table(rows: list[Row], colour: bool = False) -> str:
    width = max([len(r.check) for r in rows] + [5])
    out = []
    for r in rows:
        word = _WORDS[r.status].ljust(4)
        if colour:
            word = f"{_COLOURS[r.status]}{word}\033[0m"
        took = f"{r.seconds:6.2f}s" if r.seconds is not None else "      -"
        out.append(f"{word}  {r.check.ljust(width)}  {took}  {r.detail}")
    return "\n".join(out)


def as_json(rows: list[Row], elapsed: float, host_name: str) -> str:
    status = overall(rows)
    return json.dumps({
        "host": host_name,
        "status": status,
        "exit_code": EXIT_CODES[status],
        "seconds": round(elapsed, 3),
        "checks": [asdict(r) for r in rows],
    }, indent=2)


# --- running ----------------------------------------------------------------------


def run_probes(host: Host, settings: Settings, selected: list[Probe],
               parallel: bool = True) -> tuple[list[Row], float]:
    """Run the given probes on the server in parallel; (rows, wall-clock seconds)."""
    timeout = float(settings.health.timeout_seconds)
    script = probe_script(selected, timeout, parallel=parallel)
    start = time.monotonic()
    budget = timeout + 30 if parallel else (timeout + 2) * len(selected) + 30
    r = host.check(f"bash -c {shlex.quote(script)}", sudo=True, timeout=budget)
    elapsed = time.monotonic() - start
    results = parse_probe_output(r.stdout)
    if not results:
        raise HealthUnknown(f"the health checks did not run on {host.name}: "
                            f"{_last_line(r.stderr or r.stdout)}")
    return evaluate(settings, selected, results), elapsed


def check_health(host: Host, settings: Settings) -> tuple[list[Row], float]:
    """Every check of health.check: (rows, wall-clock seconds)."""
    return run_probes(host, settings, probes(settings))


@ops_task(help={"json_": "print JSON (for machines) instead of the table"})
def check(c, json_=False):
    """Check the whole stack, all checks in parallel; exit 0 ok, 1 warning, 2 critical.

    Runs on the server (inv health.check, e.g. from cron) or from a laptop
    (fab -H vps health.check): the checks always run on the server. It checks
    the site, the backend's /health and /health/deep, Grafana (all through
    nginx with the real host names), Prometheus readiness, the state of every
    compose service, the days left on each certificate nginx serves (warning
    under tls.warn_days, critical under tls.critical_days) and free disk space
    (health.disk_warn_percent / disk_critical_percent). Each check gives up
    after health.timeout_seconds. Prints a table (coloured on a terminal),
    or JSON with --json.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    rows, elapsed = check_health(host, settings)
    status = overall(rows)
    if json_:
        print(as_json(rows, elapsed, host.name))
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(format_table(rows, colour=colour))
        print(f"{_WORDS[status]}: {host.name}, {len(rows)} checks in {elapsed:.2f}s")
    sys.stdout.flush()
    if status != OK:
        raise Exit(code=EXIT_CODES[status])
