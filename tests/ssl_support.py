"""A private ACME server for tests: pebble plus a mock DNS, on 127.0.0.1 only.

``Pebble(workdir, http_port)`` starts

* ``pebble-challtestsrv`` as a DNS server that answers every A query with
  127.0.0.1 (and no AAAA), so that pebble's validation authority resolves the
  test names (maicivy.test, grafana.maicivy.test) to this machine;
* ``pebble`` with a TLS certificate generated here, its validation authority
  checking http-01 challenges on ``http_port`` (the stack's published HTTP
  port): challenges are really fetched through the nginx container.

Both listen on free ports of 127.0.0.1 and are stopped by ``stop()``.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if not path:
        pytest.fail(f"{binary} not found: apt-get install {package} (tests/install-deps.sh)")
    return path


class Pebble:
    def __init__(self, workdir: Path, http_port: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self.ca_bundle = self.workdir / "pebble-tls.pem"
        self.procs: list[subprocess.Popen] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _tls_cert(self) -> None:
        key = self.workdir / "pebble-tls.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=pebble test server",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(key), "-out", str(self.ca_bundle)],
            check=True, capture_output=True)
        os.chmod(self.ca_bundle, 0o644)

    def start(self) -> Pebble:
        pebble = need("pebble", "pebble")
        challtestsrv = need("pebble-challtestsrv", "pebble")
        self._tls_cert()
        config = self.workdir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.ca_bundle),
            "privateKey": str(self.workdir / "pebble-tls.key"),
            "httpPort": self.http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}))
        dns_log = open(self.workdir / "challtestsrv.log", "wb")
        self.procs.append(subprocess.Popen(
            [challtestsrv, "-dns01", f"127.0.0.1:{self.dns_port}",
             "-management", f"127.0.0.1:{self.dns_management_port}",
             "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=dns_log, stderr=subprocess.STDOUT))
        log = open(self.workdir / "pebble.log", "wb")
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}
        self.procs.append(subprocess.Popen(
            [pebble, "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 20
        while True:
            try:
                self.get(self.directory_url)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"pebble did not start: {self.log()[-2000:]}")
                time.sleep(0.2)

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(url, context=context, timeout=5) as resp:
            return resp.read()

    def issuer_pem(self) -> str:
        """The intermediate CA pebble signs with (changes every start)."""
        return self.get(f"https://127.0.0.1:{self.management_port}/intermediates/0").decode()

    def log(self) -> str:
        path = self.workdir / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def served_certificate(port: int, server_name: str) -> dict:
    """The leaf certificate nginx presents for ``server_name`` on 127.0.0.1:port."""
    import socket

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    pem = ssl.DER_cert_to_PEM_cert(der)
    proc = subprocess.run(["openssl", "x509", "-noout", "-serial", "-issuer", "-subject",
                           "-enddate", "-nameopt", "RFC2253"],
                          input=pem, capture_output=True, text=True, check=True)
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return {"serial": fields["serial"].lower(), "issuer": fields["issuer"],
            "subject": fields["subject"], "not_after": fields["notAfter"], "pem": pem}


# --- running the real CLIs against a StackRig ------------------------------------------


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def task_env(rig, **changes) -> dict:
    """Environment for ``fab``/``inv`` subprocesses: the rig's settings as MAICIVY_CONFIG."""
    import yaml

    data = _merge(rig.overrides, changes)
    data["known_hosts"] = [*data.get("known_hosts", []), str(rig.ssh_host.known_hosts)]
    path = rig.tmp / f"maicivy-{abs(hash(json.dumps(data, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
    try:
        from stack_rig import rig_env

        # (its MAICIVY_RIG_* names would be read as maicivy settings)
        env.update({k: v for k, v in rig_env().items() if not k.startswith("MAICIVY_")})
    except ImportError:
        pass
    env["MAICIVY_CONFIG"] = str(path)
    return env


def fab(rig, *args: str, env: dict | None = None, timeout: float = 600):
    """Run a task with the real ``fab`` CLI over SSH (as from a laptop)."""
    return subprocess.run([*rig.ssh_host.fab_argv(), *args], env=env or task_env(rig),
                          capture_output=True, text=True, timeout=timeout)


def inv(rig, *args: str, env: dict | None = None, timeout: float = 600):
    """Run a task with the real ``inv`` CLI on this machine (as on the server)."""
    from conftest import ROOT

    return subprocess.run(["inv", "-r", str(ROOT), *args], env=env or task_env(rig),
                          capture_output=True, text=True, timeout=timeout, cwd="/")
