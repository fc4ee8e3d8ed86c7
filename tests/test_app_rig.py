"""The app namespace and doctor on a running stack, through the real fab and inv CLIs.

One stack for the module. Order: status, logs (streamed, --follow stopped by
SIGINT), exec with and without a PTY, psql / redis-cli, maintenance on/off,
restart (backend without a failed request, redis in place), doctor.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid

import pytest
from deploy_support import ClientLoop, get
from ssl_support import fab, inv, task_env
from stack_rig import StackRig

from fabfile.config import SERVICES

pytestmark = pytest.mark.rig

# (unique per run: the rig is shared by parallel runs of the suite)
PROJECT = f"maicivyapp{os.getpid()}"
SITE, GRAFANA = "maicivy.test", "grafana.maicivy.test"


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("appstack"), PROJECT,
                   deploy={"health_timeout_seconds": 60})
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


def as_json(proc) -> dict:
    assert proc.stdout.strip().startswith("{"), proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def compose_logs_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"compose.*{PROJECT}.*logs"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def curl(port: int, host: str, path: str, scheme: str = "https") -> tuple[int, dict, str]:
    out = subprocess.run(
        ["curl", "-sk", "-D", "-", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1",
         f"{scheme}://{host}:{port}{path}"], capture_output=True, text=True, timeout=20).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    code = int(lines[0].split()[1]) if lines else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return code, headers, body


# --- status ----------------------------------------------------------------------------


def test_status_shows_every_service_with_image_digest_uptime_and_ports(stack):
    proc = fab(stack, "app.status", "--json")
    data = as_json(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["healthy"] is True
    by = {s["service"]: s for s in data["services"]}
    assert list(by) == list(SERVICES)
    for s in by.values():
        assert s["state"] == "running" and s["ok"], s
        assert s["image"].startswith("127.0.0.1:5000/maicivy/")
        assert s["digest"].startswith("sha256:"), s
        assert s["uptime_seconds"] is not None and s["restarts"] == 0
    https = stack.settings.publish.https
    assert f"127.0.0.1:{https}->443/tcp" in by["nginx"]["ports"]
    assert by["backend"]["ports"] == []
    assert data["lock"] is None and data["maintenance"] is None

    table = inv(stack, "app.status")
    assert table.returncode == 0, table.stdout + table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["SERVICE", "STATE", "HEALTH"]
    assert "deploy lock: free" in table.stdout
    assert "localhost: all services healthy" in table.stdout


# --- deploy --dry-run as a plan ---------------------------------------------------------


def test_deploy_dry_run_is_a_plan_one_line_when_nothing_changes(stack):
    from deploy_support import tree_fingerprint
    from rig.images import BACKEND_V2

    root = stack.tmp / "srv"
    before = tree_fingerprint(root)
    same = fab(stack, "deploy", "--dry-run")
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.strip().splitlines() == [
        f"{stack.ssh_host.user}@127.0.0.1:{stack.ssh_host.port}: nothing would change "
        "(files, images and containers are current)"]

    env = task_env(stack, images={"backend": BACKEND_V2}, rate_limit={"per_minute": 1200})
    proc = fab(stack, "deploy", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^-.*rate=6000r/m;$", out, re.M) and re.search(r"^\+.*rate=1200r/m;$",
                                                                      out, re.M)
    assert re.search(r"^\+    image: \S+/backend:v2$", out, re.M)
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in SERVICES}
    v2_digest = subprocess.run(["docker", "image", "inspect", "--format",
                                "{{index .RepoDigests 0}}", BACKEND_V2], capture_output=True,
                               text=True).stdout.strip().split("@sha256:")[1][:12]
    assert re.search(rf"->\s+{re.escape(BACKEND_V2)}@{v2_digest}\s", rows["backend"])
    assert "replace beside the old (image " in rows["backend"]
    assert rows["nginx"].rstrip().endswith("reload (a file it mounts changed)")
    assert rows["postgres"].rstrip().endswith("nothing")
    assert "backup first: backup.postgres (pre-deploy)" in out
    assert "[dry-run] would run" not in out and "set -e" not in out
    verbose = fab(stack, "deploy", "--dry-run", "--verbose", env=env)
    assert "[dry-run] would run: docker compose" in verbose.stdout
    assert tree_fingerprint(root) == before


# --- logs ------------------------------------------------------------------------------


def test_logs_of_chosen_services_with_tail_and_grep(stack):
    marker = f"/grep-{uuid.uuid4().hex}"
    for _ in range(3):
        get(SITE, stack.settings.publish.https, marker)
    proc = fab(stack, "app.logs", "--service", "nginx", "--tail", "200", "--grep", marker)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout
    assert all(marker in line and line.startswith("nginx") for line in lines)

    both = inv(stack, "app.logs", "--service", "backend,frontend", "--tail", "3")
    assert both.returncode == 0, both.stderr
    names = {line.split()[0].split("-")[0] for line in both.stdout.splitlines() if line}
    assert {"backend", "frontend"} <= names, both.stdout

    bad = fab(stack, "app.logs", "--service", "mysql")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown service 'mysql'")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("tool", ["fab", "inv"])
def test_logs_follow_streams_and_ctrl_c_ends_it_on_both_sides(stack, tool):
    from conftest import ROOT

    argv = ([*stack.ssh_host.fab_argv()] if tool == "fab" else ["inv", "-r", str(ROOT)])
    proc = subprocess.Popen([*argv, "app.logs", "--service", "nginx", "--follow", "--tail", "0"],
                            env=task_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        marker = f"/follow-{uuid.uuid4().hex}"
        got = b""
        deadline = time.monotonic() + 60
        while marker.encode() not in got and time.monotonic() < deadline:
            get(SITE, stack.settings.publish.https, marker)  # a 404 line in nginx's log
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                got += os.read(proc.stdout.fileno(), 65536)
        assert marker.encode() in got, got[-2000:]  # streamed while the command still runs
        assert proc.poll() is None
        assert compose_logs_processes(), "the logs command should run now"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert rc == 130 and "Traceback" not in err, err
    deadline = time.monotonic() + 15
    while compose_logs_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compose_logs_processes() == []


# --- exec and shells -------------------------------------------------------------------


def run_in_pty(argv: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI with a terminal on stdin/stdout
        os.execvpe(argv[0], argv, env)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_exec_has_a_real_terminal_when_run_from_one(stack):
    rc, out = run_in_pty([*stack.ssh_host.fab_argv(), "app.exec", "backend", "tty"],
                         task_env(stack))
    assert rc == 0, out
    assert "/dev/pts/" in out, out
    plain = fab(stack, "app.exec", "backend", "tty")
    assert "not a tty" in plain.stdout, plain.stdout + plain.stderr
    cat = inv(stack, "app.exec", "backend", "cat /app/VERSION")
    assert cat.returncode == 0 and cat.stdout.strip() == "v1", cat.stdout + cat.stderr


def test_psql_and_redis_cli_take_credentials_from_the_container(stack):
    env_text = (stack.tmp / "srv" / ".env").read_text()
    secrets = [line.split("=", 1)[1] for line in env_text.splitlines()
               if line.startswith(("POSTGRES_PASSWORD=", "REDIS_PASSWORD="))]
    assert len(secrets) == 2
    sql = fab(stack, "app.psql", "--command", "select 40 + 2 as answer")
    assert sql.returncode == 0, sql.stdout + sql.stderr
    assert "42" in sql.stdout
    ping = inv(stack, "app.redis-cli", "--command", "ping")
    assert ping.returncode == 0 and "PONG" in ping.stdout, ping.stdout + ping.stderr
    for proc in (sql, ping):
        assert not any(s in proc.stdout + proc.stderr for s in secrets)


# --- maintenance -----------------------------------------------------------------------


def test_maintenance_on_answers_503_but_health_acme_and_grafana_keep_working(stack):
    https, http = stack.settings.publish.https, stack.settings.publish.http
    token = uuid.uuid4().hex
    challenge = stack.tmp / "webroot" / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    (challenge / token).write_text("acme-ok")
    try:
        on = fab(stack, "app.maintenance-on", "--reason", "db migration")
        assert on.returncode == 0, on.stdout + on.stderr
        assert "maintenance mode ON" in on.stdout
        code, headers, body = curl(https, SITE, "/")
        assert code == 503 and headers.get("retry-after") == "300"
        assert "Down for maintenance" in body
        assert "strict-transport-security" in headers
        assert curl(https, SITE, "/api/anything")[0] == 503
        assert curl(https, SITE, "/health")[0] == 200
        assert curl(https, SITE, "/health/deep")[0] == 200
        assert curl(https, GRAFANA, "/api/health")[0] == 200
        assert curl(http, SITE, f"/.well-known/acme-challenge/{token}", "http")[2] == "acme-ok"

        health = as_json(fab(stack, "health.check", "--json"))
        rows = {c["check"]: c for c in health["checks"]}
        assert rows["maintenance"]["status"] == "warning"
        assert "db migration" in rows["maintenance"]["detail"]
        assert rows["frontend"]["status"] == "ok"  # our checks see the real site
        st = as_json(inv(stack, "app.status", "--json"))
        assert "db migration" in st["maintenance"]
        # A deploy checks the real site behind the page and does not leave it on silently.
        dep = fab(stack, "deploy")
        assert dep.returncode == 0, dep.stdout + dep.stderr
        assert "note: maintenance mode is still ON" in dep.stdout
        assert curl(https, SITE, "/")[0] == 503
    finally:
        off = inv(stack, "app.maintenance-off")
    assert off.returncode == 0, off.stdout + off.stderr
    assert curl(https, SITE, "/")[0] == 200
    rows = {c["check"]: c for c in as_json(fab(stack, "health.check", "--json"))["checks"]}
    assert rows["maintenance"]["status"] == "ok"


# --- restart ---------------------------------------------------------------------------


def container_ids(service: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--filter",
                          f"label=com.docker.compose.project={PROJECT}", "--filter",
                          f"label=com.docker.compose.service={service}"],
                         capture_output=True, text=True).stdout
    return out.split()


def test_restart_backend_replaces_it_beside_the_old_without_a_failed_request(stack):
    before = container_ids("backend")
    with ClientLoop(SITE, stack.settings.publish.https, paths=("/health",), rate=40) as loop:
        time.sleep(1)
        proc = fab(stack, "app.restart", "backend")
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend: replace beside the old container: done in" in proc.stdout
    # progress: one line per step with its elapsed time, no live line off a terminal
    assert re.search(r"^backend: wait until the new container is healthy: done in [0-9.]+s$",
                     proc.stdout, re.M)
    assert "\r" not in proc.stdout and "\033[" not in proc.stdout
    assert loop.failures == [], loop.failures[:5]
    after = container_ids("backend")
    assert len(after) == 1 and after != before
    assert stack.service_health()["backend"] == "healthy"

    redis = inv(stack, "app.restart", "redis")
    assert redis.returncode == 0, redis.stdout + redis.stderr
    assert "redis: restart and wait until healthy: done in" in redis.stdout
    assert stack.service_health()["redis"] == "healthy"


# --- doctor ----------------------------------------------------------------------------


def test_doctor_finds_a_published_port_a_stale_lock_and_a_bad_env_mode(stack):
    from conftest import free_port
    from rig.images import TEST_IMAGES

    root = stack.tmp / "srv"
    env = root / ".env"
    state = root / ".deploy"
    state.mkdir(exist_ok=True)
    (state / "lock.owner").write_text("alice@laptop since 2026-01-01T00:00:00Z pid 1\n")
    port = free_port()
    leak = f"{PROJECT}-leak-{uuid.uuid4().hex[:6]}"
    holder = open(state / "lock", "a")  # a deploy that never ended: the lock stays held
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        subprocess.run(["docker", "run", "-d", "--name", leak, "-p", f"0.0.0.0:{port}:6379",
                        TEST_IMAGES["redis"]], check=True, capture_output=True, timeout=60)
        env.chmod(0o644)
        proc = fab(stack, "doctor", "--json")
        data = as_json(proc)
        rows = {c["check"]: c for c in data["checks"]}
        assert proc.returncode == 2 and data["exit_code"] == 2
        assert rows["ssh"]["status"] == "ok" and "host key verified" in rows["ssh"]["detail"]
        ports = rows["published ports"]
        assert ports["status"] == "fail" and f"{leak} 0.0.0.0:{port}->6379/tcp" in ports["detail"]
        assert "bypass ufw" in ports["fix"]
        assert rows["deploy lock"]["status"] == "warn"
        assert "alice@laptop" in rows["deploy lock"]["detail"]
        assert "deploy.unlock" in rows["deploy lock"]["fix"]
        assert rows[".env"]["status"] == "fail" and "mode 644" in rows[".env"]["detail"]
        assert f"chmod 600 {env}" in rows[".env"]["fix"]
        assert rows["docker"]["status"] == "ok" and rows["compose"]["status"] == "ok"
        assert rows["memory"]["status"] in ("ok", "warn")
        assert {f"certificate {SITE}", f"dns {SITE}", "clock"} <= set(rows)

        st = as_json(inv(stack, "app.status", "--json"))
        assert "alice@laptop" in st["lock"]

        text = inv(stack, "doctor")
        assert text.returncode == 2
        assert any(line.startswith("FAIL") and "published ports" in line
                   for line in text.stdout.splitlines())
        assert "-> chmod 600" in text.stdout
    finally:
        env.chmod(0o600)
        holder.close()
        (state / "lock.owner").unlink(missing_ok=True)
        subprocess.run(["docker", "rm", "-f", leak], capture_output=True, timeout=60)
    after = {c["check"]: c for c in as_json(fab(stack, "doctor", "--json"))["checks"]}
    assert leak not in after["published ports"]["detail"]
    assert after[".env"]["status"] == "ok" and after["deploy lock"]["status"] == "ok"


def test_backup_prints_one_progress_line_per_step(stack):
    proc = inv(stack, "backup.postgres", "--no-offsite")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^postgres backup: dump, verify, manifest: done in [0-9.]+s$",
                     proc.stdout, re.M), proc.stdout
    assert "\r" not in proc.stdout
