"""Every setting goes through one rule in SCHEMA; no value can inject anything.

Each string setting is fed hostile values (shell, YAML, systemd, cron and
nginx specials). Each one must either be refused with one line naming the
key (exit 2 from the real CLI), or be accepted and stay inert: the rendered
tree has the same structure as with a harmless value (same YAML shape, same
nginx directives, same unit lines, same shell words in commands and cron).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile import config
from fabfile.config import DEFAULTS, SCHEMA, Key, iter_keys, load_settings
from fabfile.errors import ConfigError
from fabfile.provision import cron_lines, server_settings_yaml
from fabfile.render import render_tree

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = [
    "; echo PWNED", "$(id)", "`id`", "\nExecStartPre=/bin/id", "\n", "'", '"', "%",
    "%n", "{", "}", ": x", " #x", "#", "\nprivileged: true", "\\", "|id", "&& id", "> /x",
    "${HOME}", "$HOME", "*", "\t", "\r", "x\0",
]
# A valid value for the settings whose default is empty, so that a hostile
# suffix after a valid value is tried too (a trailing newline after a good name).
EXAMPLES = {
    "api_domain": "api.example.com",
    "registry": "ghcr.io/acme",
    "tls.email": "ops@example.org",
    "tls.ca_bundle": "/etc/ssl/pebble.pem",
    "nginx.csp": "default-src 'self'",
    "backup.s3.bucket": "acme-backups",
    "backup.s3.endpoint": "https://s3.example.org",
    "provision.pip_options": "--no-index",
    "alertmanager.email.username": "alerts",
    "alertmanager.ca_file": "/etc/ssl/alerting-ca.pem",
}


def load(**over):
    return load_settings(invoke_section=over, environ={}, files=[])


def nested(key: str, value):
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def string_keys():
    for name, key in iter_keys():
        if isinstance(key.default, str) or isinstance(key.default, list):
            yield name, key


# --- the schema itself -------------------------------------------------------------


def test_every_setting_has_a_rule_and_help():
    names = [name for name, _ in iter_keys()]
    assert len(names) == len(set(names))

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    assert sorted(leaves(DEFAULTS)) == sorted(names)
    for name, key in iter_keys():
        assert isinstance(key, Key) and key.help.strip(), name
        assert key.rule.expected, name
    for name in EXAMPLES:
        assert name in names, f"EXAMPLES names an unknown setting {name}"


def test_a_setting_without_a_rule_is_refused_at_import():
    with pytest.raises(TypeError, match=r"maicivy.alerting.receiver has no rule"):
        config._defaults({"alerting": {"receiver": ""}})
    with pytest.raises(TypeError, match="breaks its own rule"):
        Key("yes", config.BOOL, "a boolean")


@pytest.mark.parametrize("override,message", [
    ({"grafana": {"anonymous_viewer": "false"}},
     "maicivy.grafana.anonymous_viewer must be true or false"),
    ({"sudo": 0}, "maicivy.sudo must be true or false"),
    ({"tls": {"staging": "no"}}, "maicivy.tls.staging must be true or false"),
    ({"redis": {"maxmemory": "256mb; echo X"}}, "maicivy.redis.maxmemory must be a size"),
    ({"redis": {"maxmemory_policy": "allkeys-lru --save ''"}},
     "maicivy.redis.maxmemory_policy must be"),
    ({"postgres": {"max_connections": "100\n    privileged: true"}},
     "maicivy.postgres.max_connections must be an integer 1-10000"),
    ({"postgres": {"max_connections": True}}, "maicivy.postgres.max_connections must be"),
    ({"postgres": {"max_connections": 100.5}}, "maicivy.postgres.max_connections must be"),
    ({"ports": {"backend": 8080.0}}, "maicivy.ports.backend must be a port number"),
    ({"resources": {"redis": {"cpus": "0.5"}}}, "maicivy.resources.redis.cpus must be"),
    ({"domain": "x.example.com\n"}, "maicivy.domain must be a DNS name"),
    ({"root": "/opt/m\nExecStartPre=/bin/id"}, "maicivy.root must be an absolute path"),
    ({"root": "/opt/m$(id)"}, "maicivy.root must be an absolute path"),
    ({"root": "/"}, "maicivy.root must be"),
    ({"root": "//"}, "maicivy.root must be a directory other than /"),
    ({"backup": {"dir": "/var/b%n"}}, "maicivy.backup.dir must be an absolute path"),
    ({"provision": {"cron": {"ssl_renew": "30 4 * * *\n* * * * * id"}}},
     "maicivy.provision.cron.ssl_renew must be a cron schedule"),
    ({"provision": {"cron": {"ssl_renew": "30 4 * * * id;"}}},
     "maicivy.provision.cron.ssl_renew must be a cron schedule"),
    ({"known_hosts": ["/tmp/kh\n"]}, "maicivy.known_hosts must be a list of file paths"),
    ({"backup": {"s3": {"sse": "rot13"}}}, "maicivy.backup.s3.sse must be"),
])
def test_reported_injections_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load(**override)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_defaults_are_safe_and_anonymous_grafana_is_off():
    s = load()
    assert s.grafana.anonymous_viewer is False
    assert s.backup.s3.sse == "AES256"


# --- hostile values: refused, or inert where rendered ------------------------------


_NGINX_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|#[^\n]*|[;{}]|[^\s;{}"\'#]+')


def nginx_shape(text: str) -> list[str]:
    """The nginx directive names and block structure (quoted strings are opaque)."""
    out, words = [], []
    for tok in _NGINX_TOKEN.findall(text):
        if tok.startswith("#"):
            continue
        if tok in (";", "{", "}"):
            out.append(f"{words[0] if words else ''}{tok}")
            words = []
        else:
            words.append(tok)
    assert not words, f"unterminated directive {words}"
    return out


def shell_words(command: str) -> int:
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return len(list(lex))


def yaml_shape(value, key=""):
    """Structure of a YAML document: keys, list lengths, scalar types; shell
    strings (after sh -c / CMD-SHELL) by their number of shell words."""
    if isinstance(value, dict):
        return {k: yaml_shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        shaped = []
        for i, v in enumerate(value):
            if isinstance(v, str) and i > 0 and value[i - 1] in ("-c", "CMD-SHELL"):
                shaped.append(("shell", shell_words(v.replace("$$", "$"))))
            else:
                shaped.append(yaml_shape(v))
        return shaped
    return type(value).__name__


def unit_shape(text: str) -> list[str]:
    return [line.split("=", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")]


def tree_shape(tree: dict[str, bytes]) -> dict[str, object]:
    out: dict[str, object] = {}
    for rel, data in tree.items():
        text = data.decode()
        if rel.endswith((".yml", ".yaml")):
            out[rel] = yaml_shape(yaml.safe_load(text))
        elif rel.endswith(".json"):
            out[rel] = yaml_shape(json.loads(text))
        elif rel.endswith("nginx.conf"):
            out[rel] = nginx_shape(text)
        elif rel.endswith(".service") or rel.endswith(".env.production.example"):
            out[rel] = unit_shape(text)
            out[rel + " lines"] = len(text.splitlines())
        else:
            out[rel] = data
    return out


def cron_shape(settings) -> list[tuple[str, int]]:
    shaped = []
    for line in cron_lines(settings):
        assert "\n" not in line
        schedule, command = " ".join(line.split(" ")[:5]), line.split(" ", 5)[5]
        assert re.search(r"(?<!\\)%", command) is None, f"unescaped % in cron: {line}"
        shaped.append((schedule.count(" "), shell_words(command)))
    return shaped


def candidates(name: str, key: Key):
    base = key.default if key.default not in ("", []) else EXAMPLES.get(name, "")
    for token in HOSTILE:
        if isinstance(key.default, list):
            yield [token]
            yield [f"/tmp/known_hosts{token}"]
        else:
            yield token
            if base:
                yield base + token
                yield token + base


@pytest.fixture(scope="module")
def baseline():
    def shapes(s):
        return tree_shape(render_tree(s)), cron_shape(s)

    cache = {}

    def get(name, value):
        # The harmless twin of a value: same setting, a plain valid value.
        if name not in cache:
            ok = EXAMPLES.get(name, SCHEMA_DEFAULT(name))
            cache[name] = shapes(load(**nested(name, ok)))
        return cache[name]

    return get, shapes


def SCHEMA_DEFAULT(name):  # noqa: N802 - reads like the constant it stands for
    node = SCHEMA
    for part in name.split("."):
        node = node[part]
    return node.default


@pytest.mark.parametrize("name", [n for n, _ in string_keys()])
def test_hostile_values_are_refused_or_inert(name, baseline):
    get, shapes = baseline
    key = dict(iter_keys())[name]
    accepted = []
    for value in candidates(name, key):
        try:
            s = load(**nested(name, value))
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and "\r" not in text
            assert text.startswith(f"maicivy.{name} must be"), text
            continue
        accepted.append(value)
        want_tree, want_cron = get(name, value)
        got_tree, got_cron = shapes(s)
        for rel in want_tree:
            assert got_tree[rel] == want_tree[rel], f"{name}={value!r} changes {rel}"
        assert got_cron == want_cron, f"{name}={value!r} changes the cron lines"
        # The settings file provision writes reads back as the same settings.
        assert yaml.safe_load(server_settings_yaml(s))[name.split(".")[0]] == \
            (s[name.split(".")[0]] if name != "known_hosts" else [])
    # Only a few settings may take any of these characters at all (cron: its '*').
    if accepted:
        assert name in ("nginx.csp", "provision.pip_options", "known_hosts") \
            or name.startswith("provision.cron."), f"{name} accepted {accepted!r}"


@pytest.mark.parametrize("name", [n for n, k in iter_keys()
                                  if not isinstance(k.default, (str, list))])
def test_numbers_and_booleans_take_no_strings(name):
    key = dict(iter_keys())[name]
    for value in (str(key.default), f"{key.default}\nprivileged: true", "1; id", None, [1]):
        with pytest.raises(ConfigError) as err:
            load(**nested(name, value))
        assert str(err.value).startswith(f"maicivy.{name} must be"), str(err.value)
    if not isinstance(key.default, bool):
        with pytest.raises(ConfigError):
            load(**nested(name, True))  # True is 1 to Python, never a number here


# --- through the real command line ----------------------------------------------------


@pytest.mark.parametrize("yaml_text,message", [
    ('domain: "x.example.com\\n"\n', "error: maicivy.domain must be a DNS name"),
    ("root: /opt/m$(id)\n", "error: maicivy.root must be an absolute path"),
    ('redis: {maxmemory: "256mb; echo X"}\n', "error: maicivy.redis.maxmemory must be a size"),
    ('postgres: {max_connections: "100\\n    privileged: true"}\n',
     "error: maicivy.postgres.max_connections must be an integer"),
    ('grafana: {anonymous_viewer: "false"}\n',
     "error: maicivy.grafana.anonymous_viewer must be true or false"),
    ("provision: {log_dir: '/var/log/m%x'}\n", "error: maicivy.provision.log_dir must be"),
])
def test_cli_refuses_with_exit_2_and_one_line(tmp_path, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["inv", "-r", str(ROOT), "render", "--out", str(out), "--no-validate"],
        capture_output=True, text=True, env={**os.environ, "MAICIVY_CONFIG": str(cfg)},
        cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cron_words_are_quoted_and_percent_escaped():
    from fabfile.provision import cron_quote

    assert cron_quote("/opt/maicivy/ops") == "/opt/maicivy/ops"
    assert cron_quote("/opt/m%x $(id)") == "'/opt/m\\%x $(id)'"


def test_grafana_is_private_by_default_and_its_cookies_secure():
    compose = yaml.safe_load(render_tree(load())["docker/docker-compose.prod.yml"])
    env = compose["services"]["grafana"]["environment"]
    assert "GF_AUTH_ANONYMOUS_ENABLED=false" in env
    assert "GF_SECURITY_COOKIE_SECURE=true" in env
    opened = yaml.safe_load(render_tree(load(grafana={"anonymous_viewer": True}))[
        "docker/docker-compose.prod.yml"])
    assert "GF_AUTH_ANONYMOUS_ENABLED=true" in opened["services"]["grafana"]["environment"]
