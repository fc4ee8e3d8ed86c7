"""What every task shares: settings, the target Host, and clean failures.

Tasks are declared with :func:`ops_task` instead of ``invoke.task``. It

* loads and validates the settings *before* the task body runs, so a bad or
  missing value stops the task before any remote command;
* makes a fabric Connection refuse unknown or changed SSH host keys;
* turns :class:`~fabfile.errors.OpsError` into one line on stderr and a
  non-zero exit (no traceback), and so does every failure a user can cause:
  a task option that is not a number (``--lines=abc``, exit 2), an SSH login
  or connection that fails (exit 3), a local path that cannot be read or
  written (exit 1).
"""

from __future__ import annotations

import functools
import socket
import sys

import paramiko
from invoke import Exit, Task, task
from invoke.parser import Argument
from paramiko.ssh_exception import NoValidConnectionsError

from .config import Settings, load_settings
from .errors import OpsError
from .host import Host, explain_ssh_error, harden_connection


def settings_for(c) -> Settings:
    """The validated settings for this context (cached on the context)."""
    # Contexts turn attribute assignment into config keys: use __dict__.
    cached = vars(c).get("_maicivy_settings")
    if cached is None:
        section = c.config.get("maicivy") if hasattr(c, "config") else None
        cached = load_settings(invoke_section=section)
        object.__setattr__(c, "_maicivy_settings", cached)
    return cached


def host_for(c, settings: Settings, dry_run: bool = False) -> Host:
    """The Host wrapper a task works through."""
    harden_connection(c, settings.known_hosts)
    host = Host(c, dry_run=dry_run, use_sudo=settings.sudo)
    # Inside a task that holds the stack lock (fabfile.lock.locked): guard its commands.
    host.guard = None if dry_run else vars(c).get("_maicivy_guard")
    return host


def fail(message: str, code: int = 1) -> Exit:
    return Exit(f"error: {message}", code=code)


class _CheckedArgument(Argument):
    """A task option whose bad value (``--lines=abc``) is one line, not a traceback."""

    def set_value(self, value, cast: bool = True) -> None:
        try:
            super().set_value(value, cast)
        except (TypeError, ValueError):
            kind = {int: "a whole number", float: "a number"}.get(self.kind, self.kind.__name__)
            flag = f"--{self.name.replace('_', '-')}"
            raise Exit(f"error: {flag} must be {kind} (got {value!r})", code=2) from None


class OpsTask(Task):
    """invoke's Task whose options convert their values with a one-line error."""

    def get_arguments(self, *args, **kwargs):
        arguments = super().get_arguments(*args, **kwargs)
        for argument in arguments:
            argument.__class__ = _CheckedArgument
        return arguments


def _one_line(exc: BaseException, target: str) -> Exit | None:
    """The one-line error for a failure the user caused (None: a bug, keep the traceback)."""
    if isinstance(exc, OpsError):
        return fail(str(exc), exc.exit_code)
    known = explain_ssh_error(exc, target)
    if known is not None:
        return fail(str(known), known.exit_code)
    if isinstance(exc, paramiko.AuthenticationException):
        return fail(f"cannot log in to {target}: {exc}; check the SSH user and key "
                    "(fab -i KEY, ~/.ssh/config) and that the key is in the server's "
                    "authorized_keys", 3)
    if isinstance(exc, (NoValidConnectionsError, socket.gaierror, TimeoutError,
                        ConnectionError, paramiko.SSHException, EOFError)):
        return fail(f"cannot reach {target}: {exc or type(exc).__name__}; check the host "
                    "name, port and that sshd runs", 3)
    if isinstance(exc, OSError) and exc.filename is not None:
        return fail(f"{exc.filename}: {exc.strerror or exc}", 1)
    return None


def ops_task(*args, **kwargs):
    """``invoke.task`` plus settings validation, host key checking, clean errors."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(c, *a, **kw):
            try:
                settings = settings_for(c)
                harden_connection(c, settings.known_hosts)
                return fn(c, *a, **kw)
            except Exception as exc:
                target = getattr(c, "host", None) or "localhost"
                if getattr(c, "user", None) and target != "localhost":
                    target = f"{c.user}@{target}"
                clean = _one_line(exc, target)
                if clean is None:
                    raise
                raise clean from None
            finally:
                sys.stdout.flush()

        kwargs.setdefault("klass", OpsTask)
        return task(wrapper, **kwargs)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate
