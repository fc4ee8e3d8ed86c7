"""An operator's first day on a fresh server, end to end, through the ``fab`` CLI.

One story, step after step as docs/OPERATIONS.md tells it, on a disposable
Debian 13 server booting systemd (fabfile.sandbox, as ``inv sandbox.up``),
with a private registry that wants a password and pebble as the ACME server
(tests/story_support.py). Each step asserts what the operator would observe:
the config nginx and Prometheus run, HTTPS answers, rows in the database.
The steps share one server, in order; a failed step leaves the next ones to
fail on its consequences.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_support import ClientLoop
from ssl_support import served_certificate
from story_support import DOMAIN, IMAGE, REGISTRY_NAME, World, image_ready

pytestmark = [pytest.mark.rig, pytest.mark.in_order]

ROOT = "/opt/maicivy"


@pytest.fixture(scope="module")
def world(ssh_host, tmp_path_factory):
    missing = image_ready()
    if missing:
        pytest.fail(f"{missing}: run tests/install-deps.sh (tests/rig/fresh-server/build.sh)")
    w = World(work=tmp_path_factory.mktemp("story"), client_key=ssh_host.client_key)
    try:
        yield w.up()
    finally:
        w.close()


def ok(proc, *expect: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for text in expect:
        assert text in out, out[-4000:]
    return out


def https(world: World, path: str = "/health", timeout: float = 5.0):
    return world.https(path, timeout=timeout)


def container(world: World, service: str) -> str:
    out = world.sh(f"docker ps -q --filter label=com.docker.compose.project=maicivy "
                   f"--filter label=com.docker.compose.service={service}").stdout.split()
    assert len(out) == 1, f"{service}: containers {out}"
    return out[0]


def in_service(world: World, service: str, command: str, check: bool = True):
    return world.sh(f"docker exec {container(world, service)} sh -c {shlex.quote(command)}",
                    check=check)


# --- the story ----------------------------------------------------------------------------


def test_00_sandbox_up_prints_the_key_to_trust_and_down_removes_it(ssh_host, tmp_path):
    """The CLI a user types: the printed known_hosts line lets ssh in, strictly."""
    missing = image_ready()
    if missing:
        pytest.fail(f"{missing}: run tests/install-deps.sh")
    name = f"maicivy-sandbox-test-{tmp_path.name[-8:]}"
    inv = ["inv", "-r", str(Path(__file__).resolve().parent.parent)]
    up = subprocess.run([*inv, "sandbox.up", "--name", name, "--image", IMAGE,
                         "--key", str(ssh_host.client_key.with_suffix(".pub"))],
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        line = next(x.strip() for x in up.stdout.splitlines() if x.strip().startswith("[127."))
        target = re.search(r"fab -H (root@127\.0\.0\.1:(\d+)) provision", up.stdout)
        assert target, up.stdout
        known = tmp_path / "known_hosts"
        known.write_text(line + "\n")
        ssh = subprocess.run(
            ["ssh", "-p", target.group(2), "-i", str(ssh_host.client_key), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
             "root@127.0.0.1", "cat /proc/1/comm; systemctl is-system-running"],
            capture_output=True, text=True, timeout=60)
        assert ssh.stdout.split() == ["systemd", "running"], ssh.stdout + ssh.stderr
    finally:
        down = subprocess.run([*inv, "sandbox.down", "--name", name], capture_output=True,
                              text=True, timeout=300)
    assert down.returncode == 0 and f"sandbox {name} removed" in down.stdout, down.stderr
    gone = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"name=^{name}$"],
                          capture_output=True, text=True).stdout.strip()
    volume = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={name}-docker"],
                            capture_output=True, text=True).stdout.strip()
    assert gone == "" and volume == ""


def test_01_provision_a_fresh_server_twice(world):
    assert world.sh("command -v docker || true").stdout.strip() == ""  # nothing of the stack
    out = ok(world.fab("provision"), "changed: installed packages")
    assert "skipped" not in out, out
    assert world.sh("docker compose version --short").stdout.strip()
    assert world.sh("systemctl is-enabled maicivy.service").stdout.strip() == "enabled"
    assert world.sh("crontab -l").stdout.count("# BEGIN maicivy-ops") == 1
    assert "Status: active" in world.sh("ufw status").stdout
    again = ok(world.fab("provision"))
    assert "changed:" not in again, again
    assert again.rstrip().endswith("nothing changed"), again


def test_02_first_deploy_starts_with_a_temporary_certificate(world):
    # Guide step 5: the registry credentials go into the server's .env.
    world.sh(f"sed -i -e 's|^DOCKER_REGISTRY=.*|DOCKER_REGISTRY={REGISTRY_NAME}|' "
             f"-e 's|^REGISTRY_USERNAME=.*|REGISTRY_USERNAME={world.registry_user}|' "
             f"-e 's|^REGISTRY_PASSWORD=.*|REGISTRY_PASSWORD={world.registry_password}|' "
             f"{ROOT}/.env")
    # No certificate obtained yet (provision may have made stand-ins, nothing more).
    assert world.sh("ls /etc/letsencrypt/live 2>/dev/null || true").stdout.strip() == ""
    # Private images: the registry refuses an anonymous client.
    anon = world.sh(f"curl -s -o /dev/null -w '%{{http_code}}' https://{REGISTRY_NAME}/v2/ "
                    f"--cacert /etc/docker/certs.d/{REGISTRY_NAME}/ca.crt").stdout
    assert anon == "401"
    out = ok(world.fab("deploy"))
    assert world.registry_password not in out
    status, body = https(world)
    assert status == 200 and json.loads(body)["version"] == "v1"
    cert = served_certificate(world.box.https_port, DOMAIN)
    assert cert["issuer"] == cert["subject"], cert  # self-signed stand-in


def test_03_ssl_obtain_against_pebble(world):
    ok(world.fab("ssl.obtain"))
    cert = served_certificate(world.box.https_port, DOMAIN)
    assert "Pebble" in cert["issuer"], cert
    ok(world.fab("ssl.status"), "Pebble")


def test_04_health_check_passes(world):
    ok(world.fab("health.check"))


def test_05_changed_nginx_setting_and_alert_threshold_are_in_effect(world):
    world.write_settings(rate_limit={"per_minute": 600, "burst": 5},
                         alerts={"cpu_used_percent": 77})
    ok(world.fab("deploy"))
    # What nginx runs, not what was uploaded.
    running = in_service(world, "nginx", "nginx -T 2>/dev/null").stdout
    assert "rate=600r/m" in running and "burst=5 " in running, running[-2000:]
    # Behaviour: 20 requests at once from one client: about burst + 1 pass, the rest 429.
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: https(world, "/api/echo")[0], range(20)))
    assert codes.count(429) >= 10 and codes.count(200) >= 5, codes
    # Prometheus evaluates the new threshold.
    rules = json.loads(in_service(world, "prometheus",
                                  "wget -qO- http://127.0.0.1:9090/api/v1/rules").stdout)
    exprs = {r["name"]: r["query"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert re.search(r">\s*77(\s|$)", exprs["HighCPUUsage"]), exprs["HighCPUUsage"]


def test_06_deploy_v2_images_from_the_authenticated_registry(world):
    world.write_settings(images={"backend": "backend:v2", "frontend": "frontend:v2"})
    ok(world.fab("deploy"))
    status, body = https(world)
    assert status == 200 and json.loads(body)["version"] == "v2"
    image = world.sh(f"docker inspect -f '{{{{.Config.Image}}}}' {container(world, 'backend')}")
    assert image.stdout.strip() == f"{REGISTRY_NAME}/maicivy/backend:v2"
    # nginx's rate limit is back to what the client loop below needs.
    assert "rate=6000r/m" in in_service(world, "nginx", "nginx -T 2>/dev/null").stdout


def test_07_backend_crash_docker_restarts_it_and_the_site_keeps_answering(world):
    backend = container(world, "backend")
    pid = world.sh(f"docker inspect -f '{{{{.State.Pid}}}}' {backend}").stdout.strip()
    with ClientLoop(DOMAIN, world.box.https_port, paths=("/health",), rate=20, workers=2,
                    max_seconds=90) as loop:
        time.sleep(2)
        world.sh(f"kill -9 {pid}")  # the process dies; Docker's restart policy acts
        killed = time.monotonic()
        deadline = killed + 60
        while time.monotonic() < deadline:
            state = world.sh(f"docker inspect -f '{{{{.State.Pid}}}} {{{{.State.Health.Status}}}}' "
                             f"{backend}", check=False).stdout.split()
            if len(state) == 2 and state[0] not in (pid, "0") and state[1] == "healthy":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"backend not restarted and healthy within 60s: {state}")
        back = time.monotonic()
        time.sleep(15)  # beyond the restart window: nginx must reach the new address
    late = [t for t in loop.failure_times if t > back + 12]
    print(f"restart window {back - killed:.1f}s; {len(loop.failures)} failed of {loop.total}; "
          f"{len(late)} after it")
    assert loop.total > 100
    assert not late, loop.failures[-5:]


def test_08_cron_lines_run_as_cron_would(world):
    crontab = world.sh("crontab -l").stdout
    block = crontab.split("# BEGIN maicivy-ops", 1)[1].split("# END maicivy-ops", 1)[0]
    lines = [line for line in block.splitlines()[1:] if line.strip()]
    assert len(lines) == 4, lines
    env = "env -i PATH=/usr/bin:/bin SHELL=/bin/sh HOME=/root LOGNAME=root"
    for line in lines:
        command = line.split(None, 5)[5]
        proc = world.sh(f"{env} /bin/sh -c {shlex.quote(command)}", check=False, timeout=600)
        log = re.search(r">> (\S+)", command).group(1)
        tail = world.sh(f"tail -n 5 {log}").stdout
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{tail}"
    assert world.sh("ls /var/backups/maicivy").stdout.strip()


def test_09_a_burst_of_ten_fab_runs_is_not_locked_out_by_the_firewall(world):
    for _ in range(10):
        ok(world.fab("deploy.history"))


def test_10_reboot_the_systemd_unit_brings_the_stack_back(world):
    world.reboot()  # systemd shuts down (the unit's ExecStop: compose stop), then boots
    world.wait_healthy()
    # Stopped containers are not restarted by Docker's policy: the unit started them.
    unit = world.sh("systemctl show maicivy.service -p ActiveState -p Result").stdout
    assert "ActiveState=active" in unit and "Result=success" in unit, unit
    ok(world.fab("health.check"))


def test_11_backup_change_data_restore(world):
    psql = ("docker exec -i {c} sh -c 'psql -v ON_ERROR_STOP=1 -qAt "
            "-U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\"'")
    pg = psql.format(c=container(world, "postgres"))
    world.sh(f"echo \"CREATE TABLE story (v text); INSERT INTO story VALUES ('before');\" | {pg}")
    ok(world.fab("backup.all"))
    world.sh(f"echo \"DELETE FROM story; INSERT INTO story VALUES ('after');\" | {pg}")
    assert world.sh(f"echo 'SELECT v FROM story' | {pg}").stdout.split() == ["after"]
    ok(world.fab("restore.postgres", "--yes"))
    pg = psql.format(c=container(world, "postgres"))
    assert world.sh(f"echo 'SELECT v FROM story' | {pg}").stdout.split() == ["before"]


def test_12_rollback_then_health_check(world):
    ok(world.fab("deploy.rollback"))
    status, body = https(world)
    assert status == 200 and json.loads(body)["version"] == "v1"
    ok(world.fab("health.check"))
