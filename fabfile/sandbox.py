"""sandbox: a disposable fresh server on this machine, to rehearse on.

``inv sandbox.up`` starts a Debian container that boots like a new VPS
(systemd as PID 1, sshd, cron, ufw; nothing of the stack) and prints the
``fab -H`` line and the host key to trust. Provision, deploy, restore on it
exactly as on the real server; ``inv sandbox.down`` throws it away.

It needs Docker on this machine and an image: by default one built here
from ``sandbox/Dockerfile`` (Debian 13 from Docker Hub), or any image
that boots ``/lib/systemd/systemd`` (the test rig builds its own with
mmdebstrap). The Docker engine of the sandbox lives in a volume of its own.

The rig's first-day story (tests/test_first_day_story.py) starts its server
with :func:`start`, the same code.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import PROJECT_ROOT
from .errors import OpsError
from .shell import script

DEFAULT_NAME = "maicivy-sandbox"
DEFAULT_IMAGE = "maicivy-sandbox:trixie"
DOCKERFILE_DIR = PROJECT_ROOT / "sandbox"
LABEL = "org.maicivy.sandbox"
APT_REPO_MOUNT = "/srv/maicivy-apt"
WHEELHOUSE_MOUNT = "/opt/wheels"
SSH_KEY_CANDIDATES = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")


@dataclass
class Spec:
    """What to start: the container and what it is given."""

    name: str = DEFAULT_NAME
    image: str = DEFAULT_IMAGE
    pubkey: str = ""                 # file with the public key(s) root accepts
    ssh_port: int = 0                # on 127.0.0.1; 0: a free port
    http_port: int = 0
    https_port: int = 0
    network: str = ""                # a docker network to join (created if missing)
    aliases: tuple[str, ...] = ()    # names the server has on that network
    apt_repo: str = ""               # a local flat apt repository (offline provisioning)
    wheelhouse: str = ""             # a directory of wheels for pip --find-links
    files: dict[str, bytes] = field(default_factory=dict)  # written at start, mode 600

    @property
    def volume(self) -> str:
        return f"{self.name}-docker"


@dataclass
class Sandbox:
    name: str
    ssh_port: int
    http_port: int
    https_port: int
    host_key: str                    # "ssh-ed25519 AAAA..."

    @property
    def target(self) -> str:
        return f"root@127.0.0.1:{self.ssh_port}"

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.ssh_port} {self.host_key}"


# --- pure builders --------------------------------------------------------------------


def run_argv(spec: Spec) -> list[str]:
    """``docker run`` for a systemd-booted server with its own Docker engine.

    No --privileged: the capabilities and relaxed confinement systemd and a
    nested dockerd need (SYS_ADMIN, NET_ADMIN for ufw, SYS_PTRACE for
    ``docker exec`` into containers of other users, writable /proc/sys for
    the container interfaces' sysctls, the host's cgroup tree), /run on tmpfs,
    /var/lib/docker on a volume (overlay2 cannot nest on overlay).
    """
    argv = ["docker", "run", "-d", "--name", spec.name, "--hostname", "fresh-vps",
            "--label", f"{LABEL}={spec.name}",
            "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
            # runc (docker exec) joins a container's namespaces through
            # /proc/PID/ns of its first process: when that runs as another user
            # (postgres, nobody...), reading it takes CAP_SYS_PTRACE.
            "--cap-add", "SYS_PTRACE",
            # The inner engine grants its containers only capabilities this
            # container has: the stack's compose file asks for DAC_READ_SEARCH.
            "--cap-add", "DAC_READ_SEARCH",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--security-opt", "systempaths=unconfined", "--cgroupns=host",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "-v", f"{spec.volume}:/var/lib/docker",
            # systemd halts on SIGRTMIN+3: `docker stop/restart` is a clean shutdown.
            "--stop-signal", "SIGRTMIN+3",
            "-p", f"127.0.0.1:{spec.ssh_port}:22", "-p", f"127.0.0.1:{spec.http_port}:80",
            "-p", f"127.0.0.1:{spec.https_port}:443"]
    if spec.network:
        argv += ["--network", spec.network]
        for alias in spec.aliases:
            argv += ["--network-alias", alias]
    if spec.apt_repo:
        argv += ["-v", f"{spec.apt_repo}:{APT_REPO_MOUNT}:ro"]
    if spec.wheelhouse:
        argv += ["-v", f"{spec.wheelhouse}:{WHEELHOUSE_MOUNT}:ro"]
    return [*argv, spec.image, "/lib/systemd/systemd"]


OFFLINE_APT = script(__file__, "scripts/sandbox-offline-apt.sh")


def offline_apt_argv(apt_dir: str = "/etc/apt") -> list[str]:
    """Point apt at the mounted local repository only (no mirror is reachable)."""
    return OFFLINE_APT.argv(APT_REPO_MOUNT, apt_dir, shell="bash")  # noqa: S604


def known_hosts_line(port: int, host_key: str) -> str:
    return f"[127.0.0.1]:{port} {' '.join(host_key.split()[:2])}"


def instructions(box: Sandbox) -> str:
    """What ``sandbox.up`` prints: the key to trust, then the fab lines."""
    t = box.target
    return "\n".join([
        f"sandbox {box.name} is up: a fresh Debian server (systemd, sshd, cron, ufw).",
        "1. Trust its host key: add this line to ~/.ssh/known_hosts",
        f"   {box.known_hosts_line}",
        "2. Rehearse, with your settings (maicivy.yaml):",
        f"   fab -H {t} provision",
        f"   fab -H {t} deploy",
        f"   fab -H {t} health.check",
        f"   fab -H {t} backup.all",
        f"   fab -H {t} restore.postgres --yes",
        "   (ssl.obtain needs public DNS: the sandbox keeps the temporary certificate)",
        f"3. The site: curl -k --resolve DOMAIN:{box.https_port}:127.0.0.1 "
        f"https://DOMAIN:{box.https_port}/health",
        f"   a shell: ssh -p {box.ssh_port} root@127.0.0.1",
        f"4. Throw it away: inv sandbox.down --name {box.name}",
    ])


# --- docker ---------------------------------------------------------------------------


def _docker(*args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, timeout=timeout,
                              input=input)
    except FileNotFoundError:
        raise OpsError("docker is not installed here: the sandbox needs a Docker engine "
                       "on this machine") from None
    except subprocess.TimeoutExpired:
        raise OpsError(f"docker {args[0]} did not finish within {timeout:.0f}s") from None
    if check and proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OpsError(f"docker {' '.join(args[:2])} failed: {err[-1] if err else 'no output'}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(name: str, script: str, check: bool = True, timeout: float = 120
       ) -> subprocess.CompletedProcess:
    """Run a shell script in the sandbox (as root, not over SSH)."""
    return _docker("exec", name, "bash", "-c", script, check=check, timeout=timeout)


def wait_running(name: str, timeout: float = 120) -> str:
    """Wait until systemd reports the boot finished; return its state."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = _docker("exec", name, "systemctl", "is-system-running", check=False, timeout=20)
        state = proc.stdout.decode().strip()
        if state in ("running", "degraded"):
            return state
        if _docker("inspect", "-f", "{{.State.Running}}", name, check=False
                   ).stdout.decode().strip() == "false":
            break
        time.sleep(0.5)
    failed = _docker("exec", name, "systemctl", "--failed", "--no-legend", check=False
                     ).stdout.decode().strip()
    logs = _docker("logs", "--tail", "20", name, check=False)
    raise OpsError(f"sandbox {name} did not finish booting within {timeout:.0f}s "
                   f"(systemd says {state or 'nothing'}; failed units: {failed or 'none'}; "
                   f"{(logs.stdout + logs.stderr).decode(errors='replace')[-500:]})")


def ssh_answers(port: int, timeout: float) -> bool:
    """True once an SSH server greets on 127.0.0.1:port (within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(2)
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)


def wait_ssh(name: str, port: int, timeout: float = 60) -> str:
    """Wait for sshd; return its ed25519 host key ("ssh-ed25519 AAAA...")."""
    if not ssh_answers(port, timeout):
        raise OpsError(f"sshd of sandbox {name} does not answer on 127.0.0.1:{port}")
    key = sh(name, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.decode().split()
    return f"{key[0]} {key[1]}"


def ports_of(name: str) -> dict[int, int]:
    out = _docker("port", name).stdout.decode()
    ports = {}
    for line in out.splitlines():  # "22/tcp -> 127.0.0.1:40001"
        inner, _, outer = line.partition(" -> ")
        ports[int(inner.split("/")[0])] = int(outer.rsplit(":", 1)[1])
    return ports


def attach(name: str, boot_timeout: float = 180) -> Sandbox:
    """The running sandbox ``name`` (after waiting for its boot)."""
    wait_running(name, boot_timeout)
    ports = ports_of(name)
    key = wait_ssh(name, ports[22])
    return Sandbox(name, ports[22], ports[80], ports[443], key)


def build_default_image(image: str = DEFAULT_IMAGE) -> None:
    if _docker("image", "inspect", image, check=False).returncode == 0:
        return
    print(f"building {image} from {DOCKERFILE_DIR}/Dockerfile (once)", flush=True)
    _docker("build", "-t", image, str(DOCKERFILE_DIR), timeout=1800)


def start(spec: Spec, boot_timeout: float = 180) -> Sandbox:
    """Start the server described by ``spec``, wait for its boot and sshd."""
    if _docker("container", "inspect", spec.name, check=False).returncode == 0:
        raise OpsError(f"a container named {spec.name} exists already: "
                       f"inv sandbox.down --name {spec.name}, or choose another --name")
    spec.ssh_port = spec.ssh_port or free_port()
    spec.http_port = spec.http_port or free_port()
    spec.https_port = spec.https_port or free_port()
    if spec.network and _docker("network", "inspect", spec.network, check=False).returncode:
        _docker("network", "create", spec.network)
    _docker(*run_argv(spec)[1:])
    try:
        wait_running(spec.name, boot_timeout)
        if spec.apt_repo:
            _docker("exec", spec.name, *offline_apt_argv())
        files = dict(spec.files)
        if spec.pubkey:  # written, not bind-mounted: sshd wants it owned by root
            files["/root/.ssh/authorized_keys"] = Path(spec.pubkey).read_bytes()
        for path, data in files.items():
            q = shlex.quote(path)
            _docker("exec", "-i", spec.name, "sh", "-c",
                    f"umask 077 && mkdir -p \"$(dirname {q})\" && cat > {q}", input=data)
        return attach(spec.name, boot_timeout)
    except BaseException:
        stop(spec.name)
        raise


def stop(name: str, network: str = "") -> None:
    """Remove the sandbox container, its Docker volume (and ``network``)."""
    volume = f"{name}-docker"
    _docker("rm", "-f", "-v", name, check=False, timeout=180)
    _docker("volume", "rm", "-f", volume, check=False)
    if network:
        _docker("network", "rm", network, check=False)


def reboot(name: str, timeout: float = 180) -> Sandbox:
    """Restart the container: a clean shutdown of systemd, then a cold boot."""
    _docker("restart", "-t", "60", name, timeout=timeout)
    return attach(name, timeout)


# --- tasks ----------------------------------------------------------------------------

from invoke import Collection, task  # noqa: E402

from .core import fail  # noqa: E402


def _pubkey(path: str) -> str:
    candidates = [path] if path else list(SSH_KEY_CANDIDATES)
    for candidate in candidates:
        p = Path(candidate).expanduser()
        if p.is_file():
            return str(p.resolve())
    if path:
        raise OpsError(f"--key {path}: no such file")
    raise OpsError("no SSH public key in ~/.ssh (id_ed25519.pub, id_ecdsa.pub, id_rsa.pub): "
                   "make one with ssh-keygen -t ed25519, or pass --key FILE.pub")


@task(auto_shortflags=False, help={
    "name": f"container name (default {DEFAULT_NAME})",
    "image": "an image that boots /lib/systemd/systemd (default: built from "
             "sandbox/Dockerfile)",
    "key": "public key root accepts (default ~/.ssh/id_ed25519.pub, id_ecdsa.pub, id_rsa.pub)",
    "ssh_port": "SSH port on 127.0.0.1 (default: a free one)",
    "https_port": "port of the sandbox's 443 on 127.0.0.1 (default: a free one)",
})
def up(c, name=DEFAULT_NAME, image="", key="", ssh_port=0, https_port=0):
    """Start a disposable fresh server here (Docker needed) and say how to reach it.

    The container boots systemd with sshd, cron and ufw, like a new Debian
    VPS, and has nothing of the stack: rehearse `provision`, `deploy`,
    `backup.all`, `restore.postgres` on it before the real server. Prints the
    known_hosts line to trust and the `fab -H` lines.
    """
    try:
        if not image:
            build_default_image()
        box = start(Spec(name=name, image=image or DEFAULT_IMAGE, pubkey=_pubkey(key),
                         ssh_port=int(ssh_port), https_port=int(https_port)))
    except OpsError as exc:
        raise fail(str(exc)) from None
    print(instructions(box), flush=True)


@task(help={"name": f"container name (default {DEFAULT_NAME})"})
def down(c, name=DEFAULT_NAME):
    """Remove the sandbox container and its Docker volume (everything in it is lost)."""
    try:
        if _docker("container", "inspect", name, check=False).returncode:
            print(f"no sandbox named {name}")
            return
        stop(name)
    except OpsError as exc:
        raise fail(str(exc)) from None
    print(f"sandbox {name} removed")


ns = Collection("sandbox", up, down)
