"""The configuration model: defaults, every override layer, every bad-input case."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from fabfile.config import DEFAULTS, load_settings
from fabfile.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def settings(**kw):
    kw.setdefault("environ", {})
    kw.setdefault("files", [])
    return load_settings(**kw)


def test_defaults_are_the_production_values():
    s = settings()
    assert s.root == "/opt/maicivy"
    assert s.rate_limit.per_minute == 100
    assert s.backup.retention_days.postgres == 30
    assert s.backup.retention_days.redis == 7
    assert s.prometheus.scrape_interval == "15s"
    assert s.prometheus.retention == "15d"
    assert set(s.images) == {"postgres", "redis", "backend", "frontend", "nginx",
                             "prometheus", "grafana", "node_exporter", "alertmanager"}
    assert not s.images.backend.endswith(":latest")
    assert not s.images.frontend.endswith(":latest")


def test_registry_prefixes_the_app_images_only():
    s = settings(invoke_section={"registry": "127.0.0.1:5000/", "images": {"backend": "b:1"}})
    assert s.image("backend") == "127.0.0.1:5000/b:1"
    assert s.image("frontend") == "127.0.0.1:5000/" + DEFAULTS["images"]["frontend"]
    assert s.image("node-exporter") == DEFAULTS["images"]["node_exporter"]


def test_layers_in_order(tmp_path):
    etc = tmp_path / "etc.yaml"
    etc.write_text("domain: etc.example.org\nports: {backend: 8081}\n")
    project = tmp_path / "project.yaml"
    project.write_text("maicivy:\n  domain: project.example.org\n")
    s = settings(
        invoke_section={"domain": "invoke.example.org", "compose_project": "fromyaml"},
        files=[etc, project],
        environ={"MAICIVY_PORTS__FRONTEND": "3001", "MAICIVY_TLS__STAGING": "true"},
    )
    assert s.domain == "project.example.org"  # file beats invoke.yaml
    assert s.compose_project == "fromyaml"
    assert s.ports.backend == 8081 and s.ports.frontend == 3001  # env parsed as YAML
    assert s.tls.staging is True


def test_maicivy_config_env_names_a_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("domain: x.example.org\n")
    s = load_settings(environ={"MAICIVY_CONFIG": str(f)})
    assert s.domain == "x.example.org"


BAD = [
    ({"domain": "Not A Host"}, "maicivy.domain must be a DNS name"),
    ({"grafana_domain": "maicivy.example.com"}, "maicivy.grafana_domain must be different"),
    ({"root": "relative/path"}, "maicivy.root must be an absolute path"),
    ({"compose_project": "Bad Name"}, "maicivy.compose_project must be"),
    ({"images": {"backend": ""}}, "maicivy.images.backend must be an image reference"),
    ({"ports": {"backend": 70000}}, "maicivy.ports.backend must be a port number"),
    ({"ports": {"backend": "8080"}}, "maicivy.ports.backend must be a port number"),
    ({"rate_limit": {"per_minute": 0}}, "maicivy.rate_limit.per_minute must be an integer > 0"),
    ({"backup": {"compression": "rar"}}, "maicivy.backup.compression must be 'gzip' or 'zstd'"),
    ({"backup": {"retention_days": {"postgres": 0}}},
     "maicivy.backup.retention_days.postgres must be a number of days"),
    ({"prometheus": {"scrape_interval": "15 seconds"}},
     "maicivy.prometheus.scrape_interval must be a Prometheus duration"),
    ({"alerts": {"disk_free_percent": 150}}, "maicivy.alerts.disk_free_percent must be"),
    ({"registry": "http://bad registry"}, "maicivy.registry must be"),
    ({"sudo": "yes"}, "maicivy.sudo must be true or false"),
    ({"domian": "x.org"}, "maicivy.domian is not a known setting (did you mean 'domain'?)"),
    ({"ports": 80}, "maicivy.ports must be a mapping"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_value_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        settings(invoke_section=override)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_yaml_file_names_file_and_line(tmp_path):
    f = tmp_path / "maicivy.yaml"
    f.write_text("domain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"maicivy.yaml line \d+ is not valid YAML"):
        settings(files=[f])


def test_missing_maicivy_config_file():
    with pytest.raises(ConfigError, match="MAICIVY_CONFIG=/nonexistent.yaml does not exist"):
        load_settings(environ={"MAICIVY_CONFIG": "/nonexistent.yaml"})


def test_unknown_env_key_is_refused():
    with pytest.raises(ConfigError, match="environment MAICIVY.colour is not a known setting"):
        settings(environ={"MAICIVY_COLOUR": "blue"})


@pytest.mark.parametrize("tool", ["inv", "fab"])
def test_cli_fails_before_anything_with_one_line(tool, tmp_path):
    """Both entry points read MAICIVY_* the same way and stop with one line, exit 2."""
    env = {**os.environ, "MAICIVY_PUBLISH__HTTPS": "not-a-port"}
    proc = subprocess.run(
        [tool, "-r", str(ROOT), "render", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: maicivy.publish.https must be a port number 1-65535 (got 'not-a-port')"
    )
    assert not (tmp_path / "out").exists(), "nothing may be written on bad config"


@pytest.mark.parametrize("tool", ["inv", "fab"])
def test_project_maicivy_yaml_is_read_by_both_tools(tool, tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("domain: both.example.org\n")
    env = {**os.environ, "MAICIVY_CONFIG": str(cfg)}
    proc = subprocess.run(
        [tool, "-r", str(ROOT), "render", "--out", str(tmp_path / "out"), "--no-validate"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    conf = (tmp_path / "out/docker/nginx/nginx.conf").read_text()
    assert "server_name both.example.org;" in conf


def test_example_config_file_is_valid():
    """The documented example (maicivy.example.yaml) loads as it is."""
    s = settings(files=[ROOT / "maicivy.example.yaml"])
    assert s.domain == "maicivy.example.org"
    assert s.grafana_domain == "grafana.maicivy.example.org"


# --- alerting settings (i12) -----------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ({"images": {"backend": "maicivy/backend:latest"}},
     "maicivy.images.backend must be pinned to a release tag"),
    ({"images": {"frontend": "ghcr.io/acme/frontend"}},
     "maicivy.images.frontend must be pinned to a release tag"),
    ({"alertmanager": {"webhook": "discord"}}, "maicivy.alertmanager.webhook must be"),
    ({"alertmanager": {"email": {"to": "ops@example.com"}}},
     "maicivy.alertmanager.email.from must be the sender's e-mail address"),
    ({"alertmanager": {"email": {"to": "ops@example.com", "from": "am@example.com",
                                 "smarthost": "smtp.example.com"}}},
     "maicivy.alertmanager.email.smarthost must be empty or the SMTP server as host:port"),
    ({"alertmanager": {"repeat_interval": "4 hours"}}, "maicivy.alertmanager.repeat_interval"),
    ({"nginx": {"version": "latest"}}, "maicivy.nginx.version must be a version"),
    ({"publish": {"bind6": "0.0.0.0"}}, "maicivy.publish.bind6 must be empty or an IPv6"),
])
def test_alerting_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings(invoke_section=override)
