"""Trust nothing from outside, on the real rig: ProxyJump host keys, SSH failures as
one line, the server-side identity in the deploy log, encrypted S3 objects.

Everything talks to 127.0.0.1 only: a second sshd started here is the jump host,
moto's S3 server is started here.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import start_sshd
from test_errors_cli import one_error_line

from fabfile.audit import IDENTITY_SH
from fabfile.config import load_settings
from fabfile.deploy.history import log_append
from fabfile.host import Host, harden_connection
from fabfile.lock import stack_lock

pytestmark = pytest.mark.rig

ROOT = Path(__file__).resolve().parent.parent


def cli(argv, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
    environ.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/",
                          env=environ)


# --- ProxyJump: the gateway's host key is checked too ---------------------------------


@pytest.fixture(scope="module")
def jump(tmp_path_factory):
    host, proc = start_sshd(tmp_path_factory.mktemp("jump-sshd"))
    try:
        yield host
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _via_jump(ssh_host, jump, tmp: Path, jump_known: str):
    """fab argv + env reaching ssh_host (as 'localhost') through the jump sshd."""
    # The target is named 'localhost' so that fabric does not take the jump
    # (127.0.0.1) for the target itself; the jump sshd resolves it.
    (tmp / "ssh_config").write_text(
        "Host target\n"
        "  HostName localhost\n"
        f"  Port {ssh_host.port}\n"
        f"  User {ssh_host.user}\n"
        f"  ProxyJump {jump.user}@127.0.0.1:{jump.port}\n")
    known = tmp / "known_hosts"
    known.write_text(f"[localhost]:{ssh_host.port} {ssh_host.host_pubkey}\n{jump_known}")
    # Both sshds accept the same client key (authorized in each).
    (jump.workdir / "authorized_keys").write_text(
        ssh_host.client_key.with_suffix(".pub").read_text())
    argv = ["fab", "-r", str(ROOT), "-S", str(tmp / "ssh_config"), "-H", "target",
            "-i", str(ssh_host.client_key), "deploy.history"]
    env = {"MAICIVY_KNOWN_HOSTS": f"[{known}]", "MAICIVY_ROOT": str(tmp / "stack")}
    return argv, env


def _jump_logins(jump) -> int:
    return (jump.workdir / "sshd.log").read_text().count("Accepted publickey")


def test_proxyjump_gateway_with_a_forged_key_is_refused(ssh_host, jump, tmp_path):
    forged = jump.forged_known_hosts(tmp_path).read_text()
    argv, env = _via_jump(ssh_host, jump, tmp_path, forged)
    proc = cli(argv, env)
    one_error_line(proc, 2, "host key of 127.0.0.1 (on the way to", "has CHANGED",
                   "refusing")
    assert "no deploy recorded" not in proc.stdout


def test_proxyjump_gateway_with_an_unknown_key_is_refused(ssh_host, jump, tmp_path):
    argv, env = _via_jump(ssh_host, jump, tmp_path, "")
    proc = cli(argv, env)
    one_error_line(proc, 2, "is unknown", f"127.0.0.1]:{jump.port}")


def test_proxyjump_gateway_with_the_right_key_works(ssh_host, jump, tmp_path):
    before = _jump_logins(jump)
    argv, env = _via_jump(ssh_host, jump, tmp_path, jump.known_hosts.read_text())
    proc = cli(argv, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no deploy recorded yet" in proc.stdout
    assert _jump_logins(jump) == before + 1  # really went through the jump host


def test_gateway_connections_are_hardened_recursively(ssh_host, jump):
    from fabric import Connection

    inner = Connection(f"{jump.user}@127.0.0.1:{jump.port}")
    outer = Connection(f"{ssh_host.user}@localhost:{ssh_host.port}",
                       gateway=Connection(f"{jump.user}@127.0.0.1:{jump.port}", gateway=inner))
    harden_connection(outer, [])
    import paramiko

    for conn in (outer, outer.gateway, inner):
        assert isinstance(conn.client._policy, paramiko.RejectPolicy)


# --- SSH failures are one line ----------------------------------------------------------


def test_wrong_ssh_key_is_one_line(ssh_host, tmp_path):
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
                   check=True)
    argv = ["fab", "-r", str(ROOT), "-H", f"{ssh_host.user}@{ssh_host.host}:{ssh_host.port}",
            "-i", str(wrong), "deploy.history"]
    proc = cli(argv, {"MAICIVY_KNOWN_HOSTS": f"[{ssh_host.known_hosts}]",
                      "SSH_AUTH_SOCK": "", "HOME": str(tmp_path)})
    one_error_line(proc, 3, "cannot log in to", "key")


def test_missing_key_file_is_one_line(ssh_host, tmp_path):
    """A local path that does not exist (OSError in paramiko): one line, exit 1."""
    argv = ["fab", "-r", str(ROOT), "-H", f"{ssh_host.user}@{ssh_host.host}:{ssh_host.port}",
            "-i", str(tmp_path / "no-such-key"), "deploy.history"]
    proc = cli(argv, {"MAICIVY_KNOWN_HOSTS": f"[{ssh_host.known_hosts}]",
                      "SSH_AUTH_SOCK": "", "HOME": str(tmp_path)})
    one_error_line(proc, 1, f"{tmp_path / 'no-such-key'}: No such file or directory")


def test_nothing_listening_is_one_line(ssh_host, tmp_path):
    from conftest import free_port

    port = free_port()
    argv = ["fab", "-r", str(ROOT), "-H", f"{ssh_host.user}@127.0.0.1:{port}",
            "-i", str(ssh_host.client_key), "deploy.history"]
    proc = cli(argv, {"MAICIVY_KNOWN_HOSTS": f"[{ssh_host.known_hosts}]"})
    one_error_line(proc, 3, "cannot reach")


# --- the deploy log records who, as the server sees it -----------------------------------


def test_deploy_log_records_the_server_side_identity(ssh_host, tmp_path):
    settings = load_settings(invoke_section={"root": str(tmp_path / "stack")}, environ={},
                             files=[])
    conn = ssh_host.connection()
    harden_connection(conn, [str(ssh_host.known_hosts)])
    host = Host(conn)
    with stack_lock(host, settings, "deploy", owner="deploy by mallory@laptop since now") as lock:
        lock.finish("ok", log_append(
            settings, "2026-01-01T00:00:00Z user=mallory@laptop result=ok release=- images=-"))
    conn.close()
    log = (tmp_path / "stack/.deploy/deploy.log").read_text().splitlines()
    assert len(log) == 1
    line = log[0]
    assert line.startswith("2026-01-01T00:00:00Z user=mallory@laptop result=ok")
    assert f" server_user={ssh_host.user} sudo_user=- ssh_from=127.0.0.1:" in line


def test_identity_is_found_when_sudo_dropped_ssh_connection(ssh_host):
    """sudo's env_reset drops SSH_CONNECTION: it is read from the session's process."""
    conn = ssh_host.connection()
    harden_connection(conn, [str(ssh_host.known_hosts)])
    script = IDENTITY_SH + '\necho "$WHO"'
    # Like sudo: a parent process that has SSH_CONNECTION runs a child whose
    # environment lacks it (sudo forks the command; '; true' keeps sh from exec'ing).
    sudo_like = f"env -u SSH_CONNECTION SUDO_USER=alice sh -c {shlex.quote(script)}; true"
    r = Host(conn).check(f"sh -c {shlex.quote(sudo_like)}")
    conn.close()
    assert r.ok, r.stderr
    assert r.stdout.strip().startswith(f"server_user={ssh_host.user} sudo_user=alice "
                                       "ssh_from=127.0.0.1:")


# --- S3: objects are encrypted at rest ------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    from backup_support import Moto

    server = Moto(tmp_path_factory.mktemp("moto-sse"))
    server.client().create_bucket(Bucket="sse-test")
    try:
        yield server
    finally:
        server.stop()


def test_s3_uploads_ask_for_and_check_server_side_encryption(moto):
    from fabfile.backup import s3 as backup_s3

    s3 = moto.client()
    small = b"x" * 1000
    big = os.urandom(6 * 1024 * 1024)
    import hashlib

    backup_s3.upload(s3, "sse-test", "small.gz", io.BytesIO(small),
                     sha256=hashlib.sha256(small).hexdigest(), size=len(small))
    up = backup_s3.upload(s3, "sse-test", "big.gz", io.BytesIO(big), part_size=5 * 1024 * 1024,
                          sha256=hashlib.sha256(big).hexdigest(), size=len(big))
    assert up.parts == 2
    backup_s3.put_small(s3, "sse-test", "m.json", b"{}")
    for key in ("small.gz", "big.gz", "m.json"):
        assert s3.head_object(Bucket="sse-test", Key=key)["ServerSideEncryption"] == "AES256"
    # Turned off ('' for a service that cannot encrypt): no header, no check.
    backup_s3.put_small(s3, "sse-test", "plain.json", b"{}", sse="")
    assert "ServerSideEncryption" not in s3.head_object(Bucket="sse-test", Key="plain.json")
