"""Errors that end a task with one clear line and a non-zero exit."""


class OpsError(Exception):
    """A failure the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


class ConfigError(OpsError):
    """A missing or invalid setting, found before any remote command runs."""

    exit_code = 2


class HostKeyError(OpsError):
    """The server's SSH host key is unknown or has changed."""

    exit_code = 2
