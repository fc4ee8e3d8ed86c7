"""provision against a disposable host: a container of its own (own network
namespace, sshd as PID 1, no systemd) reached by the real ``fab`` CLI over SSH.

Nothing here touches the CI machine: ufw runs inside the container's network
namespace (--cap-add NET_ADMIN), packages are pre-installed in its image and
pip installs from the image's wheelhouse (no package index).

One host is provisioned once for the module (``provisioned``); each test
starts from that provisioned host and leaves it so. The refusal test has a
fresh host of its own.
"""

from __future__ import annotations

import os
import re
import shlex

import pytest
from deploy_support import (
    fab,
    provision_host_image,
    start_provision_host,
    stop_provision_host,
    write_config,
)

from fabfile.config import load_settings
from fabfile.provision import CRON_BEGIN, SETTINGS_PATH, cron_lines, ufw_is_configured
from fabfile.stack import GENERATED_SECRETS, parse_env, remote_files

pytestmark = pytest.mark.rig

OVERRIDES = {"provision": {"pip_options": "--no-index --find-links /opt/wheels"}}
ROOT = "/opt/maicivy"
SECRETS = GENERATED_SECRETS


def fresh_host(ssh_host, work, name):
    """A fresh host (not provisioned yet); stop_provision_host(name) removes it."""
    image = provision_host_image(work)
    host = start_provision_host(image, name, ssh_host.client_key.with_suffix(".pub"), work)
    host.config = write_config(work / "maicivy.yaml", OVERRIDES, [str(host.known_hosts)])
    host.target = f"root@127.0.0.1:{host.port}"
    return host


@pytest.fixture(scope="module")
def target(ssh_host, tmp_path_factory):
    """The module's host, provisioned once; ``target.first`` is that first run."""
    name = f"maicivy-provision-{os.getpid()}"
    try:
        host = fresh_host(ssh_host, tmp_path_factory.mktemp("provision"), name)
        host.first = provision(ssh_host, host)
        yield host
    finally:
        stop_provision_host(name)


@pytest.fixture
def fresh(ssh_host, tmp_path):
    name = f"maicivy-provision-fresh-{os.getpid()}"
    try:
        yield fresh_host(ssh_host, tmp_path, name)
    finally:
        stop_provision_host(name)


def provision(ssh_host, target, *args):
    return fab(ssh_host, target.config, "provision", *args, host=target.target, timeout=900)


def env_of(target) -> dict[str, str]:
    return parse_env(target.exec(f"cat {ROOT}/.env").stdout)


def test_provision_refuses_a_firewall_that_would_lock_out_this_session(ssh_host, fresh,
                                                                       tmp_path):
    """sshd answers on 22 in there; with provision.ssh_port 2222, ufw would shut us out."""
    target = fresh
    wrong = write_config(tmp_path / "wrong.yaml",
                         {"provision": {**OVERRIDES["provision"], "ssh_port": 2222}},
                         [str(target.known_hosts)])
    proc = fab(ssh_host, wrong, "provision", host=target.target, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout + proc.stderr
    assert "reached sshd on port 22, but provision.ssh_port is 2222" in errors[0]
    assert "Traceback" not in proc.stderr
    # Refused before anything changed: no stack root, firewall untouched.
    assert target.exec(f"test -e {ROOT}", check=False).returncode != 0
    assert "Status: active" not in target.exec("ufw status", check=False).stdout


def test_first_provision_sets_up_the_fresh_server(target):
    proc = target.first
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Packages were all there (pre-installed): no apt-get, no package mirror.
    assert "ok: packages installed" in out
    assert "skipped: systemd is not PID 1" in out
    assert "installed but not enabled" in out
    assert f"changed: installed maicivy-ops in {ROOT}/ops/.venv" in out
    assert "changed: installed the Docker Compose v2 plugin" in out
    # .env: mode 600, strong secrets, none of them in the output.
    assert target.exec(f"stat -c '%a %U' {ROOT}/.env").stdout.strip() == "600 root"
    env = env_of(target)
    for name in SECRETS:
        assert len(env[name]) >= 32 and env[name] != "CHANGE_ME"
        assert env[name] not in out
    assert re.search(r"\.env: set .*POSTGRES_PASSWORD.* \(values not shown\)", out)
    # Directories with their modes and owners.
    modes = target.exec(f"stat -c '%n %a %U' {ROOT} {ROOT}/.deploy /var/backups/maicivy "
                        "/var/log/maicivy").stdout.split("\n")
    assert modes[:4] == [f"{ROOT} 755 root", f"{ROOT}/.deploy 700 root",
                         "/var/backups/maicivy 700 root", "/var/log/maicivy 750 root"]
    # The unit, rendered and installed.
    settings = load_settings(invoke_section=OVERRIDES, environ={}, files=[])
    unit = remote_files(settings)[f"{ROOT}/systemd/maicivy.service"].decode()
    assert target.exec("cat /etc/systemd/system/maicivy.service").stdout == unit
    # Compose v2 works as docker's plugin (no daemon needed for the version).
    assert target.exec("docker compose version --short").stdout.strip()
    # Firewall inside the host's own network namespace.
    assert ufw_is_configured(target.exec("ufw status verbose").stdout, 22)


def test_inv_on_the_server_sees_the_same_settings_and_tasks(target):
    venv = f"{ROOT}/ops/.venv/bin"
    listed = target.exec(f"cd / && {venv}/inv -r {ROOT}/ops --list").stdout
    for task in ("backup.postgres", "backup.redis", "ssl.renew", "backup.verify",
                 "deploy", "provision"):
        assert re.search(rf"^\s+{re.escape(task)}\b", listed, re.M), listed
    seen = target.exec(f"cd / && {venv}/python -c 'from fabfile.config import load_settings; "
                       "s = load_settings(); print(s.provision.pip_options, s.root)'").stdout
    assert seen.strip() == f"--no-index --find-links /opt/wheels {ROOT}"


def test_cron_block_is_installed_once_and_each_line_runs_as_written(target):
    settings = load_settings(invoke_section=OVERRIDES, environ={}, files=[])
    crontab = target.exec("crontab -l").stdout
    assert crontab.count(CRON_BEGIN) == 1
    lines = cron_lines(settings)
    for line in lines:
        assert crontab.count(line + "\n") == 1
    # Run each command exactly as cron would: /bin/sh -c, cron's minimal env.
    cron_env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": "/root", "LOGNAME": "root"}
    for line in lines:
        command = line.split(" ", 5)[5]
        log = re.search(r">> (\S+)", command).group(1)
        before = target.exec(f"cat {log} 2>/dev/null || true").stdout
        env_args = " ".join(f"{k}={shlex.quote(v)}" for k, v in cron_env.items())
        target.exec(f"env -i {env_args} /bin/sh -c {shlex.quote(command)}", check=False)
        added = target.exec(f"cat {log}").stdout[len(before):]
        print(f"--- {command}\n{added[-600:]}")
        task = command.split(" backup.")[-1] if " backup." in command else "ssl.renew"
        # The task ran (it fails: this host has no Docker daemon or stack), and
        # did not die on a missing task, import error or unreadable settings.
        assert "No idea what" not in added, added
        assert "Traceback" not in added, added
        assert "ConfigError" not in added and "is not a known setting" not in added, added
        assert added.strip(), f"{task}: nothing in {log}"


def test_second_provision_changes_nothing(ssh_host, target):
    env_before = target.exec(f"sha256sum {ROOT}/.env").stdout
    crontab_before = target.exec("crontab -l").stdout
    proc = provision(ssh_host, target)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "changed:" not in out
    assert out.rstrip().endswith("nothing changed")
    assert target.exec(f"sha256sum {ROOT}/.env").stdout == env_before
    assert target.exec("crontab -l").stdout == crontab_before


def test_set_values_are_kept_and_only_missing_secrets_generated(ssh_host, target):
    env = env_of(target)
    target.exec(f"sed -i -e '/^REDIS_PASSWORD=/d' -e 's/^CLAUDE_API_KEY=.*/CLAUDE_API_KEY=sk-real/'"
                f" {ROOT}/.env && chmod 644 {ROOT}/.env")
    proc = provision(ssh_host, target)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    after = env_of(target)
    assert after["CLAUDE_API_KEY"] == "sk-real"
    assert after["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    assert after["GF_SECURITY_ADMIN_PASSWORD"] == env["GF_SECURITY_ADMIN_PASSWORD"]
    assert len(after["REDIS_PASSWORD"]) >= 32 and after["REDIS_PASSWORD"] != env["REDIS_PASSWORD"]
    assert "set REDIS_PASSWORD (values not shown)" in out
    for value in after.values():
        if len(value) >= 16:
            assert value not in out
    assert target.exec(f"stat -c %a {ROOT}/.env").stdout.strip() == "600"
    assert "changed: installed" not in out



def test_failed_pip_install_reports_its_cause(ssh_host, target, tmp_path):
    """The index is the host's own loopback, where nothing listens. The install
    marker and the settings file this run changes are put back afterwards."""
    config = write_config(tmp_path / "offline.yaml", {"provision": {
        "pip_options": "--index-url http://127.0.0.1:9/simple --retries 0"}},
        [str(target.known_hosts)])
    kept = {f"{ROOT}/ops/.venv/.maicivy-installed": "/root/installed.kept",
            SETTINGS_PATH: "/root/settings.kept"}
    for path, copy in kept.items():
        target.exec(f"cp -p {path} {copy}")
    target.exec(f"rm -f {ROOT}/ops/.venv/.maicivy-installed")
    try:
        proc = fab(ssh_host, config, "provision", host=target.target, timeout=900)
    finally:
        for path, copy in kept.items():
            target.exec(f"mv -f {copy} {path}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    failed = next(line for line in out.splitlines() if "FAILED: installing maicivy-ops" in line)
    assert "network: Connection refused" in failed, failed
    assert "No matching distribution found" in failed, failed
    assert "originates from a subprocess" not in failed
