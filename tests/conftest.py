"""Shared fixtures: a real OpenSSH server on 127.0.0.1, the Docker rig, settings.

The rig tier (``-m rig``) needs what .ci/run installs and starts: sshd from
openssh-server, a Docker engine with Compose v2, the local registry on
127.0.0.1:5000 with the test images (tests/rig/setup-docker.sh).

``--shuffle SEED`` (an integer, or ``random``) runs the test modules in a
shuffled order and the tests of each module in a shuffled order, to show that
no test relies on what an earlier one left behind. A module's tests stay
together, so module-scoped fixtures are set up once. The seed is printed in
the header and at the end; the same seed gives the same order.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tools installed in the virtualenv (inv, fab, gixy, ...) must be found by the
# subprocesses tests start, even when pytest runs as .venv/bin/python -m pytest.
os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle", metavar="SEED", default=None,
        help="shuffle test modules, then the tests inside each module; SEED is an "
             "integer or 'random' (the seed used is printed)")


_SHUFFLE_SEED = pytest.StashKey[int]()


def pytest_configure(config):
    value = config.getoption("shuffle")
    if value is None:
        return
    if value == "random":
        seed = random.SystemRandom().randrange(1, 1_000_000)
    else:
        try:
            seed = int(value)
        except ValueError:
            raise pytest.UsageError(
                f"--shuffle wants an integer seed or 'random', not {value!r}") from None
    config.stash[_SHUFFLE_SEED] = seed


def pytest_report_header(config):
    if _SHUFFLE_SEED in config.stash:
        return f"shuffle: --shuffle={config.stash[_SHUFFLE_SEED]}"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Modules in a shuffled order, then the tests of each module shuffled.

    Runs before pytest's own reordering by fixture parameters, which keeps
    parametrized higher-scoped fixtures grouped.
    """
    if _SHUFFLE_SEED not in config.stash:
        return
    rng = random.Random(config.stash[_SHUFFLE_SEED])
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = list(modules)
    rng.shuffle(order)
    shuffled = []
    for name in order:
        tests = modules[name]
        rng.shuffle(tests)
        shuffled.extend(tests)
    items[:] = shuffled


def pytest_terminal_summary(terminalreporter, config):
    if _SHUFFLE_SEED in config.stash:
        terminalreporter.write_line(f"shuffled with --shuffle={config.stash[_SHUFFLE_SEED]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class SSHHost:
    """A throw-away sshd on 127.0.0.1 that fabric connects to for real."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    host_pubkey: str
    workdir: Path

    def forged_known_hosts(self, tmp: Path) -> Path:
        """A known_hosts file that pins *another* key for this host (a changed key)."""
        other = tmp / "other_host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                       check=True)
        kind, key = other.with_suffix(".pub").read_text().split()[:2]
        wrong = tmp / "forged_known_hosts"
        wrong.write_text(f"[{self.host}]:{self.port} {kind} {key}\n")
        return wrong

    def connection(self, settings: dict | None = None, known_hosts: Path | None = None):
        """A fabric Connection whose ``maicivy`` config is ``settings``."""
        from fabric import Config, Connection

        overrides = {"maicivy": dict(settings or {})}
        overrides["maicivy"].setdefault("known_hosts", [])
        overrides["maicivy"]["known_hosts"] = [
            *overrides["maicivy"]["known_hosts"],
            str(known_hosts or self.known_hosts),
        ]
        config = Config(overrides=overrides)
        return Connection(
            self.host,
            user=self.user,
            port=self.port,
            config=config,
            connect_kwargs={
                "key_filename": str(self.client_key),
                "look_for_keys": False,
                "allow_agent": False,
            },
        )

    def fab_argv(self) -> list[str]:
        """argv prefix to run the real ``fab`` CLI against this host."""
        return [
            "fab",
            "-r", str(ROOT),
            "-H", f"{self.user}@{self.host}:{self.port}",
            "-i", str(self.client_key),
        ]


def _sshd_binary() -> str:
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.access(path, os.X_OK):
        pytest.fail("sshd not found: apt-get install openssh-server (.ci/run does this)")
    return path


def start_sshd(work: Path) -> tuple[SSHHost, subprocess.Popen]:
    """sshd on 127.0.0.1 with throw-away host and client keys in ``work``.

    Returns the SSHHost and the sshd process (terminate it when done). Also
    used by the bench scripts.
    """
    import pwd

    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    host_key = work / "ssh_host_ed25519_key"
    client_key = work / "client_ed25519"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
    authorized = work / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    config = work / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {work / 'sshd.pid'}", f"AuthorizedKeysFile {authorized}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "MaxSessions 64",
        "MaxStartups 64:30:128", "AcceptEnv LANG LC_*", "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)
    with open(work / "sshd.log", "wb") as log:
        proc = subprocess.Popen([_sshd_binary(), "-D", "-e", "-f", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"sshd did not start: {(work / 'sshd.log').read_text()}") from None
    kind, key = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
    host = SSHHost(host="127.0.0.1", port=port, user=pwd.getpwuid(os.getuid()).pw_name,
                   client_key=client_key, known_hosts=known_hosts,
                   host_pubkey=f"{kind} {key}", workdir=work)
    return host, proc


@pytest.fixture(scope="session")
def ssh_host(tmp_path_factory) -> SSHHost:
    """Start sshd on 127.0.0.1 with throw-away keys; yields an SSHHost."""
    try:
        host, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield host
    proc.terminate()
    proc.wait(timeout=10)
