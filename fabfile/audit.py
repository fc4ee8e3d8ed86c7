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

# POSIX sh; sets who_ssh to the SSH session's "$SSH_CONNECTION" (client_ip
# client_port server_ip server_port), or '' when not run over SSH. Under sudo
# (which drops the variable) it is read from the nearest ancestor that has it.
SSH_CONNECTION_SH = r"""
who_ssh=${SSH_CONNECTION:-}
who_p=$PPID
while [ -z "$who_ssh" ] && [ "${who_p:-1}" -gt 1 ] 2>/dev/null; do
  who_ssh=$(tr '\0' '\n' < "/proc/$who_p/environ" 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p')
  who_st=$(cat "/proc/$who_p/stat" 2>/dev/null) || break
  who_st=${who_st##*) }
  who_p=$(echo "$who_st" | cut -d' ' -f2)
done
""".strip()

# POSIX sh; sets WHO. Runs inside the server-side scripts that append log lines.
IDENTITY_SH = SSH_CONNECTION_SH + "\n" + r"""
set -f; set -- $who_ssh; set +f
if [ $# -eq 4 ]; then who_ssh="$1:$2"; else who_ssh=-; fi
WHO="server_user=$(id -un 2>/dev/null || id -u) sudo_user=${SUDO_USER:--} ssh_from=$who_ssh"
""".strip()


def append_with_identity(log: str) -> str:
    """sh: append each line read from stdin to ``log`` (a quoted path), with $WHO after it."""
    return f'while IFS= read -r line; do printf \'%s %s\\n\' "$line" "$WHO"; done >> {log}'


def log_line_with_identity(line_quoted: str, log: str) -> str:
    """sh: append one line (already shell-quoted) to ``log`` with $WHO after it."""
    return f'printf \'%s %s\\n\' {line_quoted} "$WHO" >> {log}'
