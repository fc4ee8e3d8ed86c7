"""Host helpers over a real SSH connection (OpenSSH sshd on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import time

import pytest

from fabfile.errors import HostKeyError
from fabfile.host import Host, harden_connection, sudo_wrap, upload_if_changed
from fabfile.stream import stream, watched

pytestmark = pytest.mark.rig


class CountingHost(Host):
    """Counts the commands that reach the server."""

    calls = 0

    def _invoke(self, command, **kw):
        type(self).calls += 1
        return super()._invoke(command, **kw)


@pytest.fixture
def host(ssh_host):
    conn = ssh_host.connection()
    harden_connection(conn, [str(ssh_host.known_hosts)])
    yield Host(conn)
    conn.close()


def test_runs_over_ssh_with_verified_host_key(host):
    r = host.check("echo $SSH_CONNECTION")
    assert r.ok and r.stdout.split()[2] == "127.0.0.1"
    assert host.is_remote


def test_unknown_host_key_is_refused(ssh_host, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    conn = ssh_host.connection(known_hosts=empty)
    harden_connection(conn, [str(empty)])
    with pytest.raises(HostKeyError, match="is unknown; refusing to connect"):
        Host(conn).check("true")


def test_changed_host_key_is_refused(ssh_host, tmp_path):
    wrong = ssh_host.forged_known_hosts(tmp_path)
    conn = ssh_host.connection(known_hosts=wrong)
    harden_connection(conn, [str(wrong)])
    with pytest.raises(HostKeyError, match="has CHANGED"):
        Host(conn).check("true")


def test_write_file_is_atomic_with_mode(host, tmp_path):
    target = tmp_path / "sub" / "secret.env"
    target.parent.mkdir()
    host.write_file(str(target), b"A=1\n", mode=0o600)
    assert target.read_bytes() == b"A=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret.env"]
    assert host.read_file(str(target)) == b"A=1\n"


def test_upload_if_changed_compares_in_one_round_trip(ssh_host, tmp_path):
    conn = ssh_host.connection()
    harden_connection(conn, [str(ssh_host.known_hosts)])
    h = CountingHost(conn)
    files = {str(tmp_path / f"d{i}" / "f.txt"): f"content {i}\n".encode() for i in range(20)}
    assert len(upload_if_changed(h, files)) == 20
    CountingHost.calls = 0
    assert upload_if_changed(h, files) == []
    assert CountingHost.calls == 1
    one = next(iter(files))
    (tmp_path / "d0" / "f.txt").write_text("drifted\n")
    assert upload_if_changed(h, files) == [one]
    assert (tmp_path / "d0" / "f.txt").read_text() == "content 0\n"


def test_dry_run_changes_nothing_but_still_checks(ssh_host, tmp_path, capsys):
    conn = ssh_host.connection()
    harden_connection(conn, [str(ssh_host.known_hosts)])
    h = Host(conn, dry_run=True)
    target = tmp_path / "f"
    assert upload_if_changed(h, {str(target): b"x"}) == [str(target)]
    h.run(f"touch {tmp_path / 'g'}")
    assert not target.exists() and not (tmp_path / "g").exists()
    assert not h.check(f"test -e {target}").ok  # checks really run
    assert h.check(f"test -e {tmp_path}").ok
    out = capsys.readouterr().out
    assert f"[dry-run] would write {target}" in out and "[dry-run] would run: touch" in out


def test_a_stream_over_ssh_takes_stdin_gives_stdout_and_fails_with_its_stderr(host):
    from test_host_unit import stream_keeps_its_contract

    stream_keeps_its_contract(host)


def test_a_streamed_command_stops_on_the_server_when_we_stop(host, tmp_path):
    out, err = io.BytesIO(), io.BytesIO()
    assert stream(host, "echo out; echo err >&2; exit 3", out=out, err=err) == 3
    assert (out.getvalue(), err.getvalue()) == (b"out\n", b"err\n")
    marker = f"sleep 62.{os.getpid()}"
    running = host.stream(watched(f"echo go; exec {marker}"))
    assert running.read(100) == b"go\n"
    running.close_stdin()  # what stream() does on Ctrl-C
    assert running.wait(10) is not None
    running.close()
    deadline = time.monotonic() + 15  # the server ends it when it sees stdin close
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout:
        assert time.monotonic() < deadline, f"{marker} still runs on the server"
        time.sleep(0.2)


def test_sudo_wraps_the_whole_command_line():
    cmd = "cd /tmp && echo \"$0\" 'it''s' > /dev/null; whoami"
    wrapped = sudo_wrap(cmd)
    assert wrapped.startswith("sudo -n bash -c ")
    # Unwrapping the quoting gives back the command exactly.
    out = subprocess.run(["bash", "-c", wrapped.replace("sudo -n ", "", 1) + " && echo ok"],
                         capture_output=True, text=True)
    assert out.stdout.split()[-1] == "ok"
