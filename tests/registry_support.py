"""A private registry for tests: Debian's docker-registry with htpasswd auth on
127.0.0.1, and images pushed into it from the rig's registry.

The test client logs in with a Docker config directory of its own
(``DOCKER_CONFIG``), so the server side (the deploy under test) has no
credentials for it unless it logs in itself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from conftest import free_port


def bcrypt_line(user: str, password: str) -> str:
    """An htpasswd line with a bcrypt hash (what docker-registry accepts)."""
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        return subprocess.run([htpasswd, "-nbB", user, password], capture_output=True,
                              text=True, check=True).stdout.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # Python < 3.13; libxcrypt does bcrypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("no bcrypt here: install apache2-utils (htpasswd)")
    return f"{user}:{hashed}"


class AuthRegistry:
    """docker-registry on 127.0.0.1:<free port> that wants a user and password."""

    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.user = "deployer"
        self.password = secrets.token_urlsafe(18)
        self.client_config = work / "client-docker-config"
        self.proc: subprocess.Popen | None = None

    def start(self) -> AuthRegistry:
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        (self.work / "data").mkdir(parents=True, exist_ok=True)
        (self.work / "htpasswd").write_text(bcrypt_line(self.user, self.password) + "\n")
        config = self.work / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.work / 'data'}\n"
            f"http:\n  addr: {self.host}\n"
            f"auth:\n  htpasswd:\n    realm: maicivy-test\n    path: {self.work / 'htpasswd'}\n")
        log = open(self.work / "registry.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
                raise RuntimeError("the test registry answers without authentication")
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("docker-registry did not start: "
                                   + (self.work / "registry.log").read_text()[-2000:])
            time.sleep(0.2)
        self._client("login", "--username", self.user, "--password-stdin", self.host,
                     stdin=self.password)
        return self

    def _client(self, *args: str, stdin: str | None = None) -> str:
        env = {**os.environ, "DOCKER_CONFIG": str(self.client_config)}
        proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, text=True,
                              env=env, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"docker {args[0]}: {proc.stderr.strip()}")
        return proc.stdout

    def push(self, source: str, name: str) -> str:
        """Copy ``source`` (a local image) to this registry as ``name``; returns the ref.

        The local tag is removed again, so that a pull has to ask the registry.
        """
        ref = f"{self.host}/{name}"
        self._client("tag", source, ref)
        self._client("push", "-q", ref)
        self._client("rmi", ref)
        return ref

    def stop(self) -> None:
        subprocess.run(["docker", "logout", self.host], capture_output=True)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
