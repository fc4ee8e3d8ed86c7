"""One configuration model for the maicivy stack.

Layers, lowest to highest precedence:

1. ``DEFAULTS`` (production defaults, from ``SCHEMA`` below: every setting
   with its default, its rule and one line of help);
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    "alertmanager",
)

APP_IMAGES = ("backend", "frontend")

# --- the schema: every setting, its default, its rule and what it means ----------
#
# Each leaf is ``Key(default, RULE, "help")``; DEFAULTS below is derived from it.
# Adding a setting is ONE edit here: its default, a rule from the list just
# below (or a new ``text(...)``/``integer(...)`` rule) and one line of help.
# A value that a rule accepts must be inert wherever it is rendered: YAML,
# compose, nginx, systemd, cron and shell lines (tests/test_config_schema.py
# feeds every string setting hostile values to prove it).


@dataclass(frozen=True)
class Rule:
    """What a value must be: a type, and a pattern, range or set of choices."""

    expected: str  # completes "maicivy.KEY must be ..."
    types: tuple[type, ...]
    pattern: re.Pattern | None = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    items: Rule | None = None  # for lists: the rule of each item

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False  # True is an int to Python, never a number to us
        if not isinstance(value, self.types):
            return False
        if self.choices and value not in self.choices:
            return False
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return False
        if self.lo is not None and value < self.lo:
            return False
        if self.hi is not None and value > self.hi:
            return False
        if self.items is not None:
            return all(self.items.accepts(v) for v in value)
        return True


@dataclass(frozen=True)
class Key:
    """One setting: its production default, its rule, one line of help."""

    default: Any
    rule: Rule
    help: str

    def __post_init__(self) -> None:
        if not self.rule.accepts(self.default):
            raise TypeError(f"default {self.default!r} breaks its own rule "
                            f"({self.rule.expected})")


def text(pattern: str, expected: str, *, empty: bool = False, flags: int = 0) -> Rule:
    """A string matching ``pattern`` as a whole (``re.fullmatch``); ``empty``: or ''."""
    if empty:
        pattern = f"(?:{pattern})?"
    return Rule(expected, (str,), re.compile(pattern, flags))


def integer(lo: int, hi: int, expected: str | None = None) -> Rule:
    return Rule(expected or f"an integer {lo}-{hi}", (int,), lo=lo, hi=hi)


def number(lo: float, hi: float, expected: str | None = None) -> Rule:
    return Rule(expected or f"a number {lo}-{hi}", (int, float), lo=lo, hi=hi)


def one_of(*choices: Any) -> Rule:
    return Rule(" or ".join(repr(c) for c in choices), (type(choices[0]),), choices=choices)


BOOL = Rule("true or false (a boolean, not a string)", (bool,))
PORT = integer(1, 65535, "a port number 1-65535")
_DNS = (r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
        r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
DNS_NAME = text(_DNS, "a DNS name such as example.org (lower case)")
# Absolute paths on the server: rendered into compose, systemd, cron and shell
# lines, so only characters that are inert in all of them.
_PATH = r"/[A-Za-z0-9._/-]+"
PATH = text(_PATH, "an absolute path of letters, digits and ._/- (such as /opt/maicivy)")
PATH_OR_EMPTY = text(_PATH, "empty or an absolute path of letters, digits and ._/-", empty=True)
URL_PATH = text(r"/[A-Za-z0-9._/-]*", "a URL path starting with / (letters, digits, ._/-)")
DURATION = text(r"[0-9]+(?:ms|s|m|h|d|w|y)", "a duration such as 10s, 5m or 15d")
PROM_DURATION = text(r"[0-9]+(?:ms|s|m|h|d|w|y)", "a Prometheus duration such as 15s or 15d")
SIZE = text(r"[0-9]+(?:b|k|kb|m|mb|g|gb)?", "a size such as 10m or 256mb", flags=re.I)
IMAGE = text(r"[a-z0-9][a-z0-9._/:@-]*[a-z0-9]", "an image reference such as name:tag",
             flags=re.I)
PERCENT = number(0.1, 100, "a percentage 0.1-100")
CRON = text(r"[0-9*/,-]+(?: [0-9*/,A-Za-z-]+){4}",
            "a cron schedule of 5 fields such as '15 3 * * *'")
SECONDS = integer(1, 86400, "a number of seconds 1-86400")
VERSION = text(r"[0-9]+\.[0-9]+(?:\.[0-9]+)?", "a version such as '1.27' (quoted in YAML)")
_EMAIL = r"[A-Za-z0-9._+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
DAYS = integer(1, 3650, "a number of days 1-3650")

SCHEMA: dict[str, Any] = {
    "domain": Key("maicivy.example.com", DNS_NAME, "public name of the site"),
    "api_domain": Key("", text(_DNS, f"empty or {DNS_NAME.expected}", empty=True),
                      "separate public name of the API; empty: /api/ and /ws/ of the site"),
    "grafana_domain": Key("grafana.maicivy.example.com", DNS_NAME,
                          "public name of Grafana (its own subdomain)"),
    "root": Key("/opt/maicivy", PATH, "where the stack lives on the server"),
    "compose_project": Key("maicivy", text(r"[a-z0-9][a-z0-9_-]*",
                                           "lower-case letters, digits, '-' or '_'"),
                           "docker compose project name"),
    "registry": Key("", text(r"[a-z0-9.-]+(?::[0-9]{1,5})?(?:/[a-z0-9._-]+)*/?",
                             "empty or a registry host[:port][/path]", empty=True, flags=re.I),
                    "registry prefixed to the app images (backend, frontend), e.g. ghcr.io/acme"),
    "images": {
        "postgres": Key("postgres:15-alpine", IMAGE, "PostgreSQL image"),
        "redis": Key("redis:7-alpine", IMAGE, "Redis image"),
        # Pinned, never :latest (checked in _validate_alerting): a deploy says
        # which release it runs.
        "backend": Key("maicivy/backend:1.0.0", IMAGE, "backend image (registry prefixed)"),
        "frontend": Key("maicivy/frontend:1.0.0", IMAGE, "frontend image (registry prefixed)"),
        "nginx": Key("nginx:1.27-alpine", IMAGE, "nginx image"),
        "prometheus": Key("prom/prometheus:v2.53.0", IMAGE, "Prometheus image"),
        "grafana": Key("grafana/grafana:11.1.0", IMAGE, "Grafana image"),
        "node_exporter": Key("prom/node-exporter:v1.8.1", IMAGE, "node-exporter image"),
        "alertmanager": Key("prom/alertmanager:v0.27.0", IMAGE, "Alertmanager image"),
    },
    # Ports inside the containers, and what nginx publishes on the host.
    "ports": {
        "backend": Key(8080, PORT, "backend port inside its container"),
        "frontend": Key(3000, PORT, "frontend port inside its container"),
        "grafana": Key(3000, PORT, "Grafana port inside its container"),
        "prometheus": Key(9090, PORT, "Prometheus port inside its container"),
        "node_exporter": Key(9100, PORT, "node-exporter port inside its container"),
        "postgres": Key(5432, PORT, "PostgreSQL port inside its container"),
        "redis": Key(6379, PORT, "Redis port inside its container"),
        "alertmanager": Key(9093, PORT, "Alertmanager port inside its container"),
    },
    "publish": {
        "bind": Key("0.0.0.0", text(r"[0-9a-fA-F.:]+", "an IP address to publish nginx on "
                                     "(0.0.0.0 for all)"), "host address nginx listens on"),
        "http": Key(80, PORT, "host port of plain HTTP"),
        "https": Key(443, PORT, "host port of HTTPS"),
        "bind6": Key("::", text(r"[0-9a-fA-F]*:[0-9a-fA-F:]*", "empty or an IPv6 address "
                                "such as :: (all)", empty=True),
                     "IPv6 host address nginx also listens on; empty: IPv4 only"),
    },
    "rate_limit": {
        "per_minute": Key(100, integer(1, 600000, "an integer > 0"),
                          "nginx requests per minute per client (429 above)"),
        "burst": Key(20, integer(0, 100000, "an integer >= 0"), "burst above the rate"),
        "grafana_per_minute": Key(300, integer(1, 600000, "an integer > 0"),
                                  "Grafana's own zone (its /public/ files are not limited)"),
        "grafana_burst": Key(50, integer(0, 100000, "an integer >= 0"),
                             "burst above Grafana's rate"),
    },
    "nginx": {
        "csp": Key("", text(r"[A-Za-z0-9 ;:/.*'_+=@,-]*", "a Content-Security-Policy of "
                            "letters, digits, spaces and ;:/.*'_+=@,-"),
                   "Content-Security-Policy of the site; empty: the built-in policy"),
        "hsts_max_age": Key(63072000, integer(0, 10**9, "a number of seconds"),
                            "Strict-Transport-Security max-age"),
        "client_max_body_size": Key("10m", SIZE, "largest request body nginx accepts"),
        # The TLS and HTTP/2 directives are chosen for these (http2 on; needs
        # nginx >= 1.25.1, X25519MLKEM768 OpenSSL >= 3.5).
        "version": Key("1.27", VERSION, "nginx version of images.nginx"),
        "openssl_version": Key("3.3", VERSION, "OpenSSL version of images.nginx"),
    },
    "healthcheck": {
        "interval": Key("10s", DURATION, "Docker health check interval of every service"),
        "timeout": Key("5s", DURATION, "Docker health check timeout"),
        "retries": Key(5, integer(1, 100), "failed checks before unhealthy"),
        "start_period": Key("30s", DURATION, "grace period after a container starts"),
    },
    "tls": {
        "letsencrypt_dir": Key("/etc/letsencrypt", PATH, "where certbot keeps certificates"),
        "webroot": Key("/var/www/certbot", PATH, "ACME webroot shared by certbot and nginx"),
        "acme_server": Key("https://acme-v02.api.letsencrypt.org/directory",
                           text(r"https://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/-]*)?",
                                "an https:// ACME directory URL"), "ACME directory"),
        "staging": Key(False, BOOL, "use Let's Encrypt's staging server"),
        "email": Key("", text(r"[A-Za-z0-9._+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
                              "empty or an e-mail address", empty=True),
                     "ACME account e-mail (expiry notices)"),
        "ca_bundle": Key("", PATH_OR_EMPTY, "extra CA bundle for a private ACME server"),
        "warn_days": Key(21, integer(1, 365, "a number of days"),
                         "certificate days left that warn"),
        "critical_days": Key(7, integer(0, 365, "a number of days"),
                             "certificate days left that are critical"),
    },
    "backup": {
        "dir": Key("/var/backups/maicivy", PATH, "where backups are written on the server"),
        "compression": Key("gzip", Rule("'gzip' or 'zstd'", (str,), choices=("gzip", "zstd")),
                           "compressor of the dumps"),
        "retention_days": {
            "postgres": Key(30, DAYS, "days PostgreSQL backups are kept"),
            "redis": Key(7, DAYS, "days Redis backups are kept"),
        },
        "min_keep": Key(3, integer(1, 1000, "an integer >= 1"),
                        "backups always kept, however old"),
        "keep": {
            "last": Key(0, integer(0, 10000, "an integer >= 0"), "keep the N newest (0: off)"),
            "daily": Key(0, integer(0, 10000, "an integer >= 0"), "keep N daily (0: off)"),
            "weekly": Key(0, integer(0, 10000, "an integer >= 0"), "keep N weekly (0: off)"),
            "monthly": Key(0, integer(0, 10000, "an integer >= 0"), "keep N monthly (0: off)"),
        },
        "lock_wait_seconds": Key(10, integer(0, 86400, "a number of seconds 0-86400"),
                                 "how long a backup waits for another one"),
        "max_age_hours": Key(26, number(0.01, 24 * 365, "a positive number of hours"),
                             "backup.check: newest backup older than this fails"),
        "min_size_bytes": Key(1024, integer(0, 10**15, "a number of bytes"),
                              "backup.check: smaller backups fail"),
        "max_shrink_percent": Key(50, integer(0, 100, "a percentage 0-100 (0 disables the "
                                                      "check)"),
                                  "backup.check: newest may not shrink more than this"),
        "bgsave_timeout_seconds": Key(300, SECONDS, "how long to wait for Redis BGSAVE"),
        "textfile_dir": Key("/var/lib/node_exporter/textfile_collector", PATH,
                            "node-exporter textfile directory (backup metrics)"),
        "s3": {
            "bucket": Key("", text(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", "empty or an S3 bucket "
                                   "name (lower case, 3-63 characters)", empty=True),
                          "bucket of the off-site copies; empty: no off-site copy"),
            "prefix": Key("maicivy/", text(r"(?:[A-Za-z0-9._-][A-Za-z0-9._/-]*)?",
                                           "a key prefix such as maicivy/ (no leading /)"),
                          "key prefix in the bucket"),
            "endpoint": Key("", text(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._/-]*)?",
                                     "empty (AWS) or an http(s):// URL of an S3-compatible "
                                     "service", empty=True),
                            "S3-compatible endpoint; empty: AWS"),
            "region": Key("us-east-1", text(r"[a-z0-9-]+", "a region name such as us-east-1"),
                          "S3 region"),
            # Not aws:kms: S3's ETag is then no MD5 and uploads could not be verified.
            "sse": Key("AES256", Rule("'AES256' or '' (none)", (str,), choices=("AES256", "")),
                       "server-side encryption asked for and checked on every uploaded "
                       "object; '' only where the service cannot encrypt"),
        },
    },
    "alerts": {
        "disk_free_percent": Key(15, number(1, 99, "a percentage 1-99"),
                                 "DiskSpaceLow below this % free"),
        "memory_used_percent": Key(90, PERCENT, "HighMemoryUsage above this % used"),
        "cpu_used_percent": Key(85, PERCENT, "HighCPUUsage above this % busy"),
        "error_rate_percent": Key(5, PERCENT, "HighErrorRate above this % of 5xx"),
        "for": Key("5m", PROM_DURATION, "how long a condition lasts before it fires"),
        "backup_stale_hours": Key(26, integer(1, 24 * 365, "a number of hours"),
                                  "BackupStale after this many hours without a backup"),
    },
    "prometheus": {
        "scrape_interval": Key("15s", PROM_DURATION, "scrape and evaluation interval"),
        "retention": Key("15d", PROM_DURATION, "how long Prometheus keeps samples"),
    },
    "grafana": {
        "anonymous_viewer": Key(False, BOOL, "let anyone who reaches the Grafana domain view "
                                "dashboards without logging in (Viewer role)"),
    },
    "logging": {
        "max_size": Key("10m", SIZE, "json-file log size before rotation"),
        "max_file": Key(5, integer(1, 100), "rotated log files kept per container"),
    },
    "resources": {
        name: {
            "cpus": Key(cpus, number(0.01, 256, "a number of CPUs such as 0.5"),
                        f"CPU limit of {name}"),
            "memory": Key(memory, SIZE, f"memory limit of {name}"),
        }
        for name, cpus, memory in (
            ("postgres", 1.0, "1g"), ("redis", 0.5, "512m"), ("backend", 1.0, "512m"),
            ("frontend", 1.0, "512m"), ("nginx", 0.5, "256m"), ("prometheus", 0.5, "512m"),
            ("grafana", 0.5, "512m"), ("node_exporter", 0.25, "128m"),
            ("alertmanager", 0.25, "128m"),
        )
    },
    "redis": {
        "maxmemory": Key("256mb", SIZE, "Redis maxmemory"),
        "maxmemory_policy": Key("allkeys-lru", one_of(
            "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
            "volatile-random", "volatile-ttl", "noeviction"), "Redis eviction policy"),
    },
    "postgres": {
        "max_connections": Key(100, integer(1, 10000), "PostgreSQL max_connections"),
    },
    "health": {
        "timeout_seconds": Key(5, number(0.1, 300, "a number of seconds"),
                               "timeout of each health check"),
        "disk_warn_percent": Key(80, number(1, 100, "a percentage 1-100"),
                                 "disk use that warns"),
        "disk_critical_percent": Key(90, number(1, 100, "a percentage 1-100"),
                                     "disk use that is critical"),
        "backend_path": Key("/health", URL_PATH, "backend health URL path"),
        "backend_deep_path": Key("/health/deep", URL_PATH,
                                 "backend health path that also checks its databases"),
        "frontend_path": Key("/", URL_PATH, "frontend health URL path"),
    },
    "deploy": {
        "keep_releases": Key(3, integer(1, 100, "an integer >= 1"),
                             "releases kept for deploy.rollback"),
        "health_timeout_seconds": Key(120, integer(5, 3600, "a number of seconds 5-3600"),
                                      "how long a new container may take to become healthy"),
        "lock_wait_seconds": Key(600, integer(0, 86400, "a number of seconds 0-86400"),
                                 "how long deploy, restore... wait for running backups "
                                 "(they share the stack lock)"),
    },
    # What `provision` sets up on a fresh server (fabfile/provision.py).
    "provision": {
        "ssh_port": Key(22, PORT, "port sshd listens on: ufw keeps it open (rate-limited)"),
        "pip_options": Key("", text(r"[A-Za-z0-9 ._/:=+,@-]*",
                                    "pip options (letters, digits, spaces and ._/:=+,@- only)"),
                           "extra pip options for installing maicivy-ops on the server, e.g. "
                           "'--no-index --find-links /opt/wheels'"),
        "log_dir": Key("/var/log/maicivy", PATH, "where the cron jobs log"),
        "cron": {
            "postgres_backup": Key("15 3 * * *", CRON, "schedule of backup.postgres"),
            "redis_backup": Key("45 3 * * *", CRON, "schedule of backup.redis"),
            "ssl_renew": Key("30 4 * * *", CRON, "schedule of ssl.renew"),
            "restore_drill": Key("0 5 * * 0", CRON, "schedule of backup.verify"),
        },
    },
    # --- alerting (issue 12; cross-key rules in _validate_alerting) -----------
    **{
        "node_exporter": {
            "rootfs_propagation": Key("rslave", one_of("rslave", ""),
                                      "propagation of the host / mounted into node-exporter "
                                      "('' where / is a private mount)"),
        },
        # Who gets the alerts. Secrets are never settings: ALERT_SMTP_PASSWORD,
        # ALERT_WEBHOOK_URL and ALERT_HEARTBEAT_URL live in the server's .env.
        "alertmanager": {
            "group_wait": Key("30s", DURATION, "wait before the first notification of a group"),
            "group_interval": Key("5m", DURATION, "wait before notifying a group's changes"),
            "repeat_interval": Key("4h", DURATION, "resend a still-firing alert after this"),
            "send_resolved": Key(True, BOOL, "notify when an alert resolves"),
            "email": {
                "to": Key("", text(rf"{_EMAIL}(?:,{_EMAIL})*", "empty or e-mail addresses, "
                                   "comma-separated", empty=True),
                          "e-mail receiver: recipients (empty: no e-mail)"),
                "from": Key("", text(_EMAIL, "empty or the sender's e-mail address",
                                     empty=True), "sender address of the alert e-mails"),
                "smarthost": Key("", text(r"[A-Za-z0-9.-]+:[0-9]{1,5}", "empty or the SMTP "
                                          "server as host:port such as smtp.example.com:587",
                                          empty=True), "SMTP server (STARTTLS)"),
                "username": Key("", text(r"[A-Za-z0-9._@+-]+", "empty or an SMTP user name "
                                         "(letters, digits, ._@+-)", empty=True),
                                "SMTP AUTH user; password: ALERT_SMTP_PASSWORD in .env"),
                "require_tls": Key(True, BOOL, "refuse an SMTP server without STARTTLS"),
            },
            "webhook": Key("", one_of("", "webhook", "slack"),
                           "webhook receiver, URL in .env ALERT_WEBHOOK_URL: 'webhook' "
                           "(Alertmanager JSON: ntfy, any endpoint), 'slack' (Slack, "
                           "Mattermost, Discord's /slack URL) or '' (none)"),
            "heartbeat": Key(False, BOOL, "dead man's switch: ping ALERT_HEARTBEAT_URL "
                             "(healthchecks.io-style) with the always-firing Watchdog"),
            "heartbeat_interval": Key("5m", DURATION, "how often the heartbeat pings"),
            "ca_file": Key("", PATH_OR_EMPTY, "CA bundle on the server trusted for SMTP and "
                           "webhook TLS; empty: the system CAs"),
            "runbook_url": Key("https://github.com/maicivy/maicivy-ops/blob/main/docs/"
                               "OPERATIONS.md",
                               text(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?"
                                    r"(?:/[A-Za-z0-9._~/-]*)?", "an http(s) URL of "
                                    "docs/OPERATIONS.md (no query or fragment)"),
                               "runbook link of every alert (+ #runbook-<alert>)"),
        },
    },
    "sudo": Key(False, BOOL, "run privileged commands with sudo -n (non-root SSH user)"),
    # Local files, read by paramiko only (never rendered on the server).
    "known_hosts": Key([], Rule("a list of file paths (~/... or /...)", (list,),
                                items=text(r"(?:~|/)[A-Za-z0-9._/+@ -]*", "a file path")),
                       "extra known_hosts files (SSH host keys are always verified)"),
}


def _defaults(schema: Mapping, where: str = "maicivy") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in schema.items():
        if isinstance(node, Key):
            out[name] = copy.deepcopy(node.default)
        elif isinstance(node, Mapping):
            out[name] = _defaults(node, f"{where}.{name}")
        else:  # a plain value: someone added a setting without its rule
            raise TypeError(f"fabfile/config.py: {where}.{name} has no rule; declare it as "
                            "Key(default, RULE, 'help') in SCHEMA")
    return out


def iter_keys(schema: Mapping = SCHEMA, prefix: str = "") -> Iterator[tuple[str, Key]]:
    """Every (dotted name, Key) of the schema, in declaration order."""
    for name, node in schema.items():
        if isinstance(node, Key):
            yield prefix + name, node
        else:
            yield from iter_keys(node, f"{prefix}{name}.")


# Production defaults, as a plain nested dict (derived from SCHEMA).
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)


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
    _normalize_paths(merged)
    return Settings.wrap(merged)


def _normalize_paths(data: dict) -> None:
    """Directories without a trailing slash (``/opt/maicivy/`` -> ``/opt/maicivy``), so
    that code joins them with ``f"{settings.root}/x"`` and never strips them itself."""
    for name, key in iter_keys():
        if key.rule in (PATH, PATH_OR_EMPTY):
            *parents, last = name.split(".")
            node = data
            for part in parents:
                node = node[part]
            if isinstance(node[last], str) and node[last] not in ("", "/"):
                node[last] = node[last].rstrip("/") or "/"


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


def validate(data: Mapping) -> None:
    """Raise ConfigError naming the first bad key; return None when all good.

    Every key goes through its rule in SCHEMA; then the few rules that relate
    two keys.
    """
    for name, key in iter_keys():
        value = _get(data, name)
        if not key.rule.accepts(value):
            _fail(name, key.rule.expected, value)
    if data["root"].strip("/") == "":
        _fail("root", "a directory other than /", data["root"])
    if data["grafana_domain"] == data["domain"]:
        _fail("grafana_domain", "different from maicivy.domain", data["grafana_domain"])
    if data["tls"]["critical_days"] >= data["tls"]["warn_days"]:
        _fail("tls.critical_days", "smaller than maicivy.tls.warn_days",
              data["tls"]["critical_days"])
    if data["health"]["disk_warn_percent"] > data["health"]["disk_critical_percent"]:
        _fail("health.disk_warn_percent", "at most maicivy.health.disk_critical_percent",
              data["health"]["disk_warn_percent"])
    _validate_alerting(data)


# --- alerting (issue 12) ----------------------------------------------------------


def _validate_alerting(data: Mapping) -> None:
    """App images pinned; an e-mail receiver has its sender and SMTP server."""
    for name in APP_IMAGES:
        ref = data["images"][name]
        tag = "digest" if "@" in ref else ref.rsplit("/", 1)[-1].partition(":")[2]
        if tag in ("", "latest"):
            _fail(f"images.{name}", "pinned to a release tag such as name:1.4.2 (not :latest)",
                  ref)
    email = data["alertmanager"]["email"]
    if email["to"]:
        for key, what in (("from", "the sender's e-mail address"),
                          ("smarthost", "the SMTP server as host:port such as "
                                        "smtp.example.com:587")):
            if not email[key]:
                _fail(f"alertmanager.email.{key}", f"{what} (needed with "
                      "maicivy.alertmanager.email.to)", email[key])
