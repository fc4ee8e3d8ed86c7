"""Host helpers over a real SSH connection (OpenSSH sshd on 127.0.0.1)."""

from __future__ import annotations

import stat
import subprocess

import pytest

from fabfile.errors import HostKeyError
from fabfile.host import (
    Host,
    append,
    contains,
    directory,
    exists,
    harden_connection,
    sudo_wrap,
    upload_if_changed,
)

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
    assert not exists(h, str(target))           # checks really run
    assert exists(h, str(tmp_path))
    out = capsys.readouterr().out
    assert f"[dry-run] would write {target}" in out and "[dry-run] would run: touch" in out


def test_patchwork_style_helpers(host, tmp_path):
    d = tmp_path / "a b" / "c"
    directory(host, str(d), mode="750")
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    f = d / "crontab"
    f.write_text("keep me\n")
    assert append(host, str(f), ["line 'one' $HOME", "keep me"]) is True
    assert append(host, str(f), "line 'one' $HOME") is False
    assert f.read_text() == "keep me\nline 'one' $HOME\n"
    assert contains(host, str(f), "line 'one'")
    assert not contains(host, str(f), "line 'one'", exact=True)


def test_sudo_wraps_the_whole_command_line():
    cmd = "cd /tmp && echo \"$0\" 'it''s' > /dev/null; whoami"
    wrapped = sudo_wrap(cmd)
    assert wrapped.startswith("sudo -n bash -c ")
    # Unwrapping the quoting gives back the command exactly.
    out = subprocess.run(["bash", "-c", wrapped.replace("sudo -n ", "", 1) + " && echo ok"],
                         capture_output=True, text=True)
    assert out.stdout.split()[-1] == "ok"
