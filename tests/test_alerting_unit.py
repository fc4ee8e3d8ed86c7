"""Alerting without a server: the rendered Alertmanager config checked and
routed by the real amtool, the container entrypoint run for real, the log
parser of monitoring.test-alert, the textfile metrics checked by promtool."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from fabfile import monitoring, ssl
from fabfile.config import load_settings
from fabfile.render import ALERTMANAGER_CONF, render_tree, write_tree

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "files/monitoring/alertmanager/entrypoint.sh"
ALL_ON = {"email": {"to": "ops@example.org,oncall@example.org", "from": "am@example.org",
                    "smarthost": "smtp.example.org:587", "username": "alerts"},
          "webhook": "webhook", "heartbeat": True, "ca_file": "/etc/ssl/alerting-ca.pem"}


def settings(**alertmanager):
    return load_settings(environ={}, files=[], overrides={"alertmanager": alertmanager})


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed: tests/install-deps.sh installs it")
    return path


@pytest.fixture
def rendered(tmp_path):
    def render(**alertmanager) -> Path:
        write_tree(render_tree(settings(**alertmanager)), tmp_path)
        return tmp_path / ALERTMANAGER_CONF
    return render


@pytest.mark.parametrize("alertmanager", [
    {}, ALL_ON, {**ALL_ON, "webhook": "slack"},
    {"email": {**ALL_ON["email"], "username": ""}, "send_resolved": False},
])
def test_amtool_accepts_every_receiver_combination(rendered, alertmanager):
    conf = rendered(**alertmanager)
    proc = subprocess.run([need("amtool"), "check-config", str(conf)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = conf.read_text()
    assert "ALERT_SMTP_PASSWORD=" not in text and "hc-ping" not in text


def _routes(conf: Path, *labels: str) -> list[str]:
    proc = subprocess.run([need("amtool"), "config", "routes", "test", "--config.file",
                           str(conf), *labels], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(proc.stdout.strip().split(","))


def test_routing_watchdog_to_the_heartbeat_test_alerts_to_test_receivers(rendered):
    conf = rendered(**ALL_ON)
    assert _routes(conf, "alertname=Watchdog", "severity=none") == ["heartbeat"]
    # (then the no-op blackhole, which keeps them from the production receivers)
    assert _routes(conf, "alertname=MaicivyTestAlert", "test_id=x") == [
        "blackhole", "test-email", "test-webhook"]
    assert _routes(conf, "alertname=BackendDown", "severity=critical") == ["email", "webhook"]
    # without a heartbeat the Watchdog goes nowhere
    assert _routes(rendered(**{**ALL_ON, "heartbeat": False}),
                   "alertname=Watchdog") == ["blackhole"]


def test_inhibition_backend_down_silences_high_error_rate(rendered):
    data = yaml.safe_load(rendered(**ALL_ON).read_text())
    rules = [(r["source_matchers"], r["target_matchers"]) for r in data["inhibit_rules"]]
    assert (['alertname="BackendDown"'], ['alertname="HighErrorRate"']) in rules
    route = data["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == (
        "30s", "5m", "4h")
    email = next(r for r in data["receivers"] if r["name"] == "email")["email_configs"][0]
    assert email["require_tls"] is True and email["send_resolved"] is True
    assert email["auth_password_file"] == "/tmp/alertmanager/smtp_password"


def _fake_alertmanager(tmp_path: Path) -> Path:
    fake = tmp_path / "alertmanager"
    fake.write_text('#!/bin/sh\nfor a; do echo "ARG $a"; done\n'
                    'cat "${1#--config.file=}"\n')
    fake.chmod(0o755)
    return fake


def test_entrypoint_fills_in_the_secrets_privately(rendered, tmp_path):
    conf = rendered(**ALL_ON)
    run_dir = tmp_path / "run"
    url = "https://ntfy.example.org/alerts?auth=a&b='c'"
    env = {"PATH": "/usr/bin:/bin", "AM_CONFIG": str(conf), "AM_RUN_DIR": str(run_dir),
           "AM_BIN": str(_fake_alertmanager(tmp_path)), "ALERT_SMTP_PASSWORD": 'p"a\\ss w$rd',
           "ALERT_WEBHOOK_URL": url, "ALERT_HEARTBEAT_URL": "https://hc-ping.com/1234"}
    proc = subprocess.run(["sh", str(ENTRYPOINT), "run", "--storage.path=/x"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"ARG --config.file={run_dir}/alertmanager.yml" in proc.stdout
    assert "ARG --storage.path=/x" in proc.stdout
    filled = yaml.safe_load((run_dir / "alertmanager.yml").read_text())
    urls = {r["name"]: r["webhook_configs"][0]["url"] for r in filled["receivers"]
            if "webhook_configs" in r}
    assert urls == {"webhook": url, "test-webhook": url, "heartbeat": "https://hc-ping.com/1234"}
    assert (run_dir / "smtp_password").read_text() == 'p"a\\ss w$rd'
    for f in ("smtp_password", "alertmanager.yml"):
        assert stat.S_IMODE(os.stat(run_dir / f).st_mode) == 0o600
    # the filled config is still valid for Alertmanager
    check = subprocess.run([need("amtool"), "check-config", str(run_dir / "alertmanager.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_entrypoint_refuses_to_start_without_a_secret_its_receiver_needs(rendered, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AM_CONFIG": str(rendered(**ALL_ON)),
           "AM_RUN_DIR": str(tmp_path / "run"), "AM_BIN": str(_fake_alertmanager(tmp_path)),
           "ALERT_SMTP_PASSWORD": "x", "ALERT_HEARTBEAT_URL": "https://hc-ping.com/1"}
    proc = subprocess.run(["sh", str(ENTRYPOINT), "run"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 78
    assert proc.stderr.strip() == ("alertmanager: error: ALERT_WEBHOOK_URL is empty in .env "
                                   "but the settings enable its receiver")


P = "alertmanager-1  | ts=2026-11-29T22:10:01.100Z caller=notify.go:756 level=debug "
D = "component=dispatcher "
LOGS = "\n".join([
    P + D + 'msg="Received alert" alert=MaicivyTestAlert[1a2b3c][active]',
    P + D + 'receiver=test-webhook integration=webhook[0] msg="Notify success" attempts=1',
    P + D + 'receiver=test-email integration=email[0] msg="Notify attempt failed, will retry '
    'later" attempts=1 err="*email.loginAuth auth: unexpected server challenge"',
    P + D + 'receiver=test-email integration=email[0] msg="Notify attempt failed, will retry '
    'later" attempts=2 err="dial tcp: lookup smtp-sink on 127.0.0.11:53: no such host"',
    P.replace("debug", "error") + D + 'msg="Notify for alerts failed" num_alerts=1 '
    'err="test-email/email[0]: notify retry canceled after 3 attempts: dial tcp: lookup '
    'smtp-sink on 127.0.0.11:53: no such host"',
    P + D + 'receiver=webhook integration=webhook[0] msg="Notify success" attempts=1',
    # Alertmanager >= 0.28 (slog)
    'alertmanager-1  | time=2026-11-29T22:10:06Z level=DEBUG source=notify.go:876 '
    'msg="Notify success" component=dispatcher receiver=test-slack integration=slack[0]',
]) + "\n"


def test_the_log_says_which_receiver_delivered_and_why_another_failed():
    got = monitoring.parse_deliveries(LOGS, ["email", "webhook", "slack"])
    assert got["webhook"].delivered and got["webhook"].failures == 0
    assert got["slack"].delivered  # Alertmanager >= 0.28 logs with slog
    email = got["email"]
    assert not email.delivered and email.failures == 3
    assert email.error.endswith("dial tcp: lookup smtp-sink on 127.0.0.11:53: no such host")
    # the production receivers' own notifications are not the test's
    assert monitoring.parse_deliveries(LOGS.replace("test-webhook", "webhook"),
                                       ["webhook"])["webhook"].delivered is False


def test_test_alert_needs_a_receiver():
    assert monitoring.receivers(settings()) == []
    assert monitoring.receivers(settings(**ALL_ON)) == ["email", "webhook"]


@pytest.mark.parametrize("text", [
    monitoring.test_alert_metric("a1b2c3d4", 1764453000),
    ssl.cert_metrics_text([
        ssl.CertInfo("maicivy.example.com", "file", not_after="2027-01-01T00:00:00Z"),
        ssl.CertInfo("maicivy.example.com", "served", not_after="2026-12-24T10:00:00Z"),
        ssl.CertInfo("grafana.maicivy.example.com", "served", error="no answer"),
        ssl.CertInfo("grafana.maicivy.example.com", "file", not_after="2027-02-01T00:00:00Z"),
    ]),
])
def test_textfile_metrics_are_valid_for_promtool(text):
    proc = subprocess.run([need("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_certificate_metric_prefers_what_nginx_serves():
    text = ssl.cert_metrics_text([
        ssl.CertInfo("maicivy.example.com", "file", not_after="2027-01-01T00:00:00Z"),
        ssl.CertInfo("maicivy.example.com", "served", not_after="2026-12-24T10:00:00Z"),
        ssl.CertInfo("grafana.maicivy.example.com", "served", error="no answer"),
        ssl.CertInfo("grafana.maicivy.example.com", "file", not_after="2027-02-01T00:00:00Z"),
    ])
    samples = [ln for ln in text.splitlines() if not ln.startswith("#")]
    def ts(iso):
        return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())

    assert samples == [
        f'{ssl.CERT_METRIC}{{domain="grafana.maicivy.example.com"}} {ts("2027-02-01T00:00")}',
        f'{ssl.CERT_METRIC}{{domain="maicivy.example.com"}} {ts("2026-12-24T10:00")}',
    ]
