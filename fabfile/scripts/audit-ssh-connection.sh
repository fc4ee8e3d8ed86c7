# shellcheck shell=sh
# A POSIX sh snippet (fabfile/audit.py: SSH_CONNECTION_SH), put in front of the
# scripts that need it: sets who_ssh to the SSH session's "$SSH_CONNECTION"
# (client_ip client_port server_ip server_port), or '' when not run over SSH.
# Under sudo (which drops the variable) it is read from the nearest ancestor
# process that has it.
who_ssh=${SSH_CONNECTION:-}
who_p=$PPID
while [ -z "$who_ssh" ] && [ "${who_p:-1}" -gt 1 ] 2>/dev/null; do
  who_ssh=$(tr '\0' '\n' < "/proc/$who_p/environ" 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p')
  who_st=$(cat "/proc/$who_p/stat" 2>/dev/null) || break
  who_st=${who_st##*) }
  who_p=$(echo "$who_st" | cut -d' ' -f2)
done
