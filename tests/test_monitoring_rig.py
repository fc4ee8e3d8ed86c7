"""monitoring.push / monitoring.status with the real Prometheus of the rig.

Prometheus (Debian's, in the rig image) scrapes itself, the backend
stand-in's /metrics and node-exporter; the Grafana stand-in counts its
provisioning reloads (GET /api/standin/files).

One stack for the module; each test first installs the monitoring
configuration it starts from (``live``), so they run in any order.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from ssl_support import fab, inv, task_env
from stack_rig import StackRig

from fabfile import monitoring
from fabfile.config import load_settings
from fabfile.errors import OpsError
from fabfile.host import sha256

pytestmark = pytest.mark.rig

CHANGED = {"prometheus": {"scrape_interval": "2s"}, "alerts": {"error_rate_percent": 7}}


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    # (the pid: parallel runs on one Docker)
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("monstack"),
                   f"maicivymon{os.getpid()}",
                   prometheus={"scrape_interval": "1s"})
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


def live(stack, changes: dict | None = None, files=None):
    """Install (and load) the monitoring files of the rig's settings with ``changes``;
    nothing happens when they are the ones running already. Returns the settings."""
    s = load_settings(invoke_section={**stack.overrides, **(changes or {})}, environ={},
                      files=[])
    monitoring.push_files(stack.host, s, files or monitoring.monitoring_files(s))
    return s


def prom_api(stack, path: str) -> dict:
    r = stack.host.check(stack.compose("exec", "-T", "prometheus", "wget", "-q", "-O", "-",
                                       f"http://127.0.0.1:9090{path}"))
    assert r.ok, r.stderr
    return json.loads(r.stdout)


def reload_time(stack) -> str:
    """When Prometheus last loaded its configuration (its runtime information, current at
    once: the metric of the same name waits for Prometheus' next scrape of itself)."""
    return prom_api(stack, "/api/v1/status/runtimeinfo")["data"]["lastConfigTime"]


def grafana_state(stack) -> dict:
    r = stack.host.check(stack.compose("exec", "-T", "grafana", "wget", "-q", "-O", "-",
                                       "http://127.0.0.1:3000/api/standin/files"))
    assert r.ok, r.stderr
    return json.loads(r.stdout)


def status(stack, env=None) -> tuple[int, dict]:
    proc = fab(stack, "monitoring.status", "--json", env=env)
    assert proc.stdout.strip().startswith("{"), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def wait_status(stack, predicate, timeout: float, env=None) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        rc, data = status(stack, env)
        if predicate(data) or time.monotonic() > deadline:
            return rc, data
        time.sleep(2)


def test_all_targets_are_up(stack):
    rc, data = wait_status(stack, lambda d: d["targets"] and all(
        t["health"] == "up" for t in d["targets"]), 60)
    assert {t["job"]: t["health"] for t in data["targets"]} == {
        "prometheus": "up", "backend": "up", "node": "up", "alertmanager": "up"}
    assert rc == 0
    # only the dead man's switch fires, and it does not make the status fail
    assert [a["name"] for a in data["alerts"] if a["state"] == "firing"] in ([], ["Watchdog"])
    table = inv(stack, "monitoring.status").stdout
    assert "Scrape targets:" in table and "backend:8080" in table


def test_push_with_nothing_changed_reloads_nothing(stack):
    live(stack)
    before = reload_time(stack)
    proc = fab(stack, "monitoring.push")
    assert proc.returncode == 0, proc.stderr
    assert "monitoring configuration unchanged; nothing reloaded" in proc.stdout
    assert reload_time(stack) == before


def test_push_validates_installs_and_reloads_prometheus_and_grafana(stack):
    live(stack)
    reloads = grafana_state(stack)["reloads"]
    env = task_env(stack, **CHANGED)
    dry = fab(stack, "monitoring.push", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would update monitoring/prometheus/alerts.yml" in dry.stdout
    assert prom_api(stack, "/api/v1/status/config")["data"]["yaml"].count("scrape_interval: 1s")

    proc = fab(stack, "monitoring.push", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "updated monitoring/prometheus/prometheus.yml" in proc.stdout
    assert "updated monitoring/grafana/provisioning/datasources/prometheus.yml" in proc.stdout
    assert "reloaded Prometheus and Grafana provisioning" in proc.stdout
    config = prom_api(stack, "/api/v1/status/config")["data"]["yaml"]
    assert "scrape_interval: 2s" in config and "scrape_interval: 1s" not in config
    rules = prom_api(stack, "/api/v1/rules")["data"]["groups"][0]["rules"]
    high = next(r for r in rules if r["name"] == "HighErrorRate")
    assert high["query"].rstrip().endswith("> 7")
    after = grafana_state(stack)["reloads"]
    assert after["datasources"] == reloads["datasources"] + 1
    assert after["dashboards"] == reloads["dashboards"] + 1
    # nothing left behind
    r = stack.host.check(f"ls -A {stack.settings.root}/monitoring/.staging")
    assert r.stdout.strip() == ""


def test_a_config_promtool_rejects_is_never_loaded(stack):
    s = live(stack, CHANGED)
    files = monitoring.monitoring_files(s)
    root = s.root
    live_before = stack.host.hashes([f"{root}/{rel}" for rel in files])
    assert live_before == {f"{root}/{rel}": sha256(data) for rel, data in files.items()}
    broken = dict(files)
    broken["monitoring/prometheus/alerts.yml"] = files["monitoring/prometheus/alerts.yml"].replace(
        b'expr: up{job="backend"} == 0', b'expr: up{job="backend" == 0')
    broken["monitoring/grafana/provisioning/datasources/prometheus.yml"] += b"# changed\n"
    before = reload_time(stack)
    with pytest.raises(OpsError) as err:
        monitoring.push_files(stack.host, s, broken)
    message = str(err.value)
    assert message.startswith("promtool rejects the new Prometheus configuration: ")
    assert "alerts.yml" in message and "nothing was changed on the server" in message
    assert stack.host.hashes([f"{root}/{rel}" for rel in files]) == live_before
    assert reload_time(stack) == before
    r = stack.host.check(f"ls -A {root}/monitoring/.staging")
    assert r.stdout.strip() == ""


def firing(name: str):
    return lambda d: any(a["name"] == name and a["state"] == "firing" for a in d["alerts"])


def test_backend_down_shows_up_as_a_firing_alert(stack):
    env = task_env(stack, **CHANGED)
    # alerts.yml says BackendDown fires after `for: 1m` of failed scrapes (the promtool
    # unit tests check that minute); here the rule waits 5s, to see it fire for real
    # in the status without waiting the minute.
    files = monitoring.monitoring_files(load_settings(invoke_section=stack.overrides,
                                                      environ={}, files=[]))
    rules = "monitoring/prometheus/alerts.yml"
    rule = b'expr: up{job="backend"} == 0\n        for: 1m\n'
    assert files[rules].count(rule) == 1
    live(stack, files={**files, rules: files[rules].replace(rule, rule.replace(b"1m", b"5s"))})
    stack.run(stack.compose("stop", "-t", "5", "backend"))
    try:
        rc, data = wait_status(stack, firing("BackendDown"), 90, env)
        alerts = [a for a in data["alerts"] if a["state"] == "firing" and a["name"] != "Watchdog"]
        assert [a["name"] for a in alerts] == ["BackendDown"], data
        assert alerts[0]["severity"] == "critical"
        backend = next(t for t in data["targets"] if t["job"] == "backend")
        assert backend["health"] == "down" and backend["last_error"]
        assert rc == 1
        table = fab(stack, "monitoring.status", env=env).stdout
        assert "FIRING" in table and "BackendDown" in table
    finally:
        stack.start("backend")
    rc, data = wait_status(stack, lambda d: not firing("BackendDown")(d), 60, env)
    assert not firing("BackendDown")(data), data
