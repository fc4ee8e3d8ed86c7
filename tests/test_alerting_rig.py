"""Alerts that reach a person: the real Alertmanager of the rig, a real SMTP
server (aiosmtpd, STARTTLS + AUTH) and an HTTP sink, both as containers on the
stack's "alerting" network (Alertmanager's only way out).

Proves: the heartbeat (Watchdog) reaches its URL; monitoring.test-alert goes
Prometheus -> Alertmanager -> e-mail and webhook and waits for both; the
resolved notification follows; BackendDown inhibits HighErrorRate; with the
SMTP server down the task fails naming the e-mail receiver.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ssl_support import fab, task_env
from stack_rig import TEST_ENV, StackRig

from fabfile.stack import fill_env, remote_files

pytestmark = pytest.mark.rig

HERE = Path(__file__).resolve().parent
PYBASE = "127.0.0.1:5000/maicivy/pybase:test"
SMTP_USER = "alerts"
SMTP_PASSWORD = "s3cret-" + secrets.token_hex(8)
HOOK_TOKEN = secrets.token_hex(8)
PING_UUID = secrets.token_hex(16)
PROJECT = f"maicivyalerts{os.getpid()}"  # (parallel runs on one Docker)


class AlertRig(StackRig):
    """A stack whose .env carries the alerting secrets."""

    extra_env: dict[str, str] = {}

    def write_env(self) -> None:
        example = remote_files(self.settings)[
            f"{self.settings.root}/.env.production.example"].decode()
        seeded = "".join(f"{k}={v}\n" for k, v in {**TEST_ENV, **self.extra_env}.items())
        text, _ = fill_env(example, seeded, token=lambda n: secrets.token_hex(16))
        self.host.write_file(self.settings.env_file, text, mode=0o600)


def _site_packages() -> Path:
    import aiosmtpd

    return Path(aiosmtpd.__file__).resolve().parent.parent


def _sink_deps(dest: Path) -> Path:
    """aiosmtpd and its dependencies (pure Python) for the sink container."""
    site = _site_packages()
    for name in ("aiosmtpd", "public", "attr", "attrs"):
        shutil.copytree(site / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _cert(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=smtp-sink",
                    "-addext", "subjectAltName=DNS:smtp-sink", "-keyout", str(dest / "key.pem"),
                    "-out", str(dest / "cert.pem")], check=True, capture_output=True, timeout=60)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest / "cert.pem"


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alertstack")
    certs = tmp / "certs"
    ca = _cert(certs)
    deps = _sink_deps(tmp / "deps")
    out = tmp / "out"
    out.mkdir()
    out.chmod(0o777)
    rig = AlertRig(ssh_host, tmp, PROJECT, prometheus={"scrape_interval": "2s"},
                   alertmanager={
                       "group_wait": "1s", "group_interval": "2s", "repeat_interval": "1h",
                       "email": {"to": "ops@maicivy.test", "from": "alerts@maicivy.test",
                                 "smarthost": "smtp-sink:587", "username": SMTP_USER},
                       "webhook": "webhook", "heartbeat": True, "heartbeat_interval": "1m",
                       "ca_file": str(ca)})
    rig.extra_env = {
        "ALERT_SMTP_PASSWORD": SMTP_PASSWORD,
        "ALERT_WEBHOOK_URL": f"http://http-sink:8080/hook/{HOOK_TOKEN}?a=1&b=2",
        "ALERT_HEARTBEAT_URL": f"http://http-sink:8080/ping/{PING_UUID}",
    }
    rig.out = out
    project = rig.settings.compose_project
    rig.sinks = {"smtp": f"{project}-smtp-sink", "http": f"{project}-http-sink"}
    try:
        # The sinks listen before Alertmanager starts: its first heartbeat (sent as
        # soon as Prometheus evaluates Watchdog) is not lost to a retry backoff.
        rig.prepare()
        rig.run(rig.compose("up", "--no-start"), hide=True)
        network = f"{project}_alerting"
        common = (f"docker run -d --name {{name}} --network {network} --network-alias {{alias}} "
                  f"-v {HERE / 'sinks'}:/sink:ro -v {deps}:/deps:ro -v {certs}:/certs:ro "
                  f"-v {out}:/out -e PYTHONPATH=/deps {PYBASE} ")
        rig.run(common.format(name=rig.sinks["smtp"], alias="smtp-sink")
                + "python3 /sink/smtp_sink.py /certs/cert.pem /certs/key.pem "
                + f"{SMTP_USER} {shlex.quote(SMTP_PASSWORD)} /out", hide=True)
        rig.run(common.format(name=rig.sinks["http"], alias="http-sink")
                + "python3 /sink/http_sink.py /out", hide=True)
        for name in rig.sinks.values():
            wait_listening(rig, name, 1)
        rig.up()
        yield rig
    finally:
        rig.run("docker rm -f " + " ".join(rig.sinks.values()), warn=True, hide=True)
        rig.down()


def wait_listening(rig, name: str, times: int) -> None:
    """Until the sink container ``name`` has said "listening" ``times`` times."""
    for _ in range(60):
        logs = rig.run(f"docker logs {name} 2>&1", hide=True, warn=True).stdout
        if logs.count("listening") >= times:
            return
        time.sleep(0.5)
    pytest.fail(f"{name} did not start: {logs}")


def received(stack, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(stack.out.glob(f"{prefix}-*.json"),
                                                      key=lambda p: int(p.stem.split("-")[1]))]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def am_api(stack, path: str, post: str | None = None) -> str:
    """Alertmanager's API, from inside the monitoring network (the prometheus container)."""
    args = ["wget", "-q", "-O", "-"]
    if post is not None:
        args += ["--header", "Content-Type: application/json", f"--post-data={post}"]
    r = stack.run(stack.compose("exec", "-T", "prometheus", *args,
                                f"http://alertmanager:9093{path}"), hide=True)
    return r.stdout


def test_alertmanager_is_reachable_only_from_the_monitoring_network(stack):
    cid = stack.run(stack.compose("ps", "-q", "alertmanager"), hide=True).stdout.strip()
    info = json.loads(stack.run(f"docker inspect {cid}", hide=True).stdout)[0]
    assert not any(info["NetworkSettings"]["Ports"].get(p) for p in info["NetworkSettings"][
        "Ports"]), "no published port"
    assert sorted(info["NetworkSettings"]["Networks"]) == [
        f"{PROJECT}_alerting", f"{PROJECT}_monitoring"]
    assert json.loads(am_api(stack, "/api/v2/status"))["cluster"]["status"] == "disabled"
    r = stack.run(stack.compose("exec", "-T", "nginx", "wget", "-q", "-T", "3", "-O", "-",
                                "http://alertmanager:9093/-/ready"), warn=True, hide=True)
    assert r.failed  # nginx's network does not reach it


def test_the_watchdog_pings_the_heartbeat_url(stack):
    pings = wait_for(lambda: [r for r in received(stack, "http")
                              if r["path"] == f"/ping/{PING_UUID}"], 90, "a heartbeat ping")
    body = json.loads(pings[0]["body"])
    assert body["receiver"] == "heartbeat"
    assert [a["labels"]["alertname"] for a in body["alerts"]] == ["Watchdog"]


def test_test_alert_reaches_email_and_webhook_and_resolves(stack):
    proc = fab(stack, "monitoring.test-alert", "--timeout", "120", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "email: accepted the test alert" in proc.stdout
    assert "webhook: accepted the test alert" in proc.stdout
    test_id = proc.stdout.split("test alert ", 1)[1].split(":", 1)[0]
    assert SMTP_PASSWORD not in proc.stdout + proc.stderr
    # the e-mail: through STARTTLS, authenticated, about our alert
    mails = [m for m in received(stack, "mail") if test_id in m["content"]]
    assert mails, received(stack, "mail")
    assert mails[0]["tls"] is True and mails[0]["auth_user"] == SMTP_USER
    assert mails[0]["rcpt_tos"] == ["ops@maicivy.test"]
    assert "MaicivyTestAlert" in mails[0]["content"]
    # the webhook: Alertmanager's JSON, at the URL from .env (query string intact)
    hooks = [json.loads(h["body"]) for h in received(stack, "http")
             if h["path"] == f"/hook/{HOOK_TOKEN}?a=1&b=2"]
    ours = [h for h in hooks if h["alerts"][0]["labels"].get("test_id") == test_id]
    assert ours and ours[0]["status"] == "firing" and ours[0]["receiver"] == "test-webhook"
    # the metric is gone: the alert resolves and a resolved notification follows
    wait_for(lambda: [h for h in (json.loads(x["body"]) for x in received(stack, "http")
                                  if x["path"].startswith(f"/hook/{HOOK_TOKEN}"))
                      if h["status"] == "resolved"
                      and h["alerts"][0]["labels"].get("test_id") == test_id],
             120, "the resolved notification")


def test_backend_down_inhibits_high_error_rate(stack):
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    alerts = [{"labels": {"alertname": "BackendDown", "job": "backend", "instance": "b:8080",
                          "severity": "critical"}, "startsAt": now},
              {"labels": {"alertname": "HighErrorRate", "severity": "warning"},
               "startsAt": now}]
    am_api(stack, "/api/v2/alerts", post=json.dumps(alerts))

    def state():
        data = json.loads(am_api(stack, "/api/v2/alerts?filter=alertname%3D%22HighErrorRate%22"))
        return data and data[0]["status"]["inhibitedBy"] and data[0]["status"]

    status = wait_for(state, 30, "HighErrorRate to be inhibited")
    assert status["state"] == "suppressed"


def test_push_checks_and_reloads_alertmanager_with_its_secrets(stack):
    before = json.loads(am_api(stack, "/api/v2/status"))["config"]["original"]
    assert "repeat_interval: 1h" in before
    env = task_env(stack, alertmanager={"repeat_interval": "2h"})
    proc = fab(stack, "monitoring.push", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "updated monitoring/alertmanager/alertmanager.yml" in proc.stdout
    assert "Alertmanager" in proc.stdout.splitlines()[-1]
    live = json.loads(am_api(stack, "/api/v2/status"))["config"]["original"]
    assert "repeat_interval: 2h" in live
    # the reloaded configuration has the secrets again (never in the file on disk): the
    # API may show the webhook URL as <secret>: look at the copy Alertmanager reads
    loaded = stack.run(stack.compose("exec", "-T", "alertmanager", "cat",
                                     "/tmp/alertmanager/alertmanager.yml"), hide=True).stdout
    assert "repeat_interval: 2h" in loaded and f"/hook/{HOOK_TOKEN}?a=1&b=2" in loaded
    on_disk = stack.run(f"cat {stack.settings.root}/monitoring/alertmanager/alertmanager.yml",
                        hide=True).stdout
    assert HOOK_TOKEN not in on_disk and "maicivy.invalid/ALERT_WEBHOOK_URL" in on_disk


def test_with_the_smtp_server_down_the_task_names_the_email_receiver(stack):
    smtp = stack.sinks["smtp"]
    starts = stack.run(f"docker logs {smtp} 2>&1", hide=True).stdout.count("listening")
    stack.run(f"docker stop -t 1 {smtp}", hide=True)
    try:
        proc = fab(stack, "monitoring.test-alert", "--timeout", "90", timeout=300)
    finally:
        stack.run(f"docker start {smtp}", hide=True)
        wait_listening(stack, smtp, starts + 1)
    # Alertmanager still owes the e-mail receiver this alert (resolved by now): let it
    # through, or its "Notify success" would fall in the next test-alert's window.
    test_id = proc.stdout.split("test alert ", 1)[1].split(":", 1)[0]
    wait_for(lambda: [m for m in received(stack, "mail")
                      if test_id in m["content"] and "RESOLVED" in m["content"]],
             90, "the e-mail Alertmanager owed while the SMTP server was down")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "webhook: accepted the test alert" in proc.stdout
    assert "email: FAILED" in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: receiver(s) did not accept the test alert: email (")
    assert "webhook (" not in line
    assert SMTP_PASSWORD not in proc.stdout + proc.stderr
