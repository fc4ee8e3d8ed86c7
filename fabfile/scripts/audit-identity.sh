# shellcheck shell=sh disable=SC2154,SC2034
# A POSIX sh snippet (fabfile/audit.py: IDENTITY_SH, after audit-ssh-connection.sh,
# which sets who_ssh): sets WHO, the identity the server sees, for the scripts
# that append deploy log lines.
set -f; set -- $who_ssh; set +f
if [ $# -eq 4 ]; then who_ssh="$1:$2"; else who_ssh=-; fi
WHO="server_user=$(id -un 2>/dev/null || id -u) sudo_user=${SUDO_USER:--} ssh_from=$who_ssh"
