"""Render every production file of the stack, and validate a rendered tree.

``render_tree(settings)`` is pure: it returns ``{relative_path: bytes}`` for
every file under ``templates/`` (rendered with Jinja2, StrictUndefined) and
``files/`` (copied as they are). Paths are relative to the stack root on the
server (``settings.root``).

``validate_tree(dir, settings)`` runs whichever real validators are installed
(nginx, gixy, promtool, docker compose, systemd-analyze) and reports each as
passed, failed (with its output) or skipped (with the reason).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .config import PROJECT_ROOT, Settings
from .errors import OpsError
from .shell import script

TEMPLATES_DIR = PROJECT_ROOT / "templates"
FILES_DIR = PROJECT_ROOT / "files"

# Files that hold no secret but must not be world-readable on the server.
MODES = {".env.production.example": 0o644,
         "monitoring/alertmanager/entrypoint.sh": 0o755}

COMPOSE_FILE = "docker/docker-compose.prod.yml"
NGINX_DIR = "docker/nginx"
NGINX_CONF = f"{NGINX_DIR}/nginx.conf"
PROMETHEUS_CONF = "monitoring/prometheus/prometheus.yml"
ALERTS = "monitoring/prometheus/alerts.yml"
UNIT = "systemd/maicivy.service"
ENV_EXAMPLE = ".env.production.example"
DASHBOARD = "monitoring/grafana/dashboards/maicivy_overview.json"
ALERTMANAGER_CONF = "monitoring/alertmanager/alertmanager.yml"

# A template that writes {{ config_id }} gets, in its place, a digest of its own
# rendered text (computed with this placeholder in it): what a running service
# reports back so that deploy can prove it loaded this very file.
CONFIG_ID_PLACEHOLDER = "@@MAICIVY_CONFIG_ID@@"


# nginx answers its config id on this port of the container's own loopback.
NGINX_STATUS_PORT = 8099


def config_id(text: str) -> str:
    """The digest that stands for ``text`` (rendered with the placeholder)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def embedded_config_id(data: bytes) -> str | None:
    """The config id a rendered file carries (None if its template has none).

    Checked, not trusted: the file with its id put back to the placeholder
    must hash to that id, so a hand-edited file has none.
    """
    text = data.decode(errors="replace")
    for m in re.finditer(r"[0-9a-f]{16}", text):
        candidate = m.group(0)
        if config_id(text.replace(candidate, CONFIG_ID_PLACEHOLDER)) == candidate:
            return candidate
    return None


def _environment() -> jinja2.Environment:
    if not TEMPLATES_DIR.is_dir():
        raise OpsError(f"templates not found at {TEMPLATES_DIR}; reinstall maicivy-ops")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env


def _walk(top: Path) -> list[str]:
    return sorted(
        str(p.relative_to(top))
        for p in top.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def render_tree(settings: Settings) -> dict[str, bytes]:
    """Every file of the stack for these settings: ``{relative path: content}``."""
    env = _environment()
    context = dict(settings)
    context["image"] = settings.image
    context["config_id"] = CONFIG_ID_PLACEHOLDER
    context["nginx_status_port"] = NGINX_STATUS_PORT
    out: dict[str, bytes] = {}
    for rel in _walk(TEMPLATES_DIR):
        try:
            text = env.get_template(rel).render(context)
        except jinja2.UndefinedError as exc:
            raise OpsError(f"template {rel}: {exc.message}; this is a bug in maicivy-ops") from exc
        if CONFIG_ID_PLACEHOLDER in text:
            text = text.replace(CONFIG_ID_PLACEHOLDER, config_id(text))
        out[rel] = text.encode()
    for rel in _walk(FILES_DIR):
        if rel in out:
            raise OpsError(f"{rel} exists both in templates/ and files/; keep one")
        out[rel] = (FILES_DIR / rel).read_bytes()
    return out


def write_tree(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write a rendered tree to a local directory; returns the paths written."""
    written = []
    for rel, data in sorted(files.items()):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(MODES.get(rel, 0o644))
        written.append(path)
    return written


MARKER = ".maicivy-render"


def _ours(out_dir: Path, files: dict[str, bytes]) -> bool:
    """True if ``out_dir`` is empty, or a tree this task wrote (safe to replace)."""
    if (out_dir / MARKER).is_file():
        return True
    present = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if not p.is_dir()}
    return present <= set(files)


def publish_tree(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write the tree into a new directory next to ``out_dir``, then rename it into place.

    Either the whole new tree is there, or (on any error) ``out_dir`` is as it
    was: never a mix of old and new files. An existing ``out_dir`` is replaced
    only if it is a previous render (or empty).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OpsError(f"{out_dir} exists and is not a directory; choose another --out")
    if out_dir.is_dir() and not _ours(out_dir, files):
        raise OpsError(f"{out_dir} already holds files that render did not write; "
                       "choose a new or empty directory for --out")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    except OSError as exc:
        raise OpsError(f"cannot write into {parent}: {exc.strerror or exc}; choose another "
                       "--out") from None
    old = tmp.with_name(tmp.name + ".old")
    try:
        write_tree(files, tmp)
        (tmp / MARKER).write_text("written by `inv render`; replaced whole on the next run\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if out_dir.is_dir():
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except OSError:
                old.rename(out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        what = exc.filename or tmp
        raise OpsError(f"cannot write the rendered tree ({what}: {exc.strerror or exc}); "
                       f"{out_dir} is unchanged") from None
    return [out_dir / rel for rel in sorted(files)]


# --- validators ---------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "passed", "failed", "skipped"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def _result(name: str, proc: subprocess.CompletedProcess) -> Check:
    output = (proc.stdout + proc.stderr).strip()
    return Check(name, "passed" if proc.returncode == 0 else "failed", output)


def _self_signed(cert_dir: Path, names: list[str]) -> None:
    for name in names:
        d = cert_dir / name
        d.mkdir(parents=True, exist_ok=True)
        proc = _run([
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", str(d / "privkey.pem"), "-out", str(d / "fullchain.pem"),
        ])
        if proc.returncode:
            raise OpsError(f"openssl could not make a test certificate: {proc.stderr.strip()}")


NGINX_SANDBOX = script(__file__, "scripts/render-nginx-sandbox.sh")


def _version(text: str) -> list[int]:
    import re

    m = re.search(r"([0-9]+(?:\.[0-9]+)+)", text)
    return [int(x) for x in m.group(1).split(".")] if m else []


def local_nginx_versions(nginx: str) -> tuple[str, str]:
    """(nginx version, OpenSSL version) of the nginx on this machine."""
    proc = _run([nginx, "-V"])
    out = proc.stdout + proc.stderr
    nv = ".".join(map(str, _version(out.split("nginx version:", 1)[-1].splitlines()[0])))
    ossl = out.split("built with OpenSSL", 1)
    ov = ".".join(map(str, _version(ossl[1].splitlines()[0]))) if len(ossl) > 1 else ""
    return nv, ov


def for_older_nginx(conf: str, nginx_version: str, openssl_version: str) -> str:
    """The rendered nginx.conf as an older nginx/OpenSSL accepts it (for a local nginx -t).

    Only the version-dependent directives change (``http2 on;`` -> ``listen ... http2``
    before nginx 1.25.1, no X25519MLKEM768 before OpenSSL 3.5); every other byte
    is the rendered file's.
    """
    import re

    if _version(nginx_version) < [1, 25, 1] and "http2 on;" in conf:
        conf = re.sub(r"(?m)^(\s*listen\s+\S*443 ssl)(( default_server)?;)$", r"\1 http2\2", conf)
        conf = re.sub(r"(?m)^\s*http2 on;\n", "", conf)
    if openssl_version and _version(openssl_version) < [3, 5]:
        conf = conf.replace("X25519MLKEM768:", "")
    return conf


def check_nginx(tree: Path, settings: Settings) -> Check:
    """``nginx -t`` on the rendered file, byte for byte, in a private mount namespace.

    The config names container paths (/etc/nginx/certs/..., upstream host
    names backend/frontend/grafana): we bind a sandbox over /etc/nginx (the
    rendered nginx.conf, mime.types, ffdhe2048.pem, throw-away certificates) and
    over /etc/hosts, in a mount namespace of our own, so the host is untouched.
    The stack mounts the whole rendered ``docker/nginx`` directory at
    /etc/nginx (mime.types included), and so does the sandbox.
    """
    nginx, unshare = shutil.which("nginx") or _sbin("nginx"), shutil.which("unshare")
    if not nginx:
        return Check("nginx -t", "skipped", "nginx is not installed")
    if not unshare:
        return Check("nginx -t", "skipped", "unshare (util-linux) is not installed")
    with tempfile.TemporaryDirectory(prefix="maicivy-nginx-") as sandbox:
        # What the container sees at /etc/nginx: the rendered directory.
        etc = Path(sandbox) / "etc-nginx"
        shutil.copytree(tree / NGINX_DIR, etc)
        # An older nginx here than in the image (Debian 12 has 1.22, the image
        # 1.27): only the version-dependent directives are adapted.
        local, local_ssl = local_nginx_versions(nginx)
        note = ""
        if local and _version(local) < _version(str(settings.nginx.version)):
            text = (tree / NGINX_CONF).read_text()
            (etc / "nginx.conf").write_text(for_older_nginx(text, local, local_ssl))
            note = (f"(checked with the local nginx {local}: its HTTP/2 and curve "
                    f"directives as for that version; the image runs {settings.nginx.version})\n")
        names = [settings.domain, settings.grafana_domain]
        _self_signed(etc / "certs", names)
        (Path(sandbox) / "hosts").write_text(
            "127.0.0.1 localhost backend frontend grafana\n"
        )
        os.chmod(sandbox, 0o755)
        flags = ["--mount"] if os.geteuid() == 0 else ["--mount", "--map-root-user"]
        proc = _run(
            [unshare, *flags, *NGINX_SANDBOX.argv()],
            env={**os.environ, "SANDBOX": sandbox, "PATH": os.environ.get("PATH", "")
                 + ":/usr/sbin:/sbin"},
        )
        if proc.returncode and "mount" in proc.stderr and "nginx:" not in proc.stderr:
            return Check("nginx -t", "skipped", f"cannot make a mount namespace: "
                         f"{proc.stderr.strip()}")
        result = _result("nginx -t", proc)
        result.detail = note + result.detail
        return result


def _sbin(name: str) -> str | None:
    for d in ("/usr/sbin", "/sbin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return None


def tool(name: str) -> str | None:
    """Where a validator is: on PATH, or next to the running Python (its venv)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) and beside.is_file() else None


def check_gixy(tree: Path) -> Check:
    gixy = tool("gixy")
    if not gixy:
        return Check("gixy", "skipped", "gixy (pip install gixy-ng) is not installed")
    return _result("gixy", _run([gixy, str(tree / NGINX_CONF)]))


def check_promtool(tree: Path) -> list[Check]:
    promtool = shutil.which("promtool")
    if not promtool:
        reason = "promtool (Debian package prometheus) is not installed"
        return [Check("promtool check config", "skipped", reason),
                Check("promtool check rules", "skipped", reason)]
    return [
        _result("promtool check config",
                _run([promtool, "check", "config", str(tree / PROMETHEUS_CONF)])),
        _result("promtool check rules", _run([promtool, "check", "rules", str(tree / ALERTS)])),
    ]


def check_amtool(tree: Path) -> Check:
    amtool = shutil.which("amtool")
    if not amtool:
        return Check("amtool check-config", "skipped",
                     "amtool (Debian package prometheus-alertmanager) is not installed")
    return _result("amtool check-config",
                   _run([amtool, "check-config", str(tree / ALERTMANAGER_CONF)]))


def check_compose(tree: Path) -> Check:
    docker = shutil.which("docker")
    if not docker or _run([docker, "compose", "version"]).returncode:
        return Check("docker compose config", "skipped", "docker compose v2 is not installed")
    proc = _run([docker, "compose", "--env-file", str(tree / ENV_EXAMPLE),
                 "-f", str(tree / COMPOSE_FILE), "config", "--quiet"])
    return _result("docker compose config", proc)


# What systemd-analyze says about the machine rather than about the unit file:
# Docker is not installed where render runs (a laptop, a CI runner).
_MACHINE_FACTS = (
    re.compile(r"Unit (docker\.service|docker\.socket) not found"),
    re.compile(r"Command /usr/bin/docker is not executable"),
)


def unit_findings(output: str, unit: str = "maicivy.service") -> tuple[list[str], list[str]]:
    """systemd-analyze verify's lines about our unit: (errors in the file, machine facts).

    Machine facts are given as the matching phrase, once each.
    """
    errors, facts = [], []
    for line in output.splitlines():
        if unit not in line:
            continue  # about other units installed on this machine
        fact = next((m.group(0) for p in _MACHINE_FACTS if (m := p.search(line))), None)
        if fact:
            if fact not in facts:
                facts.append(fact)
        else:
            errors.append(line)
    return errors, facts


def check_unit(tree: Path) -> Check:
    analyze = tool("systemd-analyze")
    if not analyze:
        return Check("systemd-analyze verify", "skipped", "systemd-analyze is not installed")
    proc = _run([analyze, "verify", str(tree / UNIT)])
    errors, facts = unit_findings(proc.stdout + proc.stderr)
    if errors:
        return Check("systemd-analyze verify", "failed", "\n".join(errors))
    if facts:
        return Check("systemd-analyze verify", "skipped",
                     "Docker is not installed on this machine, so the unit's dependencies "
                     "cannot be checked here (" + "; ".join(facts) + "); no error in the file")
    if proc.returncode:
        return Check("systemd-analyze verify", "failed", (proc.stdout + proc.stderr).strip())
    return Check("systemd-analyze verify", "passed")


def validate_tree(tree: Path, settings: Settings) -> list[Check]:
    """Run every available validator on a rendered tree."""
    return [
        check_nginx(tree, settings),
        check_gixy(tree),
        *check_promtool(tree),
        check_amtool(tree),
        check_compose(tree),
        check_unit(tree),
    ]


# --- the task -----------------------------------------------------------------

from .core import ops_task, settings_for  # noqa: E402


@ops_task(help={
    "out": "directory to write the rendered tree into (default: build/)",
    "validate": "run the installed validators on what was written (default: yes)",
})
def render(c, out="build", validate=True):
    """Render every production file for the current settings and validate them.

    Writes the whole tree (nginx.conf, docker-compose.prod.yml, Prometheus and
    Grafana provisioning, the systemd unit, .env.production.example) under
    OUT, laid out as under the stack root on the server, then checks it with
    nginx -t, gixy, promtool, docker compose config and systemd-analyze
    verify -- each one that is installed; the others are listed as skipped.
    Exits 1 if a validator rejects a file. Needs no server. The tree is
    written into a new directory next to OUT and renamed into place: OUT is
    replaced whole (only if it holds a previous render, or nothing) and never
    left half-written.
    """
    settings = settings_for(c)
    out_dir = Path(out).expanduser().resolve()
    files = render_tree(settings)
    for path in publish_tree(files, out_dir):
        print(f"wrote {path}")
    if not validate:
        return
    checks = validate_tree(out_dir, settings)
    for check in checks:
        line = f"{check.status:>7}  {check.name}"
        if check.status == "skipped":
            line += f" ({check.detail})"
        print(line)
        if check.status == "failed":
            for detail in check.detail.splitlines()[-20:]:
                print(f"         {detail}")
    failed = [ch.name for ch in checks if ch.status == "failed"]
    if failed:
        raise OpsError(f"validation failed: {', '.join(failed)} (see above)")
