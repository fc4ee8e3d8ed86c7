"""Prometheus and Grafana configuration of the running stack.

``monitoring.push`` renders the Prometheus files (prometheus.yml, alerts.yml)
and Grafana's provisioning and dashboards, uploads them to a staging
directory on the server (``{root}/monitoring/.staging/<random>``, which no
container mounts) and checks the Prometheus files there with the promtool of
the very Prometheus image the stack runs (a throw-away ``docker run`` with no
network and the staging directory mounted read-only). Only when promtool
accepts them are the changed files renamed into place (the previous ones kept
aside), Prometheus reloaded (``POST /-/reload``) and Grafana's provisioning
reloaded (its admin API, credentials read from the Grafana container's own
environment inside the container and given to curl on stdin, never on a
command line). If the reload fails the previous files are put back.

Alertmanager's files (``monitoring/alertmanager/``) are checked the same way
with the amtool of the stack's Alertmanager image, then reloaded (the
container's entrypoint fills in the secrets again and sends SIGHUP; the reload
is read back from ``alertmanager_config_last_reload_successful``).

``monitoring.status`` asks Prometheus for its scrape targets and alerts.

``monitoring.test-alert`` writes a metric into node-exporter's textfile
directory; Prometheus scrapes it and fires ``MaicivyTestAlert``; Alertmanager
routes it to every configured receiver under the name ``test-<receiver>``; the
task reads Alertmanager's log until each of those says ``Notify success``, and
names the ones that failed (with Alertmanager's error) or never answered.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from dataclasses import dataclass

import yaml
from invoke import Collection, Exit

from .config import Settings
from .core import host_for, ops_task, settings_for
from .errors import OpsError
from .host import Host
from .lock import locked
from .shell import q, script, words
from .stack import compose, compose_argv, remote_files

INSTALL = script(__file__, "scripts/monitoring-install.sh")
ROLLBACK = script(__file__, "scripts/monitoring-rollback.sh")
AM_RELOAD = script(__file__, "scripts/monitoring-alertmanager-reload.sh")
GRAFANA_RELOAD = script(__file__, "scripts/monitoring-grafana-reload.sh")
STATUS = script(__file__, "scripts/monitoring-status.sh")
TEST_ALERT_PROBE = script(__file__, "scripts/monitoring-test-alert-probe.sh")
PROM_DIR = "monitoring/prometheus"
GRAFANA_DIR = "monitoring/grafana"
AM_DIR = "monitoring/alertmanager"


# --- pure builders ------------------------------------------------------------


def monitoring_files(settings: Settings) -> dict[str, bytes]:
    """``{path relative to the stack root: content}`` of the monitoring tree."""
    root = settings.root + "/"
    return {path[len(root):]: data for path, data in remote_files(settings).items()
            if path.startswith(root + "monitoring/")}


def lint(files: dict[str, bytes]) -> None:
    """Every YAML file parses, every dashboard is a JSON object (before any upload)."""
    for rel, data in sorted(files.items()):
        try:
            if rel.endswith((".yml", ".yaml")):
                yaml.safe_load(data)
            elif rel.endswith(".json") and not isinstance(json.loads(data), dict):
                raise ValueError("not a JSON object")
        except (yaml.YAMLError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OpsError(f"rendered {rel} is not valid: {first}; nothing was uploaded") from exc


def promtool_command(settings: Settings, staging: str) -> str:
    """promtool of the stack's Prometheus image on the staged files (no network)."""
    argv = [
        "docker", "run", "--rm", "--network", "none", "--entrypoint", "promtool",
        "-v", f"{staging}/{PROM_DIR}:/candidate:ro",
        settings.image("prometheus"),
        "check", "config", "/candidate/prometheus.yml",
    ]
    return " ".join(shlex.quote(a) for a in argv)


def amtool_command(settings: Settings, staging: str) -> str:
    """amtool of the stack's Alertmanager image on the staged file (no network)."""
    argv = [
        "docker", "run", "--rm", "--network", "none", "--entrypoint", "amtool",
        "-v", f"{staging}/{AM_DIR}:/candidate:ro",
        settings.image("alertmanager"),
        "check-config", "/candidate/alertmanager.yml",
    ]
    return " ".join(shlex.quote(a) for a in argv)


def alertmanager_reload_command(settings: Settings) -> str:
    """Fill in the secrets again, SIGHUP, and prove the new configuration loaded."""
    return compose(settings, "exec", "-T", "alertmanager",
                   *AM_RELOAD.argv(int(settings.ports.alertmanager)))


def promtool_reason(output: str) -> str:
    """What promtool rejected, as one line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    bad = [ln for ln in lines if "FAILED" in ln or "error" in ln.lower()
           or "err=" in ln]
    return "; ".join((bad or lines[-2:])[:3])[:500] or "no output"


def install_command(settings: Settings, staging: str, changed: list[str]) -> str:
    """Move the changed files from staging into place, keeping the previous ones."""
    return INSTALL.command(settings.root, staging, *changed)


def rollback_command(settings: Settings, staging: str, changed: list[str]) -> str:
    """Put back what :func:`install_command` replaced."""
    return ROLLBACK.command(settings.root, staging, *changed)


def prometheus_reload_command(settings: Settings) -> str:
    return compose(settings, "exec", "-T", "prometheus", "wget", "-q", "-O", "-",
                   "--post-data=", f"http://127.0.0.1:{settings.ports.prometheus}/-/reload")


def grafana_reload_command(settings: Settings) -> str:
    """Reload Grafana's provisioning; the admin password stays inside the container."""
    return compose(settings, "exec", "-T", "grafana",
                   *GRAFANA_RELOAD.argv(int(settings.ports.grafana)))


def status_command(settings: Settings) -> str:
    return compose(settings, "exec", "-T", "prometheus",
                   *STATUS.argv(int(settings.ports.prometheus)))


@dataclass
class Target:
    job: str
    instance: str
    health: str
    last_error: str
    last_scrape: str


@dataclass
class Alert:
    name: str
    state: str
    severity: str
    summary: str
    active_at: str


def parse_status(output: str) -> tuple[list[Target], list[Alert]]:
    """Targets and alerts from Prometheus' /api/v1/targets and /api/v1/alerts answers."""
    targets_text, sep, alerts_text = output.partition("@@alerts")
    if not sep:
        raise OpsError(f"Prometheus did not answer: {output.strip()[-200:] or 'no output'}")
    try:
        targets_data = json.loads(targets_text)["data"]["activeTargets"]
        alerts_data = json.loads(alerts_text)["data"]["alerts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OpsError(f"unexpected answer from Prometheus' API: {exc}") from exc
    targets = [Target(
        job=t.get("labels", {}).get("job", t.get("scrapePool", "")),
        instance=t.get("labels", {}).get("instance", t.get("scrapeUrl", "")),
        health=t.get("health", "unknown"),
        last_error=t.get("lastError", ""),
        last_scrape=t.get("lastScrape", ""),
    ) for t in targets_data]
    alerts = [Alert(
        name=a.get("labels", {}).get("alertname", ""),
        state=a.get("state", ""),
        severity=a.get("labels", {}).get("severity", ""),
        summary=a.get("annotations", {}).get("summary", ""),
        active_at=a.get("activeAt", ""),
    ) for a in alerts_data]
    targets.sort(key=lambda t: (t.job, t.instance))
    alerts.sort(key=lambda a: (a.state != "firing", a.name))
    return targets, alerts


# Firing by design, not a problem: the dead man's switch (Watchdog) and
# monitoring.test-alert's MaicivyTestAlert.
INFORMATIONAL_SEVERITIES = ("none", "test")


def problem(alert: Alert) -> bool:
    """A firing alert that is a problem (not Watchdog nor a test alert)."""
    return alert.state == "firing" and alert.severity not in INFORMATIONAL_SEVERITIES


def format_status(targets: list[Target], alerts: list[Alert]) -> list[str]:
    lines = ["Scrape targets:"]
    rows = [("JOB", "INSTANCE", "HEALTH", "LAST SCRAPE (UTC)", "LAST ERROR")]
    rows += [(t.job, t.instance, t.health.upper(), t.last_scrape[:19].replace("T", " "),
              t.last_error or "-") for t in targets]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]
              for r in rows]
    if not alerts:
        lines.append("Alerts: none pending or firing")
        return lines
    lines.append("Alerts:")
    rows = [("STATE", "ALERT", "SEVERITY", "SINCE (UTC)", "SUMMARY")]
    rows += [(a.state.upper(), a.name, a.severity or "-", a.active_at[:19].replace("T", " "),
              a.summary) for a in alerts]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]
              for r in rows]
    return lines


# --- steps ----------------------------------------------------------------------


@dataclass
class PushResult:
    changed: list[str]
    prometheus_reloaded: bool = False
    grafana_reloaded: bool = False
    alertmanager_reloaded: bool = False


def push_files(host: Host, settings: Settings, files: dict[str, bytes],
               force: bool = False) -> PushResult:
    """Validate ``files`` (relative to the root) with promtool on the server, install, reload.

    Nothing is moved into place unless promtool accepts the Prometheus files;
    if a reload fails, the previous files are put back (and reloaded).
    """
    lint(files)
    changed = _changed(host, settings, files)
    result = PushResult(changed)
    if not changed and not force:
        return result
    reload = {kind: force or any(rel.startswith(top + "/") for rel in changed)
              for kind, top in (("prometheus", PROM_DIR), ("alertmanager", AM_DIR),
                                ("grafana", GRAFANA_DIR))}
    staging = f"{settings.root}/monitoring/.staging/{secrets.token_hex(8)}"
    try:
        _stage(host, staging, files)
        _validate(host, settings, staging, alertmanager=reload["alertmanager"])
        if host.dry_run:
            return result
        host.run(install_command(settings, staging, changed), sudo=True)
        try:
            _reload(host, settings, reload, result)
        except OpsError as exc:
            host.run(rollback_command(settings, staging, changed), sudo=True, warn=True)
            if reload["prometheus"]:
                host.run(prometheus_reload_command(settings), sudo=True, warn=True, timeout=60)
            if reload["alertmanager"]:
                host.run(alertmanager_reload_command(settings), sudo=True, warn=True,
                         timeout=60)
            raise OpsError(f"{exc}; the previous monitoring files were put back") from None
        return result
    finally:
        host.run(f"rm -rf {q(staging)}", sudo=True, warn=True)


def _changed(host: Host, settings: Settings, files: dict[str, bytes]) -> list[str]:
    """The files whose content on the server differs (or which are missing), sorted."""
    from .host import sha256

    root = settings.root
    digests = host.hashes([f"{root}/{rel}" for rel in files], sudo=True)
    return sorted(rel for rel, data in files.items()
                  if digests.get(f"{root}/{rel}") != sha256(data))


def _stage(host: Host, staging: str, files: dict[str, bytes]) -> None:
    """Write every file under ``staging`` (same tree as under the root)."""
    host.run(f"mkdir -p -m 755 {q(staging)}", sudo=True)
    dirs = sorted({f"{staging}/{rel}".rsplit("/", 1)[0] for rel in files})
    host.run("mkdir -p " + words(*dirs), sudo=True)
    for rel, data in files.items():
        host.write_file(f"{staging}/{rel}", data, mode=0o644, sudo=True)


def _validate(host: Host, settings: Settings, staging: str, alertmanager: bool) -> None:
    """promtool (and amtool when Alertmanager's files change) accept the staged files."""
    checks = [("promtool", "Prometheus", promtool_command(settings, staging))]
    if alertmanager:
        checks.append(("amtool", "Alertmanager", amtool_command(settings, staging)))
    for tool, what, command in checks:
        r = host.run(command, sudo=True, warn=True, timeout=180)
        if r.failed:
            raise OpsError(f"{tool} rejects the new {what} configuration: "
                           f"{promtool_reason(r.stdout + r.stderr)}; nothing was changed "
                           "on the server")


def _reload(host: Host, settings: Settings, reload: dict[str, bool],
            result: PushResult) -> None:
    """Reload what changed; OpsError saying which one refused."""
    if reload["prometheus"]:
        r = host.run(prometheus_reload_command(settings), sudo=True, warn=True, timeout=60)
        if r.failed:
            raise OpsError(f"Prometheus refused to reload: "
                           f"{(r.stderr or r.stdout).strip()[-300:] or 'no answer'}")
        result.prometheus_reloaded = True
    if reload["alertmanager"]:
        r = host.run(alertmanager_reload_command(settings), sudo=True, warn=True, timeout=60)
        if r.failed:
            raise OpsError("Alertmanager did not load the new configuration"
                           + (f": {r.stderr.strip()[-300:]}" if r.stderr.strip() else ""))
        result.alertmanager_reloaded = True
    if reload["grafana"]:
        r = host.run(grafana_reload_command(settings), sudo=True, warn=True, timeout=90)
        if r.failed:
            raise OpsError("Grafana did not reload its provisioning: "
                           + "; ".join(r.stdout.split("\n")).strip("; ")
                           + (f" {r.stderr.strip()[-200:]}" if r.stderr.strip() else ""))
        result.grafana_reloaded = True


def read_status(host: Host, settings: Settings) -> tuple[list[Target], list[Alert]]:
    r = host.check(status_command(settings), sudo=True, timeout=60)
    if r.failed and "@@alerts" not in r.stdout:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise OpsError(f"cannot query Prometheus on {host.name}: "
                       f"{detail[-1] if detail else 'no output'}; is the stack running?")
    return parse_status(r.stdout)


# --- test alert ------------------------------------------------------------------

TEST_METRIC = "maicivy_test_alert_timestamp_seconds"


def receivers(settings: Settings) -> list[str]:
    """The receivers the alertmanager settings configure (heartbeat aside)."""
    am = settings.alertmanager
    return (["email"] if am.email.to else []) + (["webhook"] if am.webhook else [])


def test_alert_file(settings: Settings) -> str:
    return f"{settings.backup.textfile_dir}/maicivy_test_alert.prom"


def test_alert_metric(test_id: str, now: int) -> str:
    """The textfile that makes Prometheus fire MaicivyTestAlert for 5 minutes."""
    return (f"# HELP {TEST_METRIC} Unix time monitoring.test-alert asked for a test alert.\n"
            f"# TYPE {TEST_METRIC} gauge\n"
            f'{TEST_METRIC}{{test_id="{test_id}"}} {int(now)}\n')


def test_alert_probe(settings: Settings, since: int) -> str:
    """One round trip: Prometheus' alerts, then Alertmanager's log since ``since``."""
    return TEST_ALERT_PROBE.command(int(settings.ports.prometheus), int(since),
                                    *compose_argv(settings))


@dataclass
class Delivery:
    receiver: str
    delivered: bool = False
    failures: int = 0
    error: str = ""


_RECEIVER_RE = re.compile(r'(?:receiver=|err=)"?test-([a-z]+)\b')
_ERR_RE = re.compile(r'\berr="((?:[^"\\]|\\.)*)"|\berr=(\S+)')


def parse_deliveries(logs: str, names: list[str]) -> dict[str, Delivery]:
    """What Alertmanager's (debug) log says about each ``test-<receiver>``."""
    out = {name: Delivery(name) for name in names}
    for line in logs.splitlines():
        m = _RECEIVER_RE.search(line)
        if not m or m.group(1) not in out:
            continue
        d = out[m.group(1)]
        if "Notify success" in line:
            d.delivered = True
        elif "failed" in line.lower():
            d.failures += 1
            e = _ERR_RE.search(line)
            if e:
                d.error = (e.group(1) or e.group(2)).replace('\\"', '"')
    return out


def test_alert_fired(prom_json: str, test_id: str) -> str:
    """``firing``, ``pending`` or ``""`` for our test alert in Prometheus' /api/v1/alerts."""
    try:
        alerts = json.loads(prom_json)["data"]["alerts"]
    except (ValueError, KeyError, TypeError):
        return ""
    for a in alerts:
        labels = a.get("labels", {})
        if labels.get("alertname") == "MaicivyTestAlert" and labels.get("test_id") == test_id:
            return a.get("state", "")
    return ""


def wait_for_deliveries(host: Host, settings: Settings, test_id: str, since: int,
                        timeout: float, poll: float = 2.0, say=print) -> dict[str, Delivery]:
    """Poll until every receiver delivered, or failed 3 times, or ``timeout``."""
    import time

    names = receivers(settings)
    deadline = time.monotonic() + timeout
    fired = ""
    while True:
        r = host.check(test_alert_probe(settings, since), sudo=True, timeout=60)
        prom, _, logs = r.stdout.partition("@@logs")
        state = test_alert_fired(prom, test_id)
        if state == "firing" and fired != "firing":
            say("Prometheus: MaicivyTestAlert is firing; waiting for the receivers")
        fired = state or fired
        deliveries = parse_deliveries(logs, names)
        if all(d.delivered or d.failures >= 3 for d in deliveries.values()):
            return deliveries
        if time.monotonic() > deadline:
            if fired != "firing":
                raise OpsError(f"Prometheus did not fire the test alert within {timeout:g} s "
                               "(is node-exporter reading backup.textfile_dir? see "
                               "monitoring.status)")
            return deliveries
        time.sleep(poll)


@ops_task(name="test-alert", help={
    "timeout": "seconds to wait for every receiver (default 120)",
})
def test_alert(c, timeout=120):
    """Send a test alert through Prometheus and Alertmanager to every receiver.

    Writes a metric into node-exporter's textfile directory; Prometheus
    fires MaicivyTestAlert (severity "test") and Alertmanager sends it to each
    configured receiver (alertmanager.email, alertmanager.webhook). Waits until
    every receiver accepted it (Alertmanager's own log says so) and exits 1
    naming each receiver that failed, with Alertmanager's error, or that did
    not answer within TIMEOUT seconds. The alert resolves by itself (a
    "resolved" notification follows when send_resolved is on).
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    names = receivers(settings)
    if not names:
        raise OpsError("no receiver is configured: set maicivy.alertmanager.email.to and/or "
                       "maicivy.alertmanager.webhook (docs/OPERATIONS.md, Monitoring and "
                       "alerts), deploy, then try again")
    test_id = secrets.token_hex(4)
    r = host.check("date +%s")
    if r.failed or not r.stdout.strip().isdigit():
        raise OpsError(f"cannot read the time on {host.name}")
    now = int(r.stdout.strip())
    host.run(f"mkdir -p {shlex.quote(settings.backup.textfile_dir)}", sudo=True)
    path = test_alert_file(settings)
    host.write_file(path, test_alert_metric(test_id, now), mode=0o644, sudo=True)
    print(f"test alert {test_id}: asked Prometheus through {path}")
    try:
        deliveries = wait_for_deliveries(host, settings, test_id, now - 1, float(timeout))
    finally:
        host.run(f"rm -f {shlex.quote(path)}", sudo=True, warn=True)
    failed = []
    for name in names:
        d = deliveries[name]
        if d.delivered:
            print(f"  {name}: accepted the test alert")
        else:
            why = (f"{d.failures} failed attempt(s): {d.error}" if d.failures
                   else f"no answer within {timeout} s")
            print(f"  {name}: FAILED ({why})")
            failed.append(f"{name} ({why})")
    if failed:
        raise OpsError("receiver(s) did not accept the test alert: " + "; ".join(failed))
    print(f"every receiver accepted test alert {test_id}: {', '.join(names)}")


# --- tasks ----------------------------------------------------------------------


@ops_task(help={
    "force": "upload, validate and reload even if no file changed",
    "dry_run": "list the files that would change, change nothing",
})
@locked("monitoring.push")
def push(c, force=False, dry_run=False):
    """Update the Prometheus and Grafana configuration of the running stack.

    Renders prometheus.yml, alerts.yml and Grafana's provisioning and
    dashboards from the settings, checks the Prometheus files with promtool
    (of the stack's own Prometheus image) on the server *before* anything is
    replaced, then installs the changed files and reloads Prometheus and
    Grafana's provisioning (no restart). A file promtool rejects is never
    loaded: the task says why and leaves the server as it was.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    result = push_files(host, settings, monitoring_files(settings), force=force)
    if not result.changed and not force:
        print("monitoring configuration unchanged; nothing reloaded")
        return
    for rel in result.changed:
        print(f"{'would update' if dry_run else 'updated'} {rel}")
    if dry_run:
        return
    done = [name for name, ok in (("Prometheus", result.prometheus_reloaded),
                                  ("Alertmanager", result.alertmanager_reloaded),
                                  ("Grafana provisioning", result.grafana_reloaded)) if ok]
    print("promtool: configuration valid; reloaded " + (" and ".join(done) or "nothing"))


@ops_task(help={"json_": "print JSON instead of tables"})
def status(c, json_=False):
    """Show Prometheus' scrape targets (up/down, last error) and its alerts.

    Exits 1 when a target is down or an alert is firing, 0 otherwise. The
    always-firing Watchdog (dead man's switch) and test alerts do not count.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    targets, alerts = read_status(host, settings)
    if json_:
        from dataclasses import asdict

        print(json.dumps({"targets": [asdict(t) for t in targets],
                          "alerts": [asdict(a) for a in alerts]}, indent=2))
    else:
        print("\n".join(format_status(targets, alerts)))
    if any(t.health != "up" for t in targets) or any(problem(a) for a in alerts):
        raise Exit(code=1)


ns = Collection("monitoring", test_alert, push, status)
