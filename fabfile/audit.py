"""Who did it, as the server sees it: the identity added to every deploy log line.

The deploy log's ``user=`` is what the client says (its ``LOGNAME`` and host
name): anyone can claim anything there. Each line also gets what the server
itself knows, computed *on the server* by the command that writes the line:

* ``server_user``: the account the command runs as (``id -un``);
* ``sudo_user``: the account that ran ``sudo`` (``$SUDO_USER``), ``-`` if none;
* ``ssh_from``: the client address and port of the SSH session
  (``$SSH_CONNECTION``), ``-`` when not run over SSH (cron, console).

``sudo`` drops ``SSH_CONNECTION`` from the environment, so when it is not set
the snippet reads it from the nearest ancestor process that has it (the SSH
session's shell, under sudo); as root every ancestor is readable.
"""

from __future__ import annotations

from .shell import script

# POSIX sh snippets put in front of the scripts that need them (not run alone):
# SSH_CONNECTION_SH sets who_ssh (the SSH session's "$SSH_CONNECTION", '' when
# not over SSH; read from the nearest ancestor under sudo, which drops it);
# IDENTITY_SH also sets WHO, for the scripts that append deploy log lines.
SSH_CONNECTION_SH = script(__file__, "scripts/audit-ssh-connection.sh").text.strip()
IDENTITY_SH = SSH_CONNECTION_SH + "\n" + script(__file__, "scripts/audit-identity.sh").text.strip()


def append_with_identity(log: str) -> str:
    """sh: append each line read from stdin to ``log`` (a quoted path), with $WHO after it."""
    return f'while IFS= read -r line; do printf \'%s %s\\n\' "$line" "$WHO"; done >> {log}'


def log_line_with_identity(line_quoted: str, log: str) -> str:
    """sh: append one line (already shell-quoted) to ``log`` with $WHO after it."""
    return f'printf \'%s %s\\n\' {line_quoted} "$WHO" >> {log}'
