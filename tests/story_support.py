"""The world of the first-day story and its bench: a fresh server (fabfile.sandbox,
the same code as ``inv sandbox.up``), a private registry with a password, and
pebble as the ACME server, all on one Docker network of their own.

* the server: tests/rig/fresh-server's Debian 13 image booting systemd, its
  apt pointed at the local repository and pip at the wheelhouse that
  tests/install-deps.sh prepared (provision's installs really run, offline);
* ``registry.test:5000``: Debian's docker-registry with TLS (a self-signed
  certificate the server trusts in /etc/docker/certs.d) and htpasswd
  authentication, holding the rig's test images (pushed once from here);
* ``pebble.test:14000``: pebble, validating http-01 on the server's port 80
  through the network aliases ``maicivy.test`` / ``grafana.maicivy.test``.

Everything is published on 127.0.0.1 only and removed by ``World.close()``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rig.images import TEST_IMAGES

from fabfile import sandbox
from fabfile.config import SERVICES

ROOT = Path(__file__).resolve().parent.parent
SUITE = os.environ.get("MAICIVY_STORY_SUITE", "trixie")
IMAGE = f"maicivy-rig/fresh-server:{SUITE}"
CACHE = Path(f"/var/cache/maicivy-rig/fresh-server/{SUITE}")
RIG_PREFIX = "127.0.0.1:5000/maicivy"
RIG_REGISTRY_DATA = "/var/lib/maicivy-registry"  # tests/rig/setup-docker.sh
HELPER_IMAGE = f"{RIG_PREFIX}/pybase:test"
REGISTRY_NAME = "registry.test:5000"
DOMAIN = "maicivy.test"
GRAFANA = "grafana.maicivy.test"
# service -> (repository, tag) in the rig registry (every service of the stack).
IMAGES = {svc: tuple(ref.rsplit("/", 1)[1].split(":", 1))
          for svc, ref in TEST_IMAGES.items()}
EXTRA_IMAGES = [("backend", "v2"), ("frontend", "v2")]
SERVER_ROOT = "/opt/maicivy"
COMPOSE = (f"docker compose -p maicivy -f {SERVER_ROOT}/docker/docker-compose.prod.yml "
           f"--env-file {SERVER_ROOT}/.env")


def docker(*args: str, check: bool = True, timeout: float = 600, **kw
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          **kw)
    if check and proc.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])}: exit {proc.returncode}: "
                           f"{proc.stderr[-1500:]}{proc.stdout[-500:]}")
    return proc


def self_signed(work: Path, name: str, *sans: str) -> tuple[Path, Path]:
    key, cert = work / f"{name}.key", work / f"{name}.pem"
    alt = ",".join(sans)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "3", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={alt}",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    os.chmod(key, 0o644)
    return key, cert


def image_ready() -> str | None:
    """Why the fresh-server image or its offline sources are missing (None: ready)."""
    if docker("image", "inspect", IMAGE, check=False).returncode:
        return f"image {IMAGE} is missing"
    for path in (CACHE / "apt" / "Packages", CACHE / "wheels" / ".recipe"):
        if not path.exists():
            return f"{path} is missing"
    return None


@dataclass
class World:
    work: Path
    client_key: Path
    name: str = field(default_factory=lambda: f"maicivy-story-{os.getpid()}")
    registry_user: str = "deployer"
    registry_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    containers: list[str] = field(default_factory=list)
    box: sandbox.Sandbox | None = None
    config: Path | None = None
    known_hosts: Path | None = None
    pushed: list[str] = field(default_factory=list)

    @property
    def network(self) -> str:
        return self.name

    # --- helpers around the network -----------------------------------------------------

    def _helper(self, name: str, alias: str, ports: list[str], mounts: list[str],
                command: list[str], env: dict | None = None) -> None:
        argv = ["run", "-d", "--name", name, "--network", self.network,
                "--network-alias", alias]
        for p in ports:
            argv += ["-p", p]
        for m in mounts:
            argv += ["-v", m]
        for k, v in (env or {}).items():
            argv += ["-e", f"{k}={v}"]
        docker(*argv, HELPER_IMAGE, *command)
        self.containers.append(name)

    def start_registry(self) -> int:
        import bcrypt

        work = self.work / "registry"
        work.mkdir(parents=True, exist_ok=True)
        key, cert = self_signed(work, "registry", "DNS:registry.test", "IP:127.0.0.1")
        self.registry_cert = cert
        hashed = bcrypt.hashpw(self.registry_password.encode(), bcrypt.gensalt(prefix=b"2a"))
        (work / "htpasswd").write_text(f"{self.registry_user}:{hashed.decode()}\n")
        (work / "config.yml").write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn"},
            # The rig registry's own storage, read-only: the test images are
            # there already (pushing them again would take minutes).
            "storage": {"filesystem": {"rootdirectory": "/var/lib/registry"},
                        "maintenance": {"uploadpurging": {"enabled": False},
                                        "readonly": {"enabled": True}}},
            "http": {"addr": ":5000", "tls": {"certificate": "/etc/registry/registry.pem",
                                               "key": "/etc/registry/registry.key"}},
            "auth": {"htpasswd": {"realm": "maicivy-story", "path": "/etc/registry/htpasswd"}},
        }))
        port = sandbox.free_port()
        self._helper(f"{self.name}-registry", "registry.test", [f"127.0.0.1:{port}:5000"],
                     ["/usr/bin/docker-registry:/usr/bin/docker-registry:ro",
                      f"{work}:/etc/registry:ro", f"{RIG_REGISTRY_DATA}:/var/lib/registry:ro"],
                     ["/usr/bin/docker-registry", "serve", "/etc/registry/config.yml"])
        self.registry_port = port
        return port

    def push_images(self) -> None:
        """Copy the rig's test images into the story registry (login with a
        config directory of our own: nothing lands in ~/.docker)."""
        cfg = self.work / "docker-config"
        cfg.mkdir(exist_ok=True)
        env = {**os.environ, "DOCKER_CONFIG": str(cfg)}
        target = f"127.0.0.1:{self.registry_port}"
        deadline = time.monotonic() + 30
        while True:
            login = subprocess.run(["docker", "login", target, "-u", self.registry_user,
                                    "--password-stdin"], input=self.registry_password,
                                   capture_output=True, text=True, env=env, timeout=60)
            if login.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker login to the story registry: {login.stderr}")
            time.sleep(0.5)
        for repo, tag in [*IMAGES.values(), *EXTRA_IMAGES]:
            src, dst = f"{RIG_PREFIX}/{repo}:{tag}", f"{target}/maicivy/{repo}:{tag}"
            if docker("image", "inspect", src, check=False).returncode:
                docker("pull", "-q", src)
            docker("tag", src, dst)
            self.pushed.append(dst)
            proc = subprocess.run(["docker", "push", dst], capture_output=True, text=True,
                                  env=env, timeout=600)
            if proc.returncode:
                raise RuntimeError(f"docker push {dst}: {proc.stderr[-1000:]}")

    def start_pebble(self) -> None:
        work = self.work / "pebble"
        work.mkdir(parents=True, exist_ok=True)
        key, cert = self_signed(work, "pebble", "DNS:pebble.test")
        self.pebble_cert = cert
        (work / "config.json").write_text(json.dumps({"pebble": {
            "listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
            "certificate": "/etc/pebble/pebble.pem", "privateKey": "/etc/pebble/pebble.key",
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        self._helper(f"{self.name}-pebble", "pebble.test", [],
                     ["/usr/bin/pebble:/usr/bin/pebble:ro", f"{work}:/etc/pebble:ro"],
                     ["/usr/bin/pebble", "-config", "/etc/pebble/config.json"],
                     env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                          "PEBBLE_AUTHZREUSE": "0"})

    def start_server(self) -> sandbox.Sandbox:
        spec = sandbox.Spec(
            name=f"{self.name}-server", image=IMAGE,
            pubkey=str(self.client_key.with_suffix(".pub")),
            network=self.network, aliases=(DOMAIN, GRAFANA),
            apt_repo=str(CACHE / "apt"), wheelhouse=str(CACHE / "wheels"),
            files={
                # What an operator does once for a private registry with its own CA.
                f"/etc/docker/certs.d/{REGISTRY_NAME}/ca.crt": self.registry_cert.read_bytes(),
                "/etc/maicivy/pebble-ca.pem": self.pebble_cert.read_bytes(),
            })
        self.box = sandbox.start(spec)
        self.containers.append(spec.name)
        self.known_hosts = self.work / "known_hosts"
        self.known_hosts.write_text(self.box.known_hosts_line + "\n")
        return self.box

    def settings(self, **changes) -> dict:
        data = {
            "domain": DOMAIN, "grafana_domain": GRAFANA,
            "registry": f"{REGISTRY_NAME}/maicivy",
            "images": {svc: (f"{repo}:{tag}" if svc in ("backend", "frontend")
                             else f"{REGISTRY_NAME}/maicivy/{repo}:{tag}")
                       for svc, (repo, tag) in IMAGES.items()},
            "healthcheck": {"interval": "2s", "timeout": "3s", "retries": 30,
                            "start_period": "5s"},
            "rate_limit": {"per_minute": 6000, "burst": 200},
            # The test images' nginx is Debian 12's (nginx 1.22, OpenSSL 3.0).
            "nginx": {"version": "1.22", "openssl_version": "3.0"},
            "provision": {"pip_options": f"--no-index --find-links {sandbox.WHEELHOUSE_MOUNT}"},
            "tls": {"acme_server": "https://pebble.test:14000/dir",
                    "ca_bundle": "/etc/maicivy/pebble-ca.pem", "email": "ops@maicivy.test"},
            "known_hosts": [str(self.known_hosts)],
        }
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return data

    def write_settings(self, **changes) -> Path:
        self.config = self.work / "maicivy.yaml"
        self.config.write_text(yaml.safe_dump(self.settings(**changes), sort_keys=True))
        return self.config

    def up(self) -> World:
        docker("network", "create", self.network)
        self.containers_network = True
        self.start_registry()
        self.start_pebble()
        self.start_server()
        self.write_settings()
        return self

    # --- acting on the server --------------------------------------------------------------

    def fab(self, *args: str, timeout: float = 900, config: Path | None = None
            ) -> subprocess.CompletedProcess:
        """The real ``fab`` CLI, as an operator types it, with the settings file."""
        fab = Path(sys.executable).with_name("fab")  # the virtualenv's, as PATH may lack it
        argv = [str(fab) if fab.exists() else "fab", "-r", str(ROOT), "-H", self.box.target,
                "-i", str(self.client_key), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
        env["MAICIVY_CONFIG"] = str(config or self.config)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                              env=env)

    def sh(self, script: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess:
        """A root shell on the server (the operator's `ssh vps`), not over fab."""
        proc = subprocess.run(["docker", "exec", self.box.name, "bash", "-c", script],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{script[:200]}: exit {proc.returncode}: "
                                 f"{proc.stderr[-2000:]}{proc.stdout[-2000:]}")
        return proc

    def https(self, path: str = "/health", timeout: float = 5.0) -> tuple[int, bytes]:
        from deploy_support import get

        return get(DOMAIN, self.box.https_port, path, timeout=timeout)

    def wait_healthy(self, timeout: float = 240) -> float:
        """Wait until /health answers over HTTPS and every service is healthy;
        return the seconds it took."""
        import ssl

        t0 = time.monotonic()
        deadline = t0 + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                status, _ = self.https()
                states = [s for s in self.sh(f"{COMPOSE} ps --format '{{{{.Service}}}} "
                                             "{{.Health}}'", check=False).stdout.split("\n")
                          if s.strip()]
                if status == 200 and len(states) == len(SERVICES) and all(
                        s.endswith(" healthy") for s in states):
                    return time.monotonic() - t0
                last = f"HTTP {status}; {states}"
            except (OSError, ssl.SSLError) as exc:
                last = repr(exc)
            time.sleep(1)
        raise AssertionError(f"stack not healthy within {timeout}s: {last}")

    def reboot(self) -> None:
        self.box = sandbox.reboot(self.box.name)

    def close(self) -> None:
        if self.box is not None:
            sandbox.stop(self.box.name)
        for name in reversed(self.containers):
            docker("rm", "-f", "-v", name, check=False)
        for ref in self.pushed:
            docker("rmi", ref, check=False)
        docker("network", "rm", self.network, check=False)
