"""What the health gate proves: every service healthy, the health URLs answer
through nginx, and every service runs the files it should.

"reloading" must mean the new configuration serves. After a deploy or a
rollback the gate reads back, from inside each container that mounts managed
files, the bytes it sees (sha256) and what it loaded (``proof.sh``): nginx
answers the config id embedded in the nginx.conf it runs
(render.embedded_config_id); Prometheus' last successful reload must postdate
its files. A service that reloads its configuration must be provable here.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml

from ..config import SERVICES, Settings
from ..host import sha256
from ..render import COMPOSE_FILE, NGINX_CONF, NGINX_STATUS_PORT, embedded_config_id
from ..shell import script, sections
from .release import parse_containers

PROOF = script(__file__, "proof.sh")
NGINX_CONFIG_ID_PATH = "/config-id"


def gate_failures(text: str, services: Iterable[str] = SERVICES) -> list[str]:
    """What is wrong according to :func:`gate_script`'s output ([] = healthy)."""
    sec = sections(text)
    containers = parse_containers(sec.get("containers", []))
    problems = []
    for service in services:
        mine = [c for c in containers if c.service == service]
        if not mine:
            problems.append(f"{service}: no container")
            continue
        bad = [c for c in mine if not c.running or c.health not in ("healthy", "")]
        for c in bad:
            problems.append(f"{service}: {c.health or c.state}")
    for line in sec.get("http", []):
        path, _, code = line.strip().rpartition(" ")
        if not path:
            path, code = code, "000"
        if not code.startswith("2"):
            problems.append(f"GET {path} through nginx: HTTP {code or '000'}")
    return problems



def mounted_files(compose_text: str, managed_rel: Iterable[str],
                  root: str = "") -> dict[str, dict[str, str]]:
    """{service: {managed file (relative to the root): its path inside the container}}.

    Read from the compose file's bind mounts (relative sources are relative to
    its directory, ``docker/``); a file is seen through a directory mount or a
    single-file one alike.
    """
    data = yaml.safe_load(compose_text) or {}
    root = root.rstrip("/")
    managed = sorted(managed_rel)
    out: dict[str, dict[str, str]] = {}
    for service, svc in (data.get("services") or {}).items():
        for entry in (svc or {}).get("volumes") or []:
            if isinstance(entry, dict):
                if entry.get("type", "bind") != "bind":
                    continue
                source, target = str(entry.get("source", "")), str(entry.get("target", ""))
            else:
                parts = str(entry).split(":")
                if len(parts) < 2:
                    continue
                source, target = parts[0], parts[1]
            if source.startswith("."):
                source = posixpath.normpath(posixpath.join("docker", source))
            elif root and source.startswith(root + "/"):
                source = source[len(root) + 1:]
            else:
                continue
            for rel in managed:
                if rel == source:
                    out.setdefault(service, {})[rel] = target
                elif rel.startswith(source + "/"):
                    out.setdefault(service, {})[rel] = target.rstrip("/") + rel[len(source):]
    return out



@dataclass
class Proof:
    """What the running services must show: the files they see and what they loaded."""

    mounts: dict[str, dict[str, str]]  # service -> {rel: container path}
    expected: dict[str, str] | None = None  # rel -> sha256; None: the files on the host
    nginx_config_id: str | None = None  # None: the nginx.conf has no id (older release)



def deployed_proof(settings: Settings, files) -> Proof:
    """What the services must run after deploying ``files`` (absolute path -> bytes)."""
    root = settings.root
    by_rel = {p[len(root) + 1:]: data for p, data in files.items()}
    return Proof(mounts=mounted_files(by_rel[COMPOSE_FILE].decode(), by_rel, root),
                 expected={rel: sha256(data) for rel, data in by_rel.items()},
                 nginx_config_id=embedded_config_id(by_rel.get(NGINX_CONF, b"")))


def proof_command(settings: Settings, proof: Proof) -> str:
    """``proof.sh``: per service the files' digests inside its container
    (``== seen.SERVICE``), the host's (``== host``), nginx's served config id and
    Prometheus' reload state."""
    rels = sorted({rel for files in proof.mounts.values() for rel in files})
    nginx = (f"http://127.0.0.1:{NGINX_STATUS_PORT}{NGINX_CONFIG_ID_PATH}"
             if proof.nginx_config_id else "")
    prometheus = f"http://127.0.0.1:{settings.ports.prometheus}/metrics"
    mounts = ["\n".join([service, *files.values()])
              for service, files in sorted(proof.mounts.items())]
    return PROOF.command(settings.root, settings.compose_project, nginx, prometheus,
                         "\n".join(rels), *mounts)


def proof_failures(text: str, proof: Proof) -> list[str]:
    """What differs between the running services and the files they should run."""
    sec = sections(text)
    host = {}
    for line in sec.get("host", []):
        digest, _, rel = line.partition("  ")
        if rel:
            host[rel] = digest
    expected = proof.expected if proof.expected is not None else host
    problems = []
    for service, files in sorted(proof.mounts.items()):
        if f"seen.{service}" not in sec:
            continue  # no running container: the health gate says so
        seen = {}
        for line in sec.get(f"seen.{service}", []):
            digest, _, path = line.partition("  ")
            if path:
                seen[path] = digest
        for rel, path in sorted(files.items()):
            want = expected.get(rel)
            if want is None:
                continue
            if path not in seen:
                problems.append(f"{service}: cannot read {path} inside its container")
            elif seen[path] != want:
                problems.append(f"{service}: {path} inside its container is not the "
                                f"{rel} deployed (the container does not see the new file)")
        if service == "nginx" and proof.nginx_config_id:
            served = " ".join(sec.get("nginx-config-id", [])).strip() or "nothing"
            if served != proof.nginx_config_id:
                problems.append(f"nginx: serves configuration {served[:40]}, not the deployed "
                                f"{proof.nginx_config_id} (the reload did not take effect)")
        if service == "prometheus":
            problems += _prometheus_problems(sec, files)
    return problems


def _prometheus_problems(sec: dict[str, list[str]], files: Mapping[str, str]) -> list[str]:
    metrics = {}
    for line in sec.get("prometheus-reload", []):
        name, _, value = line.partition(" ")
        try:
            metrics[name] = float(value)
        except ValueError:
            pass
    ok = metrics.get("prometheus_config_last_reload_successful")
    when = metrics.get("prometheus_config_last_reload_success_timestamp_seconds")
    if ok is None or when is None:
        return ["prometheus: cannot read its reload state (/metrics)"]
    if ok != 1:
        return ["prometheus: its last configuration reload failed (see its log)"]
    wanted = set(files.values())
    changed = [int(parts[0]) for line in sec.get("prometheus-ctime", [])
               if len(parts := line.split(" ", 1)) == 2 and parts[0].isdigit()
               and parts[1] in wanted]
    if changed and when < max(changed):
        return ["prometheus: runs a configuration loaded before its files last changed "
                "(not reloaded)"]
    return []
