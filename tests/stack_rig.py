"""Bring a real maicivy stack up on the rig, through SSH, for rig-tier tests.

``rig_settings(tmp, name)`` gives settings overrides for one isolated stack:
its own compose project, root directory, published ports on 127.0.0.1, test
images from the local registry and short health check intervals.
``StackRig`` uploads the rendered tree, writes a .env with throw-away
secrets, makes self-signed certificates and runs ``compose up -d --wait``.
Several stacks can run at once (distinct projects and ports).
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path

from conftest import free_port

from fabfile.config import load_settings
from fabfile.host import Host, upload_if_changed
from fabfile.stack import compose, ensure_certificates, fill_env, remote_files


def test_images() -> dict[str, str]:
    from rig.images import TEST_IMAGES

    return dict(TEST_IMAGES)


def rig_env() -> dict[str, str]:
    from rig.images import rig_env as _rig_env

    return _rig_env()


def rig_settings(tmp: Path, name: str, **extra) -> dict:
    """Settings overrides for one isolated test stack under ``tmp``."""
    root = tmp / "srv"
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    overrides = {
        "domain": "maicivy.test",
        "grafana_domain": "grafana.maicivy.test",
        "root": str(root),
        "compose_project": name,
        "registry": "",
        "images": test_images(),
        "publish": {"bind": "127.0.0.1", "http": free_port(), "https": free_port()},
        "healthcheck": {"interval": "1s", "timeout": "3s", "retries": 30, "start_period": "2s"},
        "backup": {"dir": str(tmp / "backups"), "textfile_dir": str(tmp / "textfile")},
        "tls": {"webroot": str(tmp / "webroot")},
        "rate_limit": {"per_minute": 6000, "burst": 200},
        # The rig's nginx stand-in is Debian 12's (nginx 1.22, OpenSSL 3.0).
        "nginx": {"version": "1.22", "openssl_version": "3.0"},
        # The rig machine's / is a private mount: no rslave propagation.
        "node_exporter": {"rootfs_propagation": ""},
    }
    overrides["publish"]["bind6"] = "::1"
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    return overrides


TEST_ENV = {
    "POSTGRES_USER": "maicivy",
    "POSTGRES_DB": "maicivy",
    "CLAUDE_API_KEY": "test-claude-key",
    "OPENAI_API_KEY": "test-openai-key",
}


class StackRig:
    """One stack on the rig, driven through a real SSH connection."""

    def __init__(self, ssh_host, tmp: Path, name: str, **extra):
        self.ssh_host = ssh_host
        self.tmp = tmp
        self.overrides = rig_settings(tmp, name, **extra)
        self.settings = load_settings(invoke_section=self.overrides, environ={}, files=[])
        self.conn = ssh_host.connection(self.overrides)
        self.host = Host(self.conn)

    def compose(self, *args: str) -> str:
        return compose(self.settings, *args)

    def run(self, command: str, **kw):
        return self.host.run(command, **kw)

    def write_env(self) -> None:
        """A .env with throw-away secrets (generated like provision does)."""
        files = remote_files(self.settings)
        example = files[f"{self.settings.root}/.env.production.example"].decode()
        seeded = "".join(f"{k}={v}\n" for k, v in TEST_ENV.items())
        text, _ = fill_env(example, seeded, token=lambda n: secrets.token_hex(16))
        self.host.write_file(self.settings.env_file, text, mode=0o600)

    def prepare(self) -> None:
        s = self.settings
        for d in (s.backup.dir, s.backup.textfile_dir, s.tls.webroot):
            self.run(f"mkdir -p {shlex.quote(d)}")
        upload_if_changed(self.host, remote_files(s))
        self.write_env()
        ensure_certificates(self.host, s)

    def up(self, timeout: int = 240) -> None:
        self.prepare()
        self.run(self.compose("up", "-d", "--wait", "--wait-timeout", str(timeout)),
                 timeout=timeout + 60)

    def start(self, *services: str, timeout: int = 120) -> None:
        """Start stopped ``services`` again and wait until they are healthy (a test
        that stops or pauses a service gives the next test a whole stack)."""
        self.run(self.compose("up", "-d", "--wait", "--wait-timeout", str(timeout), *services),
                 timeout=timeout + 60)

    def down(self) -> None:
        self.host.run(self.compose("down", "-v", "--remove-orphans", "-t", "5"), warn=True,
                      timeout=180)
        self.conn.close()

    def service_health(self) -> dict[str, str]:
        """{service: health or state} from ``compose ps``."""
        import json

        out = self.run(self.compose("ps", "--all", "--format", "json")).stdout
        rows = []
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            data = json.loads(line)
            rows.extend(data if isinstance(data, list) else [data])
        return {r["Service"]: (r.get("Health") or r.get("State")) for r in rows}
