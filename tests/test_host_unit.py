"""Host.write_file's command and Host.stream, run for real by a local bash (fast tier,
no SSH; test_ssh.py runs the same over SSH)."""

from __future__ import annotations

import os
import stat

import pytest
from invoke import Context

from fabfile.errors import OpsError
from fabfile.host import Host, ProcessStream, _cause, sudo_wrap


class FakeRemote(Host):
    """A "remote" host whose commands run in a local bash (``sudo -n `` stripped)."""

    commands: list[str]

    @property
    def is_remote(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return "vps"

    def stream(self, command, *, sudo=False):
        if sudo and self.use_sudo:
            command = sudo_wrap(command)
        self.commands.append(command)
        return ProcessStream(command.removeprefix("sudo -n "))


@pytest.mark.parametrize("use_sudo", [False, True])
def test_the_remote_write_is_one_command_private_verified_and_without_staging(tmp_path,
                                                                               use_sudo):
    host = FakeRemote(None, use_sudo=use_sudo)
    host.commands = []
    target = tmp_path / ".env"
    host.write_file(str(target), b"SECRET=1\n", mode=0o600, sudo=True)
    assert target.read_bytes() == b"SECRET=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]
    assert len(host.commands) == 1  # one round trip: data on stdin, nothing staged
    assert host.commands[0].startswith("sudo -n bash -c ") == use_sudo
    assert "maicivy-upload" not in host.commands[0] and "SECRET" not in host.commands[0]


def test_a_short_or_failed_remote_write_raises_and_leaves_nothing(tmp_path):
    host = FakeRemote(None)
    host.commands = []
    (tmp_path / "f").write_text("old\n")

    class Short(ProcessStream):
        def send(self, data) -> None:
            super().send(bytes(data)[:3])  # the link drops after 3 bytes

    host.stream = lambda command, **kw: Short(command)
    with pytest.raises(OpsError, match=r"cannot write .*/f on vps: wrote 3 of 8 bytes"):
        host.write_file(str(tmp_path / "f"), b"12345678")
    assert (tmp_path / "f").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    del host.stream
    with pytest.raises(OpsError, match=r"cannot write /nonexistent/dir/f on vps: "
                                       r"No such file or directory$"):
        host.write_file("/nonexistent/dir/f", b"x")


def test_cause_is_the_reason_of_the_last_line():
    assert _cause("cat: write error: No space left on device\n") == "No space left on device"
    assert _cause("FAILED: wrote 3 of 8 bytes (connection lost?)") == \
        "wrote 3 of 8 bytes (connection lost?)"
    assert _cause("", "") == "the connection was lost"


def test_one_idea_of_a_local_address_for_every_caller():
    from fabfile.addresses import host_port, is_loopback, split_host_port

    for local in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(local), local
    for remote in ("10.0.0.1", "::", "0.0.0.0", "example.com", "", "[2001:db8::1]"):
        assert not is_loopback(remote), remote
    assert split_host_port("[::1]:5000") == ("::1", "5000")
    assert split_host_port("127.0.0.1:5000") == ("127.0.0.1", "5000")
    assert split_host_port("registry.example.com") == ("registry.example.com", "")
    assert host_port("::1", 5000) == "[::1]:5000" and host_port("[::1]", 1) == "[::1]:1"
    assert host_port("127.0.0.1", 80) == "127.0.0.1:80"


# --- Host.stream and write_file/read_file on the local side (inv on the server) ----------


def stream_keeps_its_contract(host: Host) -> None:
    """What every transport's stream does (here: this test; over SSH: test_ssh)."""
    running = host.stream("cat; echo 'first line' >&2; echo 'the cause' >&2; exit 3")
    try:
        running.send(b"\x00bytes\xff" * 100000)  # more than a pipe holds, stderr read too
        assert running.read_all() == b"\x00bytes\xff" * 100000
        assert running.wait() == 3
        with pytest.raises(OpsError, match=r"^reading it: first line \| the cause$"):
            running.finish("reading it")
    finally:
        running.close()


def test_a_local_stream_takes_stdin_gives_stdout_and_fails_with_its_stderr():
    stream_keeps_its_contract(Host(Context()))
    ok = Host(Context()).stream("cat >/dev/null")
    assert ok.finish("never") == 0


def test_closing_a_local_stream_stops_its_command_and_ctrl_c_does_not_reach_it():
    running = Host(Context()).stream("echo started; exec sleep 60")
    assert running.read(100) == b"started\n"
    pid = running.proc.pid
    assert os.getsid(pid) == pid  # its own session: our terminal's Ctrl-C is ours alone
    running.close()
    assert running.proc.poll() is not None


@pytest.fixture
def fake_sudo(tmp_path, monkeypatch):
    """A ``sudo`` first on PATH that logs its arguments and runs the command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sudo.log"
    sudo = bin_dir / "sudo"
    sudo.write_text(f'#!/bin/sh\necho "$1 $2 $3" >> {log}\nshift\nexec "$@"\n')
    sudo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_local_write_and_read_go_through_sudo_when_asked(tmp_path, fake_sudo):
    host = Host(Context(), use_sudo=True)
    target = tmp_path / "backups" / "m.json"
    target.parent.mkdir()
    host.write_file(str(target), b'{"a": 1}\n', mode=0o600, sudo=True)
    assert fake_sudo.read_text() == "-n bash -c\n"  # the whole command, privileged
    assert target.read_bytes() == b'{"a": 1}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]
    assert host.read_file(str(target), sudo=True) == b'{"a": 1}\n'
    assert fake_sudo.read_text() == "-n bash -c\n" * 2
    host.write_file(str(target), b"plain\n")  # sudo not asked: none
    assert host.read_file(str(target)) == b"plain\n"
    assert fake_sudo.read_text() == "-n bash -c\n" * 2


def test_a_failed_local_write_or_read_raises_one_line(tmp_path):
    host = Host(Context())
    (tmp_path / "f").write_text("old\n")
    with pytest.raises(OpsError, match=r"^cannot write /nonexistent/dir/f: "
                                       r"No such file or directory$"):
        host.write_file("/nonexistent/dir/f", b"x")
    with pytest.raises(OpsError, match=r"^cannot read /nonexistent/f: cat: /nonexistent/f: "
                                       r"No such file or directory$"):
        host.read_file("/nonexistent/f")
    assert (tmp_path / "f").read_text() == "old\n"
