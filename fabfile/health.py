"""Health of the running stack, checked on the server, all checks at once.

One shell script (scripts/health-probes.sh) is sent to the server (one SSH
round trip from a laptop, or run locally by ``inv`` on the server). It starts every check in the
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
import sys
import time
from dataclasses import asdict, dataclass

from invoke import Collection, Exit

from .config import SERVICES, Settings
from .core import host_for, ops_task, settings_for
from .errors import OpsError
from .host import Host
from .shell import q, script
from .shell import sections as framed
from .ssl import cert_names, local_address, parse_x509

OK, WARNING, CRITICAL = "ok", "warning", "critical"
EXIT_CODES = {OK: 0, WARNING: 1, CRITICAL: 2}
_ID = re.compile(r"^[a-z0-9_]+$")


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


_CERT_FIELDS = ("Subject:", "Issuer:", "Serial Number:", "Expire date:")
PROBES = script(__file__, "scripts/health-probes.sh")
HTTP = script(__file__, "scripts/health-http.sh")
DOCKER = script(__file__, "scripts/health-docker.sh")


def cert_endpoints(settings: Settings) -> list[tuple[str, str]]:
    """(key, host name) of the certificate checks (one per name nginx has a cert for)."""
    return [(f"cert_{i}", name) for i, name in enumerate(cert_names(settings))]


def _http_command(settings: Settings, keys: list[str], timeout: float) -> str:
    """One curl, all requests at once, through nginx with SNI (scripts/health-http.sh).

    The certificate checks request ``/../``; bodies go to files in the probe's
    temporary directory and are printed after.
    """
    chosen = [(k, h, path) for k, _, h, path in http_endpoints(settings) if k in keys]
    chosen += [(k, h, "/../") for k, h in cert_endpoints(settings) if k in keys]
    return HTTP.command(f"{timeout:g}", settings.publish.https, local_address(settings),
                        *[word for transfer in chosen for word in transfer])


def http_probe(settings: Settings, keys: list[str] | None = None, id: str = "http") -> Probe:
    """The probe of the checks made through nginx: HTTP and certificates (or only ``keys``)."""
    keys = keys or ([e[0] for e in http_endpoints(settings)]
                    + [k for k, _ in cert_endpoints(settings)])
    return Probe(id, "http", _http_command(settings, keys,
                                            float(settings.health.timeout_seconds)),
                 parts=tuple(keys))


def disk_paths(settings: Settings) -> list[tuple[str, str]]:
    """(label, path) of the filesystems whose free space is checked."""
    return [("data volume", ""), ("stack", settings.root), ("backups", settings.backup.dir)]


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


DOCKER_PARTS = ("prometheus", "services", "disk")


def _docker_command(settings: Settings, parts: tuple[str, ...], timeout: float) -> str:
    """docker ps + ONE docker inspect of the stack, then Prometheus readiness and df
    (scripts/health-docker.sh)."""
    url = f"http://127.0.0.1:{settings.ports.prometheus}/-/ready"
    return DOCKER.command(settings.compose_project, " ".join(parts), f"{timeout:g}", url,
                          *[p for _, p in disk_paths(settings)[1:]])


def docker_probe(settings: Settings, parts: tuple[str, ...] = DOCKER_PARTS,
                 id: str = "docker") -> Probe:
    """The probe of the checks made through Docker (all of them, or only ``parts``)."""
    return Probe(id, "docker", _docker_command(settings, parts,
                                                float(settings.health.timeout_seconds)),
                 parts=tuple(f"docker:{p}" for p in parts))


def maintenance_probe(settings: Settings) -> Probe:
    """Whether the maintenance page is up (app.maintenance-on): the flag's note."""
    from .app import maintenance_flag

    flag = q(maintenance_flag(settings))
    return Probe("maintenance", "maintenance",
                 f"if [ -e {flag} ]; then echo \"on $(head -c 200 {flag} | head -n 1)\"; "
                 "else echo off; fi")


def maintenance_row(rc: int, output: str, seconds: float) -> Row:
    text = output.strip()
    if text.startswith("on"):
        return Row("maintenance", WARNING, f"ON {text[2:].strip()}: the site answers 503; "
                   "app.maintenance-off ends it", seconds)
    if rc == 0 and text == "off":
        return Row("maintenance", OK, "off", seconds)
    return Row("maintenance", WARNING, f"unknown: {_last_line(output)}", seconds)


def probes(settings: Settings) -> list[Probe]:
    """Every check of health.check, as commands to run on the server (three probes)."""
    return [http_probe(settings), docker_probe(settings), maintenance_probe(settings)]


def probe_command(selected: list[Probe], timeout: float, parallel: bool = True) -> str:
    """Run every probe in the background under ``timeout``, then print the results
    (scripts/health-probes.sh).

    Output: ``@@probe <id> <exit code> <milliseconds>`` followed by (the end of)
    what the probe printed. Exit code 124 means the probe timed out.
    ``parallel=False`` runs them one after another (the benchmark's baseline).
    """
    for p in selected:
        if not _ID.match(p.id):
            raise ValueError(f"bad probe id {p.id!r}")
    return PROBES.command(f"{timeout + 1:g}", 1 if parallel else 0,
                          *[word for p in selected for word in (p.id, p.command)])


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


def parse_curl(output: str) -> tuple[dict[str, list[str]], dict[str, list[str]],
                                     dict[str, list[str]]]:
    """(transfers, certificates, bodies) of scripts/health-http.sh's output, by key.

    A transfer is [http code, seconds, curl exit code, error]; a certificate is
    curl's ``%{certs}`` lines (or openssl's fallback); a body, its lines.
    """
    transfers: dict[str, list[str]] = {}
    certs: dict[str, list[str]] = {}
    bodies: dict[str, list[str]] = {}
    current = None
    cert_of = None
    for line in output.splitlines():
        if line.startswith("~~t "):
            fields = (line[4:].split("|", 4) + [""] * 5)[:5]
            cert_of = fields[0].rsplit("/http.", 1)[-1]
            transfers[cert_of] = fields[1:]
            certs[cert_of] = []
            current = None
        elif line.startswith(("@@body ", "@@openssl ")):
            current = line.split(" ", 1)[1].strip()
            cert_of = None
            (bodies if line.startswith("@@body ") else certs)[current] = []
        elif current is not None:
            (bodies if current in bodies else certs)[current].append(line)
        elif cert_of is not None and line.startswith(_CERT_FIELDS):
            certs[cert_of].append(line)
    return transfers, certs, bodies


def http_rows(settings: Settings, keys: tuple[str, ...], rc: int, output: str,
              timeout: float, now: float | None = None) -> list[Row]:
    """Rows of the HTTP and certificate checks from the combined curl's output."""
    now = time.time() if now is None else now
    transfers, certs, bodies = parse_curl(output)
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
        expect = _grafana_ok if key == "grafana" else None
        rows.append(http_row(label, curl_rc, f"{text}\n{code}", timeout, _seconds(took), expect))
    for key, name in cert_endpoints(settings):
        if key in keys:
            rows.append(_served_cert_row(settings, name, transfers.get(key), certs.get(key, []),
                                         rc, now, timeout))
    return rows


def _served_cert_row(settings: Settings, name: str, transfer: list[str] | None,
                     lines: list[str], rc: int, now: float, timeout: float) -> Row:
    """The certificate row of one name: what its transfer was served (or why not)."""
    took = _seconds(transfer[1]) if transfer else None
    if not lines and transfer and transfer[2] not in ("", "0"):
        lines = [transfer[3]]
        cert_rc = 28 if transfer[2] == "28" else 1
    else:
        cert_rc = 0 if lines else rc
    text = "\n".join(lines)
    if "Expire date:" in text:
        text = curl_certs_to_x509(text)
    return cert_row(settings, name, cert_rc, text, now, timeout, took)


def _seconds(text: str) -> float | None:
    try:
        return round(float(text), 3)
    except ValueError:
        return None


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


def _container(state: str, health_: str, code: str) -> tuple[str, str]:
    """(verdict, detail) of one container from docker inspect's State."""
    state, health_ = state.lower(), health_.lower()
    if state != "running":
        detail = state or "unknown state"
        if state == "exited" and code.strip().lstrip("-").isdigit():
            detail += f" (exit code {code.strip()})"
        return CRITICAL, detail
    if health_ in ("", "healthy"):
        return OK, health_ or "running (no health check)"
    if health_ == "starting":
        return WARNING, "starting"
    return CRITICAL, health_


def service_rows(settings: Settings, rc: int, output: str, seconds: float) -> list[Row]:
    """One row per compose service from the ``@@c`` lines of the docker probe.

    A service with several containers (a deploy in progress) counts as its
    best one: it is what nginx can send traffic to.
    """
    if rc != 0 and "@@c " not in output:
        detail = ("docker did not answer in time" if _timed_out(rc, output)
                  else f"docker failed: {_last_line(output)}")
        return [Row(f"service {s}", CRITICAL, detail, seconds) for s in SERVICES]
    rank = {OK: 0, WARNING: 1, CRITICAL: 2}
    found: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        if not line.startswith("@@c "):
            continue
        service, state, health_, code = (line[4:].split("|") + ["", "", ""])[:4]
        verdict = _container(state, health_, code)
        if service not in found or rank[verdict[0]] < rank[found[service][0]]:
            found[service] = verdict
    rows = []
    for service in SERVICES:
        verdict, detail = found.get(service, (CRITICAL, "no container (not created)"))
        rows.append(Row(f"service {service}", verdict, detail, seconds))
    return rows


def docker_rows(settings: Settings, parts: tuple[str, ...], rc: int, output: str,
                timeout: float, seconds: float) -> list[Row]:
    """Rows of Prometheus readiness, every service and the disks, from the docker probe."""
    sections = {name: "\n".join(lines) for name, lines in framed(output).items()}
    rows: list[Row] = []
    if "docker:prometheus" in parts:
        text = sections.get("prometheus")
        m = re.search(r"^@@rc (\d+)$", text or "", re.M)
        if text is None or m is None:
            detail = (f"no answer within {timeout:g}s" if _timed_out(rc, output)
                      else f"not checked: {_last_line(output)}")
            rows.append(Row("prometheus", CRITICAL, detail, seconds))
        else:
            body = text[:m.start()].strip()
            code = int(m.group(1))
            if code == 0:
                rows.append(Row("prometheus", OK, "ready", seconds))
            elif _timed_out(code, body):
                rows.append(Row("prometheus", CRITICAL, f"no answer within {timeout:g}s",
                                seconds))
            else:
                rows.append(Row("prometheus", CRITICAL, f"not ready: {_last_line(body)}",
                                seconds))
    if "docker:services" in parts:
        text = sections.get("services")
        rows.extend(service_rows(settings, 0 if text is not None else (rc or 1),
                                 text if text is not None else output, seconds))
    if "docker:disk" in parts:
        text = sections.get("disk")
        rows.extend(disk_rows(settings, 0 if text is not None else (rc or 1),
                              text if text is not None else output, seconds))
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
    rows: list[Row] = []
    for p in selected:
        if p.id not in results:
            labels = ([e[1] for e in http_endpoints(settings) if e[0] in p.parts]
                      + [f"certificate {n}" for k, n in cert_endpoints(settings) if k in p.parts]
                      + (["prometheus"] if "docker:prometheus" in p.parts else [])
                      + ([f"service {x}" for x in SERVICES] if "docker:services" in p.parts
                         else [])
                      + (["disk"] if "docker:disk" in p.parts else [])
                      or [p.label])
            rows += [Row(label, CRITICAL, "the check did not report (script cut short?)")
                     for label in labels]
            continue
        rc, ms, output = results[p.id]
        seconds = round(ms / 1000, 3)
        if p.id == "maintenance":
            rows.append(maintenance_row(rc, output, seconds))
        elif p.parts and p.parts[0].startswith("docker:"):
            rows.extend(docker_rows(settings, p.parts, rc, output, timeout, seconds))
        elif p.parts:
            rows.extend(http_rows(settings, p.parts, rc, output, timeout, now))
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
    command = probe_command(selected, timeout, parallel=parallel)
    start = time.monotonic()
    budget = timeout + 30 if parallel else (timeout + 2) * len(selected) + 30
    r = host.check(command, sudo=True, timeout=budget)
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


ns = Collection("health", check)
