"""Host.write_file's remote command, run for real by bash (fast tier, no SSH)."""

from __future__ import annotations

import io
import stat
import subprocess

import pytest

from fabfile.errors import OpsError
from fabfile.host import Host, _cause


class LocalChannel:
    """What Host.open_channel returns, backed by a local bash (``sudo -n `` stripped)."""

    def __init__(self, command: str):
        self.command = command
        argv = command.removeprefix("sudo -n ")
        self.proc = subprocess.Popen(["bash", "-c", argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = self.err = b""

    def sendall(self, data) -> None:
        self.proc.stdin.write(data)

    def shutdown_write(self) -> None:
        self.out, self.err = self.proc.communicate()

    def makefile(self, mode):
        return io.BytesIO(self.out)

    def makefile_stderr(self, mode):
        return io.BytesIO(self.err)

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        pass


class FakeRemote(Host):
    commands: list[str]

    @property
    def is_remote(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return "vps"

    def open_channel(self, command, *, sudo=False, timeout=None):
        if sudo and self.use_sudo:
            from fabfile.host import sudo_wrap

            command = sudo_wrap(command)
        self.commands.append(command)
        return LocalChannel(command)


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

    class Short(LocalChannel):
        def sendall(self, data) -> None:
            super().sendall(bytes(data)[:3])  # the link drops after 3 bytes

    host.open_channel = lambda command, **kw: Short(command)
    with pytest.raises(OpsError, match=r"cannot write .*/f on vps: wrote 3 of 8 bytes"):
        host.write_file(str(tmp_path / "f"), b"12345678")
    assert (tmp_path / "f").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    host.open_channel = lambda command, **kw: LocalChannel(command)
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
