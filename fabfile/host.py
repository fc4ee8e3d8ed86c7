"""Run commands and move files on the target, the same way locally and over SSH.

``Host`` wraps the context a task receives: an invoke ``Context`` (``inv`` on
the server itself) or a fabric ``Connection`` (``fab -H vps`` from a laptop).
It adds what invoke/fabric lack for operations work:

* a real dry run: commands that change things are printed, not run, while
  read-only checks still run (invoke's ``--dry`` answers "ok" to every check
  and still performs ``put`` for real);
* privileged commands through ``sudo -n bash -c '<quoted>'`` so that the
  whole command line, not only its first word, runs privileged;
* atomic, verified file writes (0600 temporary name, fsync, size and sha256
  read back, rename) that work on both sides and fail loudly;
* one byte stream to a command (:meth:`Host.stream`), a local subprocess or an
  SSH channel, for what must not be kept in memory or lives as long as a task;
* strict SSH host key checking (see :func:`harden_connection`).

``upload_if_changed`` at the bottom writes only the files whose content differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric import Connection

from .errors import HostKeyError, OpsError
from .shell import last_lines, q, script, words

# --- SSH host keys ------------------------------------------------------------

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")


def harden_connection(conn, extra_known_hosts: Iterable[str] = ()) -> None:
    """Make a fabric Connection refuse unknown or changed host keys.

    fabric always installs paramiko's auto-add host key policy and loads no known_hosts
    file; we load the user's and the system's (plus any configured ones) and
    set RejectPolicy. The same goes for every ProxyJump gateway in front of it
    (fabric makes a Connection of its own for each hop). A ProxyCommand gateway
    is a command of the user's (e.g. ``ssh -W``) that checks its own keys; the
    target's key is checked here either way. Safe to call more than once; a
    no-op for local contexts.
    """
    if not isinstance(conn, Connection):
        return
    import paramiko

    if vars(conn).get("_maicivy_hardened"):
        return
    if isinstance(conn.gateway, Connection):
        harden_connection(conn.gateway, extra_known_hosts)
    client = conn.client
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for path in (*DEFAULT_KNOWN_HOSTS, *extra_known_hosts):
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            try:
                client.load_system_host_keys(path)
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyError(f"cannot read known_hosts file {path}: {exc}") from exc
    object.__setattr__(conn, "_maicivy_hardened", True)


def explain_ssh_error(exc: BaseException, target: str) -> OpsError | None:
    """Turn paramiko's host key failures into one actionable line."""
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException):
        if exc.hostname and exc.hostname.split(":")[0].strip("[]") not in target:
            target = f"{exc.hostname} (on the way to {target})"
        return HostKeyError(
            f"host key of {target} has CHANGED (got {exc.key.get_name()} "
            f"{exc.key.fingerprint}); refusing to connect. If the server was really "
            "reinstalled, remove its old line from known_hosts and verify the new key"
        )
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        server = re.search(r"Server '([^']+)'", str(exc))
        if server and server.group(1).split(":")[0].strip("[]") not in target:
            target = f"{server.group(1)} (on the way to {target})"
        return HostKeyError(
            f"host key of {target} is unknown; refusing to connect. Verify its "
            "fingerprint and add it to ~/.ssh/known_hosts (e.g. connect once with ssh)"
        )
    return None


# --- running commands ---------------------------------------------------------


@dataclass
class Result:
    """What a command returned (a small, stable subset of invoke's Result)."""

    command: str
    exited: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def failed(self) -> bool:
        return not self.ok


def sudo_wrap(command: str) -> str:
    """Run the *whole* command line privileged, quoting it once for bash."""
    return f"sudo -n bash -c {q(command)}"


@dataclass
class Host:
    """The target of a task: ``c`` plus dry-run, sudo and file helpers."""

    c: object
    dry_run: bool = False
    use_sudo: bool = False
    out: object = field(default=None, repr=False)
    # The stack lock this task holds (fabfile.lock.StackLock): every changing command
    # runs only while it is still ours; a lost connection is never silently reopened.
    guard: object = field(default=None, repr=False)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.c, Connection)

    @property
    def name(self) -> str:
        if self.is_remote:
            port = self.c.port
            return f"{self.c.user}@{self.c.host}" + (f":{port}" if port != 22 else "")
        return "localhost"

    def say(self, message: str) -> None:
        print(message, file=self.out or sys.stdout, flush=True)

    def stream(self, command: str, *, sudo: bool = False) -> Stream:
        """Start ``command`` on the target with its stdin, stdout and stderr as byte
        streams: a raw SSH channel (``fab``) or a local subprocess (``inv``).

        For byte streams and long-lived holders that must not go through ``run()``
        (which keeps and decodes all output in memory). The command runs detached
        from our terminal on both sides (Ctrl-C reaches only us); what must stop
        with us watches its stdin (see :mod:`fabfile.stream`, :mod:`fabfile.lock`).
        """
        if sudo and self.use_sudo:
            command = sudo_wrap(command)
        if not self.is_remote:
            return ProcessStream(command)
        try:
            if not self.c.is_connected:
                self.c.open()
            chan = self.c.client.get_transport().open_session()
            chan.exec_command(command)
        except Exception as exc:
            ssh = explain_ssh_error(exc, self.name)
            if ssh is not None:
                raise ssh from exc
            raise
        return ChannelStream(chan)

    def _invoke(
        self,
        command: str,
        *,
        sudo: bool,
        warn: bool,
        hide: bool | str,
        timeout: float | None,
        pty: bool = False,
        unguarded: bool = False,
    ) -> Result:
        guard = None if unguarded else self.guard
        if guard is not None:
            guard.check_alive()
        if sudo and self.use_sudo:
            command = sudo_wrap(command)
        try:
            r = self.c.run(
                command, warn=True, hide=hide, timeout=timeout, pty=pty, in_stream=False
            )
        except Exception as exc:  # invoke's CommandTimedOut, SSH errors...
            if guard is not None:
                guard.check_alive()
            ssh = explain_ssh_error(exc, self.name)
            if ssh is not None:
                raise ssh from exc
            from invoke.exceptions import CommandTimedOut

            if isinstance(exc, CommandTimedOut):
                if warn:
                    return Result(command, 124, "", f"timed out after {timeout}s")
                raise OpsError(f"on {self.name}: command timed out after {timeout}s") from exc
            raise
        if guard is not None and r.exited != 0:
            guard.check_alive()  # a dropped connection is not a failed command
        result = Result(command, r.exited, r.stdout, r.stderr)
        if result.failed and not warn:
            raise CommandFailed(self.name, result)
        return result

    def run(
        self,
        command: str,
        *,
        sudo: bool = False,
        warn: bool = False,
        hide: bool | str = True,
        timeout: float | None = None,
        pty: bool = False,
    ) -> Result:
        """Run a command that *changes* the target (printed only in dry-run).

        While a stack lock is held (``guard``), the command runs privileged and only
        if the lock is still ours (:meth:`fabfile.lock.StackLock.wrap`).
        """
        if self.dry_run:
            self.say(f"[dry-run] would run: {command}")
            return Result(command, 0)
        if self.guard is None:
            return self._invoke(command, sudo=sudo, warn=warn, hide=hide, timeout=timeout,
                                pty=pty)
        r = self._invoke(self.guard.wrap(command), sudo=True, warn=True, hide=hide,
                         timeout=timeout, pty=pty)
        self.guard.after(r.exited, r.stdout)
        result = Result(command, r.exited, r.stdout, r.stderr)
        if result.failed and not warn:
            raise CommandFailed(self.name, result)
        return result

    def check(
        self,
        command: str,
        *,
        sudo: bool = False,
        warn: bool = True,
        hide: bool | str = True,
        timeout: float | None = None,
    ) -> Result:
        """Run a read-only command; it runs in dry-run too. ``warn`` defaults to True."""
        return self._invoke(command, sudo=sudo, warn=warn, hide=hide, timeout=timeout)

    # -- files -----------------------------------------------------------------

    def _where(self) -> str:
        return f" on {self.name}" if self.is_remote else ""

    def write_file(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int = 0o644,
        sudo: bool = False,
    ) -> None:
        """Write ``data`` to ``path`` atomically, verified; raise OpsError if it failed.

        One command (host-write.sh, privileged as a whole with ``sudo``) gets the
        bytes on its stdin, here or over SSH: they go to a temporary file in the
        same directory that is 0600 before the first byte (mktemp), fsynced,
        checked (size and sha256 read back from the disk), chmodded to ``mode``
        and renamed into place. Never a staging copy elsewhere, never paramiko's
        pipelined SFTP writes (whose errors are dropped). A failure (e.g. a full
        disk) leaves the old file untouched, no temporary file, and raises one
        line naming ``path`` and the cause.
        """
        if isinstance(data, str):
            data = data.encode()
        if self.dry_run:
            self.say(f"[dry-run] would write {path} ({len(data)} bytes, mode {mode:o})")
            return
        if self.guard is not None:
            self.guard.check_alive()
        digest = sha256(data)
        status, stdout, stderr = self.pipe(
            WRITE.command(path, f"{mode:o}", len(data), digest), data, sudo=sudo)
        if status != 0 or stdout.split() != [b"ok", str(len(data)).encode(), digest.encode()]:
            raise OpsError(f"cannot write {path}{self._where()}: "
                           f"{_cause(stderr, stdout.decode(errors='replace'))}")

    def read_file(self, path: str, *, sudo: bool = False) -> bytes:
        """Read a small file (config, manifest). Large files: stream, never this."""
        if self.is_remote and not (sudo and self.use_sudo):
            with self.c.sftp().open(path, "rb") as fh:
                return fh.read()
        status, data, stderr = self.pipe(f"cat -- {q(path)}", sudo=sudo)
        if status != 0:
            raise OpsError(f"cannot read {path}{self._where()}: {last_lines(stderr)}")
        return data

    def pipe(self, command: str, data: bytes = b"", *,
             sudo: bool = False) -> tuple[int, bytes, str]:
        """Run ``command`` with ``data`` on its stdin, to its end, through :meth:`stream`:
        (exit status, stdout, stderr). Bytes in, bytes out, nothing decoded."""
        running = self.stream(command, sudo=sudo)
        try:
            running.send(data)
            stdout = running.read_all()
            return running.wait(), stdout, running.stderr_text()
        finally:
            running.close()

    def hashes(self, paths: Iterable[str], *, sudo: bool = False) -> dict[str, str]:
        """sha256 of each existing path, in ONE round trip (missing ones are absent)."""
        paths = list(paths)
        if not paths:
            return {}
        r = self.check(f"for f in {words(*paths)}; do [ -f \"$f\" ] && sha256sum -- \"$f\"; "
                       "done; true", sudo=sudo)
        found: dict[str, str] = {}
        for line in r.stdout.splitlines():
            digest, _, name = line.partition("  ")
            if name:
                found[name] = digest
        return found


WRITE = script(__file__, "scripts/host-write.sh")


# --- streams: one command's stdin, stdout and stderr, here or over SSH ----------------

CHUNK = 1 << 20
STDERR_KEPT = 1 << 16  # the tail of stderr kept for an error message


class Stream:
    """A running command: :meth:`send` to its stdin, :meth:`read` its stdout, its
    stderr kept for the error message (or taken as it comes with :meth:`poll`)."""

    def send(self, data: bytes) -> None:
        """Write all of ``data`` to its stdin, then close it. A command that ended
        early is not an error here: its exit status and stderr say why."""
        view = memoryview(data)
        try:
            for i in range(0, len(view), CHUNK):
                self.write(view[i:i + CHUNK])
        except OSError:
            pass
        self.close_stdin()

    def read_all(self) -> bytes:
        """Its stdout to the end."""
        parts = []
        while chunk := self.read(CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def finish(self, what: str) -> int:
        """Close stdin, wait for the end; raise OpsError("<what>: <last lines of
        stderr>") unless it exited 0."""
        self.close_stdin()
        status = self.wait()
        if status != 0:
            raise OpsError(f"{what}: {last_lines(self.stderr_text())}")
        return status

    # Each transport provides:
    def write(self, data) -> None: ...
    def close_stdin(self) -> None: ...
    def read(self, size: int) -> bytes: ...
    def poll(self, timeout: float) -> tuple[bytes, bytes]: ...
    def done(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def stderr_text(self) -> str: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


class ChannelStream(Stream):
    """The command on a paramiko channel (paramiko buffers its stderr)."""

    def __init__(self, chan):
        self.chan = chan
        self.transport = chan.get_transport()

    def write(self, data) -> None:
        self.chan.sendall(data)

    def close_stdin(self) -> None:
        try:
            self.chan.shutdown_write()
        except OSError:  # the connection is gone: so is the command
            pass

    def read(self, size: int) -> bytes:
        return self.chan.recv(size)

    def poll(self, timeout: float) -> tuple[bytes, bytes]:
        select.select([self.chan], [], [], timeout)
        out = self.chan.recv(65536) if self.chan.recv_ready() else b""
        err = self.chan.recv_stderr(65536) if self.chan.recv_stderr_ready() else b""
        return out, err

    def done(self) -> bool:
        return (self.chan.exit_status_ready() and not self.chan.recv_ready()
                and not self.chan.recv_stderr_ready())

    def wait(self, timeout: float | None = None) -> int | None:
        if not self.chan.status_event.wait(timeout):
            return None
        return self.chan.recv_exit_status()

    def stderr_text(self) -> str:
        return self.chan.makefile_stderr("rb").read()[-STDERR_KEPT:].decode(errors="replace")

    def alive(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def close(self) -> None:
        self.chan.close()


class ProcessStream(Stream):
    """The command in a local ``bash -c``, in a session of its own (as over SSH, our
    terminal's Ctrl-C does not reach it). Its stdout and stderr are read while we
    write (kept until asked for, as paramiko does), so no pipe fills while we wait
    on another."""

    def __init__(self, command: str):
        self.proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)
        self.out_fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.open = {self.out_fd, self.err_fd}
        self.out = bytearray()  # stdout read but not yet asked for
        self.err = bytearray()  # the tail of stderr
        self.err_total = self.err_given = 0  # bytes of stderr read, and given by poll()

    def _take(self, fds) -> None:
        for fd in fds:
            data = os.read(fd, 65536)
            if not data:
                self.open.discard(fd)
            elif fd == self.out_fd:
                self.out += data
            else:
                self.err += data
                self.err_total += len(data)
                del self.err[:-STDERR_KEPT]

    def _pending(self, size: int) -> bytes:
        data = bytes(self.out[:size])
        del self.out[:size]
        return data

    def write(self, data) -> None:
        view = memoryview(data)
        stdin = self.proc.stdin.fileno()
        while view:
            readable, writable, _ = select.select(list(self.open), [stdin], [])
            self._take(readable)
            if writable:
                try:
                    view = view[os.write(stdin, view[:65536]):]
                except BlockingIOError:
                    pass

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def read(self, size: int) -> bytes:
        while not self.out and self.out_fd in self.open:
            self._take(select.select(list(self.open), [], [])[0])
        return self._pending(size)

    def poll(self, timeout: float) -> tuple[bytes, bytes]:
        if self.open and not self.out:
            self._take(select.select(list(self.open), [], [], timeout)[0])
        new, self.err_given = self.err_total - self.err_given, self.err_total
        err = bytes(self.err[max(0, len(self.err) - new):]) if new else b""
        return self._pending(len(self.out)), err

    def done(self) -> bool:
        return not self.open and not self.out and self.proc.poll() is not None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        while self.err_fd in self.open:
            self._take([self.err_fd])
        return self.err.decode(errors="replace")

    def alive(self) -> bool:
        return True  # it lives and dies with us

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        if self.proc.poll() is None:  # we stop: so does the command
            self.proc.kill()
            self.proc.wait()


def _cause(stderr: str, stdout: str = "") -> str:
    """The reason in a failure's last line: ``cat: write error: No space left on device``
    gives ``No space left on device``."""
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    if not lines:
        return "the connection was lost"
    last = lines[-1]
    if last.startswith("FAILED: "):
        last = last[len("FAILED: "):]
    if ": " in last and last.rsplit(": ", 1)[1][:1].isupper():
        return last.rsplit(": ", 1)[1]
    return last


class CommandFailed(OpsError):
    """A remote/local command exited non-zero."""

    def __init__(self, target: str, result: Result):
        self.result = result
        super().__init__(f"on {target}: command failed (exit {result.exited}): "
                         f"{last_lines(result.stderr, result.stdout)}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_if_changed(
    host: Host,
    files: Mapping[str, bytes],
    *,
    modes: Mapping[str, int] | None = None,
    sudo: bool = False,
    known: Mapping[str, str] | None = None,
) -> list[str]:
    """Write each ``{remote_path: content}`` whose content differs on the target.

    Remote hashes are fetched in one round trip (or taken from ``known``).
    Returns the paths that changed (would change, in dry-run).
    """
    modes = modes or {}
    remote = dict(known) if known is not None else host.hashes(files, sudo=sudo)
    changed = [p for p, data in files.items() if remote.get(p) != sha256(data)]
    if changed:
        dirs = sorted({os.path.dirname(p) for p in changed})
        host.run(f"mkdir -p {words(*dirs)}", sudo=sudo)
    for path in changed:
        host.write_file(path, files[path], mode=modes.get(path, 0o644), sudo=sudo)
    return changed
