"""What every task shares: settings, the target Host, and clean failures.

Tasks are declared with :func:`ops_task` instead of ``invoke.task``. It

* loads and validates the settings *before* the task body runs, so a bad or
  missing value stops the task before any remote command;
* makes a fabric Connection refuse unknown or changed SSH host keys;
* turns :class:`~fabfile.errors.OpsError` into one line on stderr and a
  non-zero exit (no traceback).
"""

from __future__ import annotations

import functools
import socket
import sys

from invoke import Exit, task
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


def ops_task(*args, **kwargs):
    """``invoke.task`` plus settings validation, host key checking, clean errors."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(c, *a, **kw):
            try:
                settings = settings_for(c)
                harden_connection(c, settings.known_hosts)
                return fn(c, *a, **kw)
            except OpsError as exc:
                raise fail(str(exc), exc.exit_code) from None
            except (NoValidConnectionsError, socket.gaierror, TimeoutError,
                    ConnectionError) as exc:
                target = getattr(c, "host", "localhost")
                raise fail(f"cannot reach {target}: {exc}; check the host name, "
                           "port and that sshd runs", 3) from None
            except Exception as exc:
                target = getattr(c, "host", "localhost")
                known = explain_ssh_error(exc, target)
                if known is not None:
                    raise fail(str(known), known.exit_code) from None
                raise
            finally:
                sys.stdout.flush()

        return task(wrapper, **kwargs)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate
