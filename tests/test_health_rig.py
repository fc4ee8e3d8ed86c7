"""health.check on a running stack, through the real fab (laptop) and inv (server) CLIs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from ssl_support import fab, inv, task_env
from stack_rig import StackRig

from fabfile.config import SERVICES
from fabfile.stack import cert_dir

pytestmark = pytest.mark.rig

TIMEOUT = 3
SITE, GRAFANA = "maicivy.test", "grafana.maicivy.test"
BACKEND_ROWS = {"backend /health", "backend /health/deep", "service backend"}


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    # (the pid: parallel runs on one Docker)
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("healthstack"),
                   f"maicivyhealth{os.getpid()}",
                   health={"timeout_seconds": TIMEOUT, "disk_warn_percent": 98,
                           "disk_critical_percent": 99})
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


def report(proc) -> dict:
    assert proc.stdout.strip().startswith("{"), proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def not_ok(data: dict) -> dict[str, str]:
    return {c["check"]: c["status"] for c in data["checks"] if c["status"] != "ok"}


def test_everything_ok_on_the_running_stack_from_a_laptop(stack):
    proc = fab(stack, "health.check", "--json")
    data = report(proc)
    assert proc.returncode == 0, proc.stdout
    assert data["status"] == "ok" and data["exit_code"] == 0
    checks = [c["check"] for c in data["checks"]]
    assert checks[:6] == ["frontend", "backend /health", "backend /health/deep", "grafana",
                          f"certificate {SITE}", f"certificate {GRAFANA}"]
    assert "prometheus" in checks
    assert [c for c in checks if c.startswith("service ")] == [f"service {s}" for s in SERVICES]
    assert any(c.startswith("disk /") for c in checks)
    assert not_ok(data) == {}


def test_on_the_server_it_prints_a_plain_table_when_not_on_a_terminal(stack):
    proc = inv(stack, "health.check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\033[" not in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["OK", "frontend"]
    assert lines[-1].startswith("OK: localhost, ") and "checks in" in lines[-1]


def test_a_soon_expiring_certificate_is_a_warning_on_its_row_only(stack):
    d = Path(cert_dir(stack.settings, GRAFANA))
    saved = {f: (d / f).read_bytes() for f in ("fullchain.pem", "privkey.pem")}
    reload_nginx = stack.compose("exec", "-T", "nginx", "nginx", "-s", "reload")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "10",
                        "-subj", f"/CN={GRAFANA}", "-keyout", str(d / "privkey.pem"),
                        "-out", str(d / "fullchain.pem")], check=True, capture_output=True)
        stack.run(reload_nginx)
        proc = fab(stack, "health.check", "--json")
        data = report(proc)
        assert proc.returncode == 1
        assert data["status"] == "warning"
        assert not_ok(data) == {f"certificate {GRAFANA}": "warning"}
        row = next(c for c in data["checks"] if c["check"] == f"certificate {GRAFANA}")
        assert row["detail"].startswith(("9 days left", "10 days left"))
    finally:
        for f, content in saved.items():
            (d / f).write_bytes(content)
        stack.run(reload_nginx)


def test_a_nearly_full_disk_is_a_warning(stack):
    env = task_env(stack, health={"disk_warn_percent": 1})
    proc = inv(stack, "health.check", "--json", env=env)
    data = report(proc)
    assert proc.returncode == 1
    assert set(not_ok(data).values()) == {"warning"}
    assert all(name.startswith("disk /") for name in not_ok(data))


def test_a_hanging_backend_times_out_within_the_configured_timeout(stack):
    stack.run(stack.compose("pause", "backend"))
    try:
        proc = fab(stack, "health.check", "--json", timeout=TIMEOUT * 10)
    finally:
        stack.run(stack.compose("unpause", "backend"))
        stack.start("backend")
    data = report(proc)
    assert proc.returncode == 2
    rows = {c["check"]: c for c in data["checks"]}
    for name in ("backend /health", "backend /health/deep"):
        assert rows[name]["status"] == "critical"
        assert rows[name]["detail"] == f"no answer within {TIMEOUT}s"
    assert rows["service backend"]["detail"] == "paused"
    assert set(not_ok(data)) == BACKEND_ROWS


def test_backend_stopped_is_critical_on_exactly_its_rows(stack):
    stack.run(stack.compose("stop", "-t", "5", "backend"))
    try:
        proc = fab(stack, "health.check", "--json")
        data = report(proc)
        assert proc.returncode == 2
        assert data["status"] == "critical"
        assert not_ok(data) == {name: "critical" for name in BACKEND_ROWS}
        rows = {c["check"]: c["detail"] for c in data["checks"]}
        assert rows["service backend"].startswith("exited")
    finally:
        stack.start("backend")

