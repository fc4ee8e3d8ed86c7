"""One configuration model for the maicivy stack.

Layers, lowest to highest precedence:

1. ``DEFAULTS`` below (production defaults);
2. the ``maicivy:`` section of invoke's/fabric's own config (``invoke.yaml``,
   ``fabric.yaml``, ``-f FILE``, ``INVOKE_MAICIVY_*`` / ``FABRIC_MAICIVY_*``);
3. ``/etc/maicivy/maicivy.yaml``;
4. ``maicivy.yaml`` next to ``tasks.py`` (the project root);
5. the file named by ``$MAICIVY_CONFIG``;
6. ``MAICIVY_<KEY>`` environment variables, ``__`` between nested keys
   (``MAICIVY_IMAGES__BACKEND=...``), values parsed as YAML scalars.

Layers 3-6 are read identically by ``inv`` and ``fab``: that is the one way we
document. Everything is validated before any task touches a server; a bad
value raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "MAICIVY_"

SERVICES = (
    "postgres",
    "redis",
    "backend",
    "frontend",
    "nginx",
    "prometheus",
    "grafana",
    "node-exporter",
)

APP_IMAGES = ("backend", "frontend")

DEFAULTS: dict[str, Any] = {
    # Public names. ``api_domain`` is optional: empty means the API is served
    # under the site domain (``/api/``, ``/ws/``).
    "domain": "maicivy.example.com",
    "api_domain": "",
    "grafana_domain": "grafana.maicivy.example.com",
    # Where the stack lives on the server and how compose names it.
    "root": "/opt/maicivy",
    "compose_project": "maicivy",
    # Registry of the application images (backend, frontend), prefixed to
    # their references when not empty (e.g. ``ghcr.io/acme``). Third-party
    # images are full references: point them at a mirror if you have one.
    "registry": "",
    "images": {
        "postgres": "postgres:15-alpine",
        "redis": "redis:7-alpine",
        "backend": "maicivy/backend:latest",
        "frontend": "maicivy/frontend:latest",
        "nginx": "nginx:1.27-alpine",
        "prometheus": "prom/prometheus:v2.53.0",
        "grafana": "grafana/grafana:11.1.0",
        "node_exporter": "prom/node-exporter:v1.8.1",
    },
    # Ports inside the containers, and what nginx publishes on the host.
    "ports": {
        "backend": 8080,
        "frontend": 3000,
        "grafana": 3000,
        "prometheus": 9090,
        "node_exporter": 9100,
        "postgres": 5432,
        "redis": 6379,
    },
    "publish": {
        "bind": "0.0.0.0",
        "http": 80,
        "https": 443,
    },
    "rate_limit": {"per_minute": 100, "burst": 20},
    "nginx": {
        # Content-Security-Policy for the site; empty means the built-in policy
        # (self, inline styles/scripts for Next.js, wss:// to the site).
        "csp": "",
        "hsts_max_age": 63072000,
        "client_max_body_size": "10m",
    },
    # Docker health checks of every service (tests shorten the interval).
    "healthcheck": {"interval": "10s", "timeout": "5s", "retries": 5, "start_period": "30s"},
    "tls": {
        # Where certbot keeps its live certificates on the server.
        "letsencrypt_dir": "/etc/letsencrypt",
        # ACME webroot shared by certbot and the nginx container.
        "webroot": "/var/www/certbot",
        "acme_server": "https://acme-v02.api.letsencrypt.org/directory",
        "staging": False,
        "email": "",
        # Extra CA bundle for a private ACME server (tests use pebble).
        "ca_bundle": "",
        "warn_days": 21,
        "critical_days": 7,
    },
    "backup": {
        "dir": "/var/backups/maicivy",
        "compression": "gzip",
        "retention_days": {"postgres": 30, "redis": 7},
        "min_keep": 3,
        "keep": {"last": 0, "daily": 0, "weekly": 0, "monthly": 0},
        "lock_wait_seconds": 10,
        "max_age_hours": 26,
        "min_size_bytes": 1024,
        # backup.check: the newest backup may not shrink more than this vs the previous.
        "max_shrink_percent": 50,
        "bgsave_timeout_seconds": 300,
        "textfile_dir": "/var/lib/node_exporter/textfile_collector",
        "s3": {"bucket": "", "prefix": "maicivy/", "endpoint": "", "region": "us-east-1"},
    },
    "alerts": {
        "disk_free_percent": 15,
        "memory_used_percent": 90,
        "cpu_used_percent": 85,
        "error_rate_percent": 5,
        "for": "5m",
        "backup_stale_hours": 26,
    },
    "prometheus": {"scrape_interval": "15s", "retention": "15d"},
    "grafana": {"anonymous_viewer": True},
    "logging": {"max_size": "10m", "max_file": 5},
    "resources": {
        "postgres": {"cpus": 1.0, "memory": "1g"},
        "redis": {"cpus": 0.5, "memory": "512m"},
        "backend": {"cpus": 1.0, "memory": "512m"},
        "frontend": {"cpus": 1.0, "memory": "512m"},
        "nginx": {"cpus": 0.5, "memory": "256m"},
        "prometheus": {"cpus": 0.5, "memory": "512m"},
        "grafana": {"cpus": 0.5, "memory": "512m"},
        "node_exporter": {"cpus": 0.25, "memory": "128m"},
    },
    "redis": {"maxmemory": "256mb", "maxmemory_policy": "allkeys-lru"},
    "postgres": {"max_connections": 100},
    "health": {
        "timeout_seconds": 5,
        "disk_warn_percent": 80,
        "disk_critical_percent": 90,
        "backend_path": "/health",
        "backend_deep_path": "/health/deep",
        "frontend_path": "/",
    },
    # lock_wait_seconds: how long a deploy (or restore, provision...) waits for running
    # backups to finish before it gives up.
    "deploy": {"keep_releases": 3, "health_timeout_seconds": 120, "lock_wait_seconds": 600},
    # What `provision` sets up on a fresh server (fabfile/provision.py).
    "provision": {
        # Port sshd listens on: ufw rate-limits it and keeps it open.
        "ssh_port": 22,
        # Extra pip options for installing maicivy-ops on the server, e.g.
        # "--no-index --find-links /opt/wheels" where there is no package index.
        "pip_options": "",
        "log_dir": "/var/log/maicivy",
        # cron schedules (minute hour day-of-month month day-of-week).
        "cron": {
            "postgres_backup": "15 3 * * *",
            "redis_backup": "45 3 * * *",
            "ssl_renew": "30 4 * * *",
            "restore_drill": "0 5 * * 0",
        },
    },
    # Run privileged commands through ``sudo -n`` (when the SSH user is not root).
    "sudo": False,
    # known_hosts files used to verify server host keys (in addition to
    # ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts).
    "known_hosts": [],
}

_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*[a-z0-9]$", re.IGNORECASE)
_REGISTRY_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")
_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SIZE_RE = re.compile(r"^[0-9]+(b|k|kb|m|mb|g|gb)?$", re.IGNORECASE)


class Settings(dict):
    """A read-only nested mapping with attribute access (``s.images.backend``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:  # pragma: no cover
        raise AttributeError("Settings are read-only")

    @classmethod
    def wrap(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return cls({k: cls.wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [cls.wrap(v) for v in value]
        return value

    def image(self, service: str) -> str:
        """Full image reference for a service (registry prefixed to app images)."""
        key = service.replace("-", "_")
        ref = self["images"][key]
        registry = self["registry"].rstrip("/")
        return f"{registry}/{ref}" if registry and key in APP_IMAGES else ref

    @property
    def compose_file(self) -> str:
        return f"{self['root']}/docker/docker-compose.prod.yml"

    @property
    def env_file(self) -> str:
        return f"{self['root']}/.env"


def deep_merge(base: dict, override: Mapping, path: str = "maicivy") -> dict:
    """Merge ``override`` into a copy of ``base``; unknown keys are an error."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}.{key}"
        if key not in base:
            hint = _closest(key, base)
            raise ConfigError(
                f"{where} is not a known setting{hint}; remove it or fix its spelling"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where} must be a mapping of settings (got {value!r})")
            out[key] = deep_merge(base[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _closest(key: str, base: Mapping) -> str:
    import difflib

    match = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _env_overrides(environ: Mapping[str, str]) -> dict:
    """``MAICIVY_A__B=v`` -> ``{"a": {"b": v}}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "MAICIVY_CONFIG":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML; fix the file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must contain a mapping of settings")
    # A file may hold the settings at top level or under ``maicivy:``.
    if set(data) == {"maicivy"}:
        data = data["maicivy"] or {}
    return dict(data)


def config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The maicivy.yaml files that exist, lowest precedence first."""
    environ = os.environ if environ is None else environ
    candidates = [Path("/etc/maicivy/maicivy.yaml"), PROJECT_ROOT / "maicivy.yaml"]
    explicit = environ.get("MAICIVY_CONFIG")
    found = [p for p in candidates if p.is_file()]
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"MAICIVY_CONFIG={explicit} does not exist; point it at a YAML file")
        found.append(path)
    return found


def load_settings(
    invoke_section: Mapping | None = None,
    environ: Mapping[str, str] | None = None,
    files: list[Path] | None = None,
    overrides: Mapping | None = None,
) -> Settings:
    """Build and validate the settings from every layer (see module doc)."""
    environ = os.environ if environ is None else environ
    merged = copy.deepcopy(DEFAULTS)
    if invoke_section:
        merged = deep_merge(merged, _plain(invoke_section))
    for path in config_files(environ) if files is None else files:
        merged = deep_merge(merged, _read_yaml(Path(path)), f"{path}: maicivy")
    merged = deep_merge(merged, _env_overrides(environ), "environment MAICIVY")
    if overrides:
        merged = deep_merge(merged, overrides)
    validate(merged)
    return Settings.wrap(merged)


def _plain(section: Mapping) -> dict:
    """Invoke's DataProxy -> plain dict."""
    return {
        k: _plain(v) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in section.items()
    }


# --- validation ---------------------------------------------------------------


def _fail(key: str, expected: str, value: Any) -> None:
    raise ConfigError(f"maicivy.{key} must be {expected} (got {value!r})")


def _get(data: Mapping, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def _check(data: Mapping, key: str, ok, expected: str) -> None:
    value = _get(data, key)
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        _fail(key, expected, value)


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi


def validate(data: Mapping) -> None:
    """Raise ConfigError naming the first bad key; return None when all good."""
    host = "a DNS name such as example.org (lower case)"
    _check(data, "domain", lambda v: isinstance(v, str) and _HOST_RE.match(v), host)
    _check(data, "grafana_domain", lambda v: isinstance(v, str) and _HOST_RE.match(v), host)
    _check(
        data,
        "api_domain",
        lambda v: v == "" or (isinstance(v, str) and _HOST_RE.match(v)),
        f"empty or {host}",
    )
    if data["grafana_domain"] == data["domain"]:
        _fail("grafana_domain", "different from maicivy.domain", data["grafana_domain"])
    _check(
        data,
        "root",
        lambda v: isinstance(v, str) and v.startswith("/") and v.rstrip("/") != ""
        and " " not in v,
        "an absolute path without spaces, other than /",
    )
    _check(
        data,
        "compose_project",
        lambda v: isinstance(v, str) and _PROJECT_RE.match(v),
        "lower-case letters, digits, '-' or '_'",
    )
    _check(
        data,
        "registry",
        lambda v: v == "" or (isinstance(v, str) and _REGISTRY_RE.match(v.rstrip("/"))),
        "empty or a registry host[:port][/path]",
    )
    for name in DEFAULTS["images"]:
        _check(
            data,
            f"images.{name}",
            lambda v: isinstance(v, str) and _IMAGE_RE.match(v),
            "an image reference such as name:tag",
        )
    for name in DEFAULTS["ports"]:
        _check(data, f"ports.{name}", lambda v: _is_int(v, 1, 65535), "a port number 1-65535")
    for name in ("http", "https"):
        _check(data, f"publish.{name}", lambda v: _is_int(v, 1, 65535), "a port number 1-65535")
    _check(
        data,
        "publish.bind",
        lambda v: isinstance(v, str) and re.match(r"^[0-9a-f.:]+$", v),
        "an IP address to publish nginx on (0.0.0.0 for all)",
    )
    _check(data, "rate_limit.per_minute", lambda v: _is_int(v, 1, 600000), "an integer > 0")
    _check(data, "rate_limit.burst", lambda v: _is_int(v, 0, 100000), "an integer >= 0")
    for kind in ("postgres", "redis"):
        _check(
            data,
            f"backup.retention_days.{kind}",
            lambda v: _is_int(v, 1, 3650),
            "a number of days 1-3650",
        )
    for tier in DEFAULTS["backup"]["keep"]:
        _check(data, f"backup.keep.{tier}", lambda v: _is_int(v, 0, 10000), "an integer >= 0")
    _check(data, "backup.min_keep", lambda v: _is_int(v, 1, 1000), "an integer >= 1")
    _check(data, "backup.lock_wait_seconds", lambda v: _is_int(v, 0, 86400),
           "a number of seconds 0-86400")
    _check(data, "backup.max_age_hours", lambda v: _is_number(v, 0, 24 * 365) and v > 0,
           "a positive number of hours")
    _check(data, "backup.min_size_bytes", lambda v: _is_int(v, 0, 10**15), "a number of bytes")
    _check(data, "backup.max_shrink_percent", lambda v: _is_int(v, 0, 100),
           "a percentage 0-100 (0 disables the check)")
    _check(data, "backup.bgsave_timeout_seconds", lambda v: _is_int(v, 1, 86400),
           "a number of seconds 1-86400")
    _check(data, "backup.s3.bucket", lambda v: isinstance(v, str)
           and (v == "" or re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v)),
           "empty or an S3 bucket name (lower case, 3-63 characters)")
    _check(data, "backup.s3.prefix", lambda v: isinstance(v, str) and not v.startswith("/")
           and " " not in v, "a key prefix such as maicivy/ (no leading /)")
    _check(data, "backup.s3.endpoint", lambda v: isinstance(v, str)
           and (v == "" or re.match(r"^https?://[^\s/]+(/.*)?$", v)),
           "empty (AWS) or an http(s):// URL of an S3-compatible service")
    _check(data, "backup.s3.region", lambda v: isinstance(v, str) and " " not in v,
           "a region name such as us-east-1")
    _check(
        data,
        "backup.compression",
        lambda v: v in ("gzip", "zstd"),
        "'gzip' or 'zstd'",
    )
    for key in ("backup.dir", "backup.textfile_dir", "tls.letsencrypt_dir", "tls.webroot"):
        _check(
            data,
            key,
            lambda v: isinstance(v, str) and v.startswith("/") and " " not in v,
            "an absolute path without spaces",
        )
    _check(
        data,
        "alerts.disk_free_percent",
        lambda v: _is_number(v, 1, 99),
        "a percentage 1-99",
    )
    for key in ("memory_used_percent", "cpu_used_percent", "error_rate_percent"):
        _check(data, f"alerts.{key}", lambda v: _is_number(v, 0.1, 100), "a percentage 0.1-100")
    _check(data, "alerts.for", lambda v: isinstance(v, str) and _DURATION_RE.match(v),
           "a Prometheus duration such as 5m")
    _check(data, "alerts.backup_stale_hours", lambda v: _is_int(v, 1, 24 * 365),
           "a number of hours")
    for key in ("scrape_interval", "retention"):
        _check(
            data,
            f"prometheus.{key}",
            lambda v: isinstance(v, str) and _DURATION_RE.match(v),
            "a Prometheus duration such as 15s or 15d",
        )
    _check(data, "logging.max_size", lambda v: isinstance(v, str) and _SIZE_RE.match(v),
           "a size such as 10m")
    _check(data, "logging.max_file", lambda v: _is_int(v, 1, 100), "an integer 1-100")
    for name in DEFAULTS["resources"]:
        _check(data, f"resources.{name}.cpus", lambda v: _is_number(v, 0.01, 256),
               "a number of CPUs such as 0.5")
        _check(data, f"resources.{name}.memory",
               lambda v: isinstance(v, str) and _SIZE_RE.match(v), "a size such as 512m")
    for key in ("interval", "timeout", "start_period"):
        _check(data, f"healthcheck.{key}", lambda v: isinstance(v, str) and _DURATION_RE.match(v),
               "a duration such as 10s")
    _check(data, "healthcheck.retries", lambda v: _is_int(v, 1, 100), "an integer 1-100")
    _check(data, "nginx.hsts_max_age", lambda v: _is_int(v, 0, 10**9), "a number of seconds")
    _check(data, "nginx.csp", lambda v: isinstance(v, str) and "\"" not in v and "\n" not in v,
           "a CSP string without double quotes or newlines")
    _check(data, "nginx.client_max_body_size", lambda v: isinstance(v, str) and _SIZE_RE.match(v),
           "a size such as 10m")
    for key in ("backend_path", "backend_deep_path", "frontend_path"):
        _check(data, f"health.{key}", lambda v: isinstance(v, str) and v.startswith("/")
               and " " not in v, "a URL path starting with /")
    _check(data, "health.timeout_seconds", lambda v: _is_number(v, 0.1, 300),
           "a number of seconds")
    _check(data, "tls.warn_days", lambda v: _is_int(v, 1, 365), "a number of days")
    _check(data, "tls.critical_days", lambda v: _is_int(v, 0, 365), "a number of days")
    if data["tls"]["critical_days"] >= data["tls"]["warn_days"]:
        _fail("tls.critical_days", "smaller than maicivy.tls.warn_days",
              data["tls"]["critical_days"])
    _check(data, "tls.acme_server", lambda v: isinstance(v, str)
           and re.match(r"^https://[^\s'\"]+$", v), "an https:// ACME directory URL")
    _check(data, "tls.staging", lambda v: isinstance(v, bool), "true or false")
    _check(data, "tls.email", lambda v: v == "" or (isinstance(v, str)
           and re.match(r"^[^@\s'\"]+@[^@\s'\"]+\.[^@\s'\"]+$", v)),
           "empty or an e-mail address")
    _check(data, "tls.ca_bundle", lambda v: v == "" or (isinstance(v, str)
           and v.startswith("/") and " " not in v), "empty or an absolute path on the server")
    for key in ("disk_warn_percent", "disk_critical_percent"):
        _check(data, f"health.{key}", lambda v: _is_number(v, 1, 100), "a percentage 1-100")
    if data["health"]["disk_warn_percent"] > data["health"]["disk_critical_percent"]:
        _fail("health.disk_warn_percent", "at most maicivy.health.disk_critical_percent",
              data["health"]["disk_warn_percent"])
    _check(data, "deploy.keep_releases", lambda v: _is_int(v, 1, 100), "an integer >= 1")
    _check(data, "deploy.health_timeout_seconds", lambda v: _is_int(v, 5, 3600),
           "a number of seconds 5-3600")
    _check(data, "deploy.lock_wait_seconds", lambda v: _is_int(v, 0, 86400),
           "a number of seconds 0-86400")
    _check(data, "provision.ssh_port", lambda v: _is_int(v, 1, 65535), "a port number 1-65535")
    _check(data, "provision.pip_options", lambda v: isinstance(v, str)
           and re.match(r"^[A-Za-z0-9 ._/:=+,@-]*$", v),
           "pip options (letters, digits, spaces and ._/:=+,@- only)")
    _check(data, "provision.log_dir", lambda v: isinstance(v, str) and v.startswith("/")
           and " " not in v, "an absolute path without spaces")
    for name in DEFAULTS["provision"]["cron"]:
        _check(data, f"provision.cron.{name}", lambda v: isinstance(v, str)
               and re.match(r"^[0-9*/,-]+( [0-9*/,A-Za-z-]+){4}$", v),
               "a cron schedule of 5 fields such as '15 3 * * *'")
    _check(data, "sudo", lambda v: isinstance(v, bool), "true or false")
    _check(data, "known_hosts", lambda v: isinstance(v, list)
           and all(isinstance(p, str) for p in v), "a list of file paths")
