#!/bin/sh
# mmdebstrap customize hook of build.sh: make the root file system boot as a
# container with systemd as PID 1 and behave like a fresh VPS.
#   customize.sh ROOTFS MIRROR SUITE
set -eu
R="$1"
MIRROR="$2"
SUITE="$3"

# apt: the distribution's mirror, as on a VPS (the rig replaces it by a local
# repository at start, see fabfile/sandbox.py).
rm -f "$R/etc/apt/sources.list"
cat >"$R/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC

# Units that have no meaning in a container.
for unit in getty@tty1.service serial-getty@.service console-getty.service \
    systemd-remount-fs.service systemd-firstboot.service systemd-udevd.service \
    systemd-udev-trigger.service systemd-modules-load.service sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
    systemd-sysctl.service proc-sys-fs-binfmt_misc.automount \
    systemd-binfmt.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done

# sshd: a host key of its own per server, made at first boot.
rm -f "$R"/etc/ssh/ssh_host_*
mkdir -p "$R/etc/systemd/system/ssh.service.d"
cat >"$R/etc/systemd/system/ssh.service.d/host-keys.conf" <<'UNIT'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT
printf '%s\n' 'PermitRootLogin prohibit-password' 'PasswordAuthentication no' \
    >"$R/etc/ssh/sshd_config.d/fresh-server.conf"
chroot "$R" systemctl enable ssh.service cron.service >/dev/null 2>&1 || true
mkdir -p "$R/root/.ssh"
chmod 700 "$R/root/.ssh"
echo fresh-vps >"$R/etc/hostname"
: >"$R/etc/machine-id"
