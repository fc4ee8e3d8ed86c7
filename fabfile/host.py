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
* strict SSH host key checking (see :func:`harden_connection`).

The helpers at the bottom follow patchwork's API (``exists``, ``contains``,
``append``, ``directory``) plus ``upload_if_changed``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HostKeyError, OpsError
from .shell import last_lines

try:  # fabric is a hard dependency, but keep the import failure readable.
    from fabric import Connection
except ImportError:  # pragma: no cover
    Connection = None  # type: ignore[assignment,misc]


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
    if Connection is None or not isinstance(conn, Connection):
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
    dry: bool = False

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def failed(self) -> bool:
        return not self.ok


def sudo_wrap(command: str) -> str:
    """Run the *whole* command line privileged, quoting it once for bash."""
    return f"sudo -n bash -c {shlex.quote(command)}"


@dataclass
class Host:
    """The target of a task: ``c`` plus dry-run, sudo and file helpers."""

    c: object
    dry_run: bool = False
    use_sudo: bool = False
    out: object = field(default=None, repr=False)
    actions: list[str] = field(default_factory=list)
    # The stack lock this task holds (fabfile.lock.StackLock): every changing command
    # runs only while it is still ours; a lost connection is never silently reopened.
    guard: object = field(default=None, repr=False)

    @property
    def is_remote(self) -> bool:
        return Connection is not None and isinstance(self.c, Connection)

    @property
    def name(self) -> str:
        if self.is_remote:
            port = self.c.port
            return f"{self.c.user}@{self.c.host}" + (f":{port}" if port != 22 else "")
        return "localhost"

    def say(self, message: str) -> None:
        print(message, file=self.out or sys.stdout, flush=True)

    def open_channel(self, command: str, *, sudo: bool = False, timeout: float | None = None):
        """Start ``command`` on a raw SSH channel (remote hosts only), returning the channel.

        For byte streams and long-lived holders that must not go through
        ``run()`` (which keeps and decodes all output in memory).
        """
        if sudo and self.use_sudo:
            command = sudo_wrap(command)
        if not self.c.is_connected:
            self.c.open()
        chan = self.c.client.get_transport().open_session()
        if timeout is not None:
            chan.settimeout(timeout)
        chan.exec_command(command)
        return chan

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
            self.actions.append(command)
            self.say(f"[dry-run] would run: {command}")
            return Result(command, 0, dry=True)
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

    def write_file(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int = 0o644,
        sudo: bool = False,
    ) -> None:
        """Write ``data`` to ``path`` atomically, verified; raise OpsError if it failed.

        The bytes go to a temporary file in the same directory that is created
        0600 before the first byte (mktemp), fsynced, checked (size and sha256
        read back from the disk), chmodded to ``mode`` and renamed into place.
        Remotely this is one round trip: the data on the stdin of one command
        (privileged as a whole with ``sudo``), never a staging copy elsewhere,
        never paramiko's pipelined SFTP writes (whose errors are dropped). A
        failure (e.g. a full disk) leaves the old file untouched, no temporary
        file, and raises one line naming ``path`` and the cause.
        """
        if isinstance(data, str):
            data = data.encode()
        if self.guard is not None and not self.dry_run:
            self.guard.check_alive()
        if self.dry_run:
            self.actions.append(f"write {path}")
            self.say(f"[dry-run] would write {path} ({len(data)} bytes, mode {mode:o})")
            return
        if self.is_remote:
            self._write_remote(path, data, mode=mode, sudo=sudo)
        else:
            self._write_local(path, data, mode=mode)

    def _write_local(self, path: str, data: bytes, *, mode: int) -> None:
        directory = os.path.dirname(path) or "."
        base = os.path.basename(path)
        local_tmp = None
        try:
            # mkstemp: O_CREAT|O_EXCL, 0600 from the start.
            fd, local_tmp = tempfile.mkstemp(prefix=f".{base}.", dir=directory)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            with open(local_tmp, "rb") as fh:
                back = fh.read()
            if back != data:
                raise OSError(f"read back {len(back)} bytes, wrote {len(data)}")
            os.chmod(local_tmp, mode)
            os.replace(local_tmp, path)
            local_tmp = None
        except OSError as exc:
            raise OpsError(f"cannot write {path}: {exc.strerror or exc}") from None
        finally:
            if local_tmp is not None and os.path.exists(local_tmp):
                os.unlink(local_tmp)

    def _write_remote(self, path: str, data: bytes, *, mode: int, sudo: bool) -> None:
        size, digest = len(data), hashlib.sha256(data).hexdigest()
        command = "bash -c " + shlex.quote(WRITE_SH) + " write " + " ".join(
            shlex.quote(a) for a in (path, f"{mode:o}", str(size), digest))
        try:
            chan = self.open_channel(command, sudo=sudo)
        except Exception as exc:
            ssh = explain_ssh_error(exc, self.name)
            if ssh is not None:
                raise ssh from exc
            raise
        try:
            try:
                view = memoryview(data)
                for i in range(0, size, 1 << 20):
                    chan.sendall(view[i:i + (1 << 20)])
                chan.shutdown_write()
            except OSError:
                pass  # the command ended early (its stderr says why)
            out = _drain(chan)
            status = chan.recv_exit_status()
        finally:
            chan.close()
        stdout, stderr = out
        if status != 0 or stdout.split() != ["ok", str(size), digest]:
            raise OpsError(f"cannot write {path} on {self.name}: {_cause(stderr, stdout)}")

    def read_file(self, path: str, *, sudo: bool = False) -> bytes:
        """Read a small file (config, manifest). Large files: stream, never this."""
        if self.is_remote and not (sudo and self.use_sudo):
            with self.c.sftp().open(path, "rb") as fh:
                return fh.read()
        if not self.is_remote:
            return Path(path).read_bytes()
        r = self.check(f"cat {shlex.quote(path)}", sudo=True, warn=False)
        return r.stdout.encode()

    def hashes(self, paths: Iterable[str], *, sudo: bool = False) -> dict[str, str]:
        """sha256 of each existing path, in ONE round trip (missing ones are absent)."""
        paths = list(paths)
        if not paths:
            return {}
        quoted = " ".join(shlex.quote(p) for p in paths)
        r = self.check(f"for f in {quoted}; do [ -f \"$f\" ] && sha256sum -- \"$f\"; done; true",
                       sudo=sudo)
        found: dict[str, str] = {}
        for line in r.stdout.splitlines():
            digest, _, name = line.partition("  ")
            if name:
                found[name] = digest
        return found


# The remote half of Host.write_file: $1 path, $2 mode (octal), $3 size, $4 sha256.
# The temporary file is 0600 from creation (umask + mktemp), removed on any
# failure (also when the connection drops: stdin ends short, the check fails).
WRITE_SH = r"""set -u
umask 077
path=$1; mode=$2; size=$3; sha=$4
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
tmp=$(mktemp -p "$(dirname -- "$path")" ".${path##*/}.XXXXXXXX" 2>&1) || fail "$tmp"
trap 'rm -f -- "$tmp"' EXIT
err=$(cat 2>&1 > "$tmp") || fail "${err:-cat failed}"
err=$(sync -- "$tmp" 2>&1) || fail "${err:-fsync failed}"
got=$(stat -c %s -- "$tmp") || fail "cannot stat $tmp"
[ "$got" = "$size" ] || fail "wrote $got of $size bytes (connection lost?)"
got_sha=$(sha256sum < "$tmp") || fail "cannot read $tmp back"
[ "${got_sha%% *}" = "$sha" ] || fail "the bytes read back differ from those sent"
chmod "$mode" -- "$tmp" || fail "cannot chmod $tmp"
err=$(mv -f -- "$tmp" "$path" 2>&1) || fail "${err:-mv failed}"
trap - EXIT
echo "ok $got ${got_sha%% *}"
"""


def _drain(chan) -> tuple[str, str]:
    """All of a channel's stdout, then its stderr (both small; paramiko buffers stderr)."""
    out = chan.makefile("rb").read()
    err = chan.makefile_stderr("rb").read()
    return out.decode(errors="replace"), err.decode(errors="replace")


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


# --- patchwork-style helpers -------------------------------------------------


def exists(host: Host, path: str, sudo: bool = False) -> bool:
    """True if ``path`` exists on the target."""
    return host.check(f"test -e {shlex.quote(path)}", sudo=sudo).ok


def contains(host: Host, filename: str, text: str, exact: bool = False,
             sudo: bool = False) -> bool:
    """True if ``filename`` contains ``text`` (a whole line when ``exact``)."""
    flags = "-qF" + ("x" if exact else "")
    return host.check(
        f"grep {flags} -- {shlex.quote(text)} {shlex.quote(filename)}", sudo=sudo
    ).ok


def append(host: Host, filename: str, text: str | Iterable[str], partial: bool = False,
           sudo: bool = False) -> bool:
    """Append each line of ``text`` not already present. Returns True if it changed."""
    lines = [text] if isinstance(text, str) else list(text)
    changed = False
    for line in lines:
        if contains(host, filename, line, exact=not partial, sudo=sudo):
            continue
        host.run(f"printf '%s\\n' {shlex.quote(line)} >> {shlex.quote(filename)}", sudo=sudo)
        changed = True
    return changed


def directory(host: Host, path: str, user: str | None = None, group: str | None = None,
              mode: str | None = None, sudo: bool = False) -> None:
    """Ensure a directory exists with the given owner and mode."""
    q = shlex.quote(path)
    cmd = f"mkdir -p {q}"
    if user or group:
        owner = f"{user or ''}{':' + group if group else ''}"
        cmd += f" && chown {shlex.quote(owner)} {q}"
    if mode:
        cmd += f" && chmod {shlex.quote(mode)} {q}"
    host.run(cmd, sudo=sudo)


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
        host.run("mkdir -p " + " ".join(shlex.quote(d) for d in dirs), sudo=sudo)
    for path in changed:
        host.write_file(path, files[path], mode=modes.get(path, 0o644), sudo=sudo)
    return changed
