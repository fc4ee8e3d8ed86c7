"""The rendered compose stack comes up healthy on the rig, driven through SSH.

Proves the rig itself (Docker engine, Compose v2, local registry, test images)
and the default render: all 8 services reach "healthy" with
`docker compose up -d --wait`, run over a real SSH connection.
"""

from __future__ import annotations

import os

import pytest
from stack_rig import StackRig

pytestmark = pytest.mark.rig

PROJECT = f"maicivyup{os.getpid()}"  # (parallel runs on one Docker)

SERVICES = {"postgres", "redis", "backend", "frontend", "nginx", "prometheus", "grafana",
            "node-exporter", "alertmanager"}


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("stackup"), PROJECT)
    try:
        rig.prepare()
        rig.run(rig.compose("pull", "--quiet"), timeout=600)
        rig.up()
        yield rig
    finally:
        rig.down()


def test_all_nine_services_come_up_healthy_over_ssh(stack):
    health = stack.service_health()
    assert set(health) == SERVICES
    assert health == {name: "healthy" for name in SERVICES}


def test_databases_are_not_reachable_from_nginx(stack):
    r = stack.host.check(stack.compose("exec", "-T", "nginx", "sh", "-c",
                                       "getent hosts postgres redis || echo none"))
    assert r.stdout.strip() == "none"
    r = stack.host.check(stack.compose("exec", "-T", "backend", "sh", "-c",
                                       "getent hosts postgres >/dev/null && echo found"))
    assert r.stdout.strip() == "found"


def test_no_secret_in_any_container_command_line(stack):
    env = stack.host.read_file(stack.settings.env_file).decode()
    pairs = [line.split("=", 1) for line in env.splitlines() if "=" in line]
    secrets = [value for name, value in pairs if name.endswith("PASSWORD") and value]
    assert len(secrets) == 3 and all(len(s) >= 16 for s in secrets)
    ps = stack.host.check("ps -eo args").stdout
    inspect = stack.host.check(
        "docker inspect --format '{{.Path}} {{join .Args \" \"}}' "
        f"$(docker ps -q --filter label=com.docker.compose.project={PROJECT})").stdout
    for secret in secrets:
        assert secret not in ps
        assert secret not in inspect
