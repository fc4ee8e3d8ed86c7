"""One backup (or restore) at a time per kind: an flock held on the server.

The lock is held by a small ``flock`` process *on the server* for as long as
the task runs, whether the task runs there (``inv``, a subprocess) or on a
laptop (``fab``, an SSH channel). When the task ends or dies, its stdin
closes, the holder exits and the kernel drops the lock: a crashed run never
leaves a stale lock behind. A second run waits ``lock_wait_seconds`` and then
fails with one line saying who holds it.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import subprocess
from contextlib import contextmanager
from datetime import UTC, datetime

from .errors import OpsError
from .host import Host, sudo_wrap


class LockBusy(OpsError):
    exit_code = 75


def holder_script(path: str, wait: int, info: str) -> str:
    """Bash: take the lock (waiting ``wait`` s), say LOCKED, hold it until stdin closes."""
    p = shlex.quote(path)
    return (
        f"mkdir -p -- \"$(dirname -- {p})\" || exit 2\n"
        f"exec 9>>{p} || exit 2\n"
        f"if ! flock -w {int(wait)} 9; then\n"
        f"  printf 'BUSY %s\\n' \"$(cat -- {p}.holder 2>/dev/null)\"; exit 75\n"
        "fi\n"
        f"printf '%s\\n' {shlex.quote(info)} > {p}.holder\n"
        "echo LOCKED\n"
        "cat >/dev/null\n"
    )


def describe_holder(task: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{task} (pid {os.getpid()} of {user}@{socket.gethostname()}, since {when})"


def _first_line(read) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = read(1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


@contextmanager
def server_lock(host: Host, path: str, *, wait: int, task: str, sudo: bool = True):
    """Hold the server lock ``path`` for the duration of the ``with`` block."""
    if host.dry_run:
        host.say(f"[dry-run] would lock {path}")
        yield
        return
    script = holder_script(path, wait, describe_holder(task))
    command = "bash -c " + shlex.quote(script)
    if sudo and host.use_sudo:
        command = sudo_wrap(command)
    if host.is_remote:
        chan = host.open_channel(command)
        line = _first_line(chan.recv)
        release = chan.close
        status = (lambda: chan.recv_exit_status()) if not line.startswith("LOCKED") else None
    else:
        proc = subprocess.Popen(  # noqa: S602 - a fixed script, quoted above
            command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = _first_line(proc.stdout.read)

        def release() -> None:
            try:
                proc.stdin.close()
            finally:
                proc.wait(timeout=30)

        status = proc.wait if not line.startswith("LOCKED") else None
    if status is not None:
        release()
        if line.startswith("BUSY"):
            who = line[4:].strip() or "another run"
            raise LockBusy(f"{path} is held by {who}; waited {wait}s. Try again when it "
                           "has finished")
        raise OpsError(f"cannot take the lock {path} on {host.name} (is flock installed "
                       "and the directory writable?)")
    try:
        yield
    finally:
        release()
