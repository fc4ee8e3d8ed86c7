"""Pure decisions of issue 10 (no server): the SSH port check before ufw, the
server-side identity snippet of the deploy log."""

from __future__ import annotations

import os
import subprocess

from fabfile.audit import IDENTITY_SH
from fabfile.config import load_settings
from fabfile.deploy.history import log_append
from fabfile.provision import live_ssh_port, ssh_port_lockout


def test_live_ssh_port_is_the_server_side_port():
    assert live_ssh_port("203.0.113.7 51234 198.51.100.2 2222") == 2222
    assert live_ssh_port("") is None
    assert live_ssh_port("garbage") is None


def test_ufw_is_refused_when_the_session_uses_another_port():
    assert ssh_port_lockout("203.0.113.7 51234 198.51.100.2 22", 22) is None
    assert ssh_port_lockout("", 22) is None  # not over SSH (console, cron): nothing to lose
    why = ssh_port_lockout("203.0.113.7 51234 198.51.100.2 2222", 22)
    assert why.startswith("this SSH session reached sshd on port 2222, but "
                          "provision.ssh_port is 22")
    assert "provision.ssh_port: 2222" in why and "\n" not in why


def _who(env):
    script = IDENTITY_SH + '\necho "$WHO"'
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                          env=env).stdout.strip()


def test_identity_is_computed_where_the_line_is_written():
    base = {k: v for k, v in os.environ.items() if k not in ("SSH_CONNECTION", "SUDO_USER")}
    who = _who({**base, "SSH_CONNECTION": "203.0.113.7 51234 198.51.100.2 22",
                "SUDO_USER": "alice"})
    assert who.endswith(" sudo_user=alice ssh_from=203.0.113.7:51234")
    assert who.startswith("server_user=")
    assert _who(base).endswith(" sudo_user=- ssh_from=-")


def test_every_deploy_log_writer_adds_the_identity(tmp_path):
    s = load_settings(invoke_section={"root": str(tmp_path)}, environ={}, files=[])
    (tmp_path / ".deploy").mkdir()
    line = "2026-01-01T00:00:00Z user=x result=ok it's \"quoted\" $(id)"
    subprocess.run(["sh", "-c", log_append(s, line)], check=True, timeout=10)
    logged = (tmp_path / ".deploy/deploy.log").read_text()
    assert logged.startswith(line + " server_user=") and logged.endswith("ssh_from=-\n")
    assert "$(id)" in logged  # the line went through the shell quoted: not expanded
