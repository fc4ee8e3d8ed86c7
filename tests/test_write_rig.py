"""Host.write_file on a real SSH connection and locally: verified, private, never half-done.

A write into a full disk raises one line naming the file and the cause and
leaves the old file as it was; a secret is 0600 from its first byte, and a
connection killed in the middle of a write leaves no copy anyone else can read.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from invoke import Context

from fabfile.errors import OpsError
from fabfile.host import Host, harden_connection

pytestmark = pytest.mark.rig


@pytest.fixture
def conn(ssh_host):
    c = ssh_host.connection()
    harden_connection(c, [str(ssh_host.known_hosts)])
    yield c
    c.close()


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs with an ``old`` file, filled to the last byte."""
    d = tmp_path / "full"
    d.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", str(d)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the rig runs as root): {mount.stderr}")
    try:
        (d / "old.conf").write_bytes(b"old content\n")
        subprocess.run(["dd", "if=/dev/zero", f"of={d / 'filler'}", "bs=4k"],
                       capture_output=True)
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def _hosts(conn):
    # The sudo path is the same command under ``sudo -n bash -c`` (the rig has no sudo:
    # test_host_unit.py checks that command and that no staging copy exists).
    return {"ssh": Host(conn), "local": Host(Context())}


@pytest.mark.parametrize("how", ["ssh", "local"])
def test_a_write_into_a_full_disk_raises_one_line_and_keeps_the_old_file(conn, full_disk, how):
    host = _hosts(conn)[how]
    target = full_disk / "old.conf"
    with pytest.raises(OpsError) as err:
        host.write_file(str(target), b"new content\n" * 20000, mode=0o644, sudo=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {target}")
    assert message.endswith(": No space left on device"), message
    assert target.read_bytes() == b"old content\n"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.conf"]
    # With room again the same call works and the bytes are exactly the ones sent.
    (full_disk / "filler").unlink()
    host.write_file(str(target), b"new content\n" * 20000, mode=0o640, sudo=True)
    assert target.read_bytes() == b"new content\n" * 20000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_connection_killed_mid_write_leaves_no_readable_copy_of_a_secret(conn, tmp_path):
    host = Host(conn)
    d = tmp_path / "stack"
    d.mkdir()
    os.chmod(d, 0o755)
    target = d / ".env"
    secret = b"POSTGRES_PASSWORD=" + b"s3cr3t" * (64 * 1024 * 1024 // 6) + b"\n"
    home = Path(os.path.expanduser("~"))
    home_before = set(os.listdir(home))
    seen_modes: list[int] = []
    failure: list[BaseException] = []

    def write() -> None:
        try:
            host.write_file(str(target), secret, mode=0o600, sudo=True)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            failure.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 30
    while True:
        found = [p for p in d.iterdir() if p.name != ".env"]
        if found and found[0].stat().st_size > 0:
            seen_modes = [stat.S_IMODE(p.stat().st_mode) for p in found]
            break
        assert time.monotonic() < deadline and writer.is_alive(), "no write started"
        time.sleep(0.005)
    conn.client.get_transport().close()  # the link drops in the middle of the write
    writer.join(timeout=60)
    assert not writer.is_alive()
    assert failure, "a write cut in the middle must not report success"
    assert seen_modes == [0o600]  # private from the first byte
    deadline = time.monotonic() + 15
    while [p for p in d.iterdir()] and time.monotonic() < deadline:
        time.sleep(0.1)  # the server side notices the short stdin and removes its file
    assert list(d.iterdir()) == []  # neither a partial .env nor a temporary copy
    # No staging copy anywhere else either (the old sudo path left one in $HOME).
    assert not [n for n in set(os.listdir(home)) - home_before if "maicivy" in n]
