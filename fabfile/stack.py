"""The stack on the server: where its files live and how compose is called.

Pure builders (no I/O) plus a few steps every namespace shares. Layout under
``settings.root`` (default /opt/maicivy)::

    .env                          secrets (mode 600), read by compose --env-file
    docker/docker-compose.prod.yml
    docker/nginx/nginx.conf, ffdhe2048.pem, certs/<domain>/{fullchain,privkey}.pem
    monitoring/prometheus/..., monitoring/grafana/...
    systemd/maicivy.service       installed into /etc/systemd/system by provision
"""

from __future__ import annotations

import re
import secrets
import shlex

from .config import Settings
from .host import Host
from .render import render_tree
from .shell import script

# Secrets that provision generates when they are missing from .env.
GENERATED_SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD")
PLACEHOLDER = "CHANGE_ME"
_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def compose_argv(settings: Settings) -> list[str]:
    """``docker compose`` with this stack's project name, env file and compose file."""
    return [
        "docker", "compose",
        "--project-name", settings.compose_project,
        "--env-file", settings.env_file,
        "-f", settings.compose_file,
    ]


def compose(settings: Settings, *args: str) -> str:
    """A quoted ``docker compose ...`` command line for this stack."""
    return " ".join(shlex.quote(a) for a in (*compose_argv(settings), *args))


def remote_files(settings: Settings) -> dict[str, bytes]:
    """The rendered tree keyed by absolute path on the server."""
    root = settings.root
    return {f"{root}/{rel}": data for rel, data in render_tree(settings).items()}


def cert_dir(settings: Settings, domain: str) -> str:
    """Where nginx reads a domain's certificate (mounted at /etc/nginx/certs)."""
    return f"{settings.root}/docker/nginx/certs/{domain}"


def tls_domains(settings: Settings) -> list[str]:
    """Every name that needs a certificate: site (+ api) and Grafana."""
    names = [settings.domain]
    if settings.api_domain:
        names.append(settings.api_domain)
    return [*names, settings.grafana_domain]


# --- .env ----------------------------------------------------------------------


def parse_env(text: str) -> dict[str, str]:
    """Parse a compose .env file (KEY=VALUE lines; comments and blanks ignored)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _ENV_LINE.match(line.strip())
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[m.group(1)] = value
    return values


def fill_env(
    example: str, current: str | None, token=secrets.token_urlsafe
) -> tuple[str, list[str]]:
    """The .env to write: ``current`` kept as is, plus what the example adds.

    Values already set are never changed. A generated secret that is missing or
    still ``CHANGE_ME`` gets a strong random value. Returns (text, names added
    or generated) -- names only, never values.
    """
    have = parse_env(current or "")
    lines = (current or "").splitlines()
    changed: list[str] = []
    for i, line in enumerate(lines):
        m = _ENV_LINE.match(line.strip())
        if m and m.group(1) in GENERATED_SECRETS and m.group(2) in ("", PLACEHOLDER):
            lines[i] = f"{m.group(1)}={token(32)}"
            changed.append(m.group(1))
    missing = []
    for name, value in parse_env(example).items():
        if name in have:
            continue
        if name in GENERATED_SECRETS:
            value = token(32)
        missing.append(f"{name}={value}")
        changed.append(name)
    if missing:
        if lines and lines[-1].strip():
            lines.append("")
        lines.append("# added by maicivy-ops from .env.production.example")
        lines.extend(missing)
    return "\n".join(lines) + "\n", changed


def unset_secrets(env: dict[str, str]) -> list[str]:
    """Names in a .env whose value is still the CHANGE_ME placeholder."""
    return sorted(k for k, v in env.items() if v == PLACEHOLDER)


def read_env(host: Host, settings: Settings) -> dict[str, str]:
    """The server's .env (empty if there is none). Values stay in memory only."""
    r = host.check(f"test -f {shlex.quote(settings.env_file)}")
    if not r.ok:
        return {}
    return parse_env(host.read_file(settings.env_file, sudo=True).decode())


# --- certificates ---------------------------------------------------------------


SELF_SIGNED = script(__file__, "scripts/stack-self-signed.sh")


def ensure_certificates(host: Host, settings: Settings) -> list[str]:
    """Make sure every TLS name has some certificate so nginx can start.

    One command for all names; returns the names that got a self-signed
    stand-in (ssl.obtain replaces them with real ones).
    """
    names = tls_domains(settings)
    r = host.run(SELF_SIGNED.command(30, cert_dir(settings, "").rstrip("/"), *names), sudo=True)
    made = {line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("created ")}
    return [d for d in names if d in made]
