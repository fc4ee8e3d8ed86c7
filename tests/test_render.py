"""The rendered production tree: content, and every real validator on it.

Validators used: nginx -t, gixy, promtool check config / check rules / test
rules, docker compose config, systemd-analyze verify. Each is also run on a
deliberately broken render to show the check can fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fabfile import render as r
from fabfile.config import load_settings

HERE = Path(__file__).resolve().parent
SERVICES = ["backend", "frontend", "grafana", "nginx", "node-exporter", "postgres",
            "prometheus", "redis"]


def settings(**overrides):
    return load_settings(invoke_section=overrides, environ={}, files=[])


@pytest.fixture(scope="module")
def tree():
    return r.render_tree(settings())


@pytest.fixture
def rendered(tmp_path):
    """Write the default render to a temp dir; returns (dir, settings)."""
    s = settings()
    r.write_tree(r.render_tree(s), tmp_path)
    return tmp_path, s


def need(tool: str) -> str:
    path = shutil.which(tool) or (shutil.which(tool, path="/usr/sbin:/sbin"))
    if not path:
        pytest.fail(f"{tool} is not installed: .ci/run installs it (see README)")
    return path


# --- content -------------------------------------------------------------------


def test_every_production_file_is_rendered(tree):
    assert set(tree) == {
        ".env.production.example",
        "docker/docker-compose.prod.yml",
        "docker/nginx/nginx.conf",
        "docker/nginx/ffdhe2048.pem",
        "docker/nginx/maintenance/maintenance.html",
        "monitoring/prometheus/prometheus.yml",
        "monitoring/prometheus/alerts.yml",
        "monitoring/grafana/provisioning/datasources/prometheus.yml",
        "monitoring/grafana/provisioning/dashboards/dashboard.yml",
        "monitoring/grafana/dashboards/maicivy_overview.json",
        "systemd/maicivy.service",
    }


def test_render_is_deterministic():
    assert r.render_tree(settings()) == r.render_tree(settings())


def _server_blocks(conf: str) -> list[str]:
    return re.findall(r"\n    server \{.*?\n    \}", conf, flags=re.S)


def test_nginx_conf(tree):
    conf = tree["docker/nginx/nginx.conf"].decode()
    for name in ("backend", "frontend", "grafana"):
        assert f"upstream {name} {{" in conf
    assert "return 301 https://$host$request_uri;" in conf
    assert "location /.well-known/acme-challenge/" in conf
    assert "rate=100r/m" in conf and "limit_req_status 429;" in conf
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert "gzip on;" in conf
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "location /_next/static/" in conf and "immutable" in conf
    assert "server_name grafana.maicivy.example.com;" in conf
    # Every block that sets headers sets all security headers (add_header in a
    # location drops the inherited ones).
    headers = ["Strict-Transport-Security", "Content-Security-Policy", "X-Frame-Options",
               "X-Content-Type-Options", "Referrer-Policy"]
    blocks = re.split(r"\n\s*(?=location |server \{)", conf)
    with_headers = [b for b in blocks if "add_header" in b]
    assert len(with_headers) >= 3
    for block in with_headers:
        for h in headers:
            assert f"add_header {h} " in block, (h, block[:200])


def test_compose_file(tree):
    data = yaml.safe_load(tree["docker/docker-compose.prod.yml"])
    services = data["services"]
    assert sorted(services) == SERVICES
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert "healthcheck" in svc, name
        assert svc["logging"]["driver"] == "json-file", name
        assert svc["logging"]["options"]["max-size"], name
        assert svc["deploy"]["resources"]["limits"]["memory"], name
        for entry in svc.get("environment", []):
            key, _, value = entry.partition("=")
            if any(s in key for s in ("PASSWORD", "KEY", "SECRET")):
                assert value == "", f"{name}: secret {key} must come from .env, not inline"
    # Databases are not on nginx's network.
    nginx_nets = set(services["nginx"]["networks"])
    for db in ("postgres", "redis"):
        assert not nginx_nets & set(services[db]["networks"]), db
    assert data["networks"]["data"]["internal"] is True
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert {"postgres_data", "redis_data", "prometheus_data", "grafana_data"} <= set(
        data["volumes"])


def test_prometheus_config(tree):
    prom = yaml.safe_load(tree["monitoring/prometheus/prometheus.yml"])
    assert prom["global"]["scrape_interval"] == "15s"
    assert {j["job_name"] for j in prom["scrape_configs"]} == {"prometheus", "backend", "node"}
    assert prom["rule_files"] == ["alerts.yml"]
    compose = tree["docker/docker-compose.prod.yml"].decode()
    assert "--storage.tsdb.retention.time=15d" in compose
    alerts = yaml.safe_load(tree["monitoring/prometheus/alerts.yml"])
    names = {rule["alert"] for g in alerts["groups"] for rule in g["rules"]}
    assert {"BackendDown", "HighErrorRate", "DiskSpaceLow", "HighMemoryUsage",
            "HighCPUUsage", "BackupStale"} <= names


def test_grafana_provisioning(tree):
    ds = yaml.safe_load(tree["monitoring/grafana/provisioning/datasources/prometheus.yml"])
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash = json.loads(tree["monitoring/grafana/dashboards/maicivy_overview.json"])
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in ("visitors", "requests per second", "response time", "errors", "cpu",
                 "memory", "disk"):
        assert word in titles, word
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel
        assert panel["datasource"]["uid"] == ds["datasources"][0]["uid"]


def test_env_example_has_every_variable_with_placeholders(tree):
    env = tree[".env.production.example"].decode()
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "REDIS_PASSWORD",
                 "CLAUDE_API_KEY", "OPENAI_API_KEY", "FRONTEND_URL", "NEXT_PUBLIC_API_URL",
                 "GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD", "DOCKER_REGISTRY"):
        assert re.search(rf"^{name}=", env, re.M), name
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "CLAUDE_API_KEY", "OPENAI_API_KEY",
                   "GF_SECURITY_ADMIN_PASSWORD"):
        assert re.search(rf"^{secret}=CHANGE_ME$", env, re.M), secret
    # Every variable the compose file takes from .env is in the example.
    compose = yaml.safe_load(tree["docker/docker-compose.prod.yml"])
    wanted = {e for s in compose["services"].values() for e in s.get("environment", [])
              if "=" not in e}
    for name in wanted:
        assert re.search(rf"^{name}=", env, re.M), name


def test_systemd_unit(tree):
    unit = tree["systemd/maicivy.service"].decode()
    assert "WantedBy=multi-user.target" in unit
    assert "Restart=on-failure" in unit
    assert "docker-compose.prod.yml up -d" in unit


def test_settings_reach_the_files():
    s = settings(rate_limit={"per_minute": 42}, prometheus={"scrape_interval": "30s"},
                 alerts={"disk_free_percent": 7}, domain="site.example.net",
                 grafana_domain="g.example.net")
    tree = r.render_tree(s)
    assert "rate=42r/m" in tree["docker/nginx/nginx.conf"].decode()
    assert "ssl_certificate /etc/nginx/certs/site.example.net/" in tree[
        "docker/nginx/nginx.conf"].decode()
    assert "scrape_interval: 30s" in tree["monitoring/prometheus/prometheus.yml"].decode()
    assert "< 7" in tree["monitoring/prometheus/alerts.yml"].decode()


# --- real validators -----------------------------------------------------------


def test_render_task_validates_default_render(tmp_path):
    proc = subprocess.run(["inv", "-r", str(HERE.parent), "render", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("wrote ") for line in lines) == 11
    for name in ("nginx -t", "gixy", "promtool check config", "promtool check rules",
                 "docker compose config", "systemd-analyze verify"):
        assert any(line.split() and line.split()[0] == "passed" and name in line
                   for line in lines), (name, proc.stdout)


def test_nginx_t(rendered):
    need("nginx")
    tree, s = rendered
    assert r.check_nginx(tree, s).status == "passed"
    conf = tree / r.NGINX_CONF
    conf.write_text(conf.read_text().replace("proxy_pass http://backend;",
                                             "proxy_pass http://backend", 1))
    check = r.check_nginx(tree, s)
    assert check.status == "failed" and "nginx" in check.detail


def test_gixy(rendered):
    need("gixy")
    tree, _ = rendered
    assert r.check_gixy(tree).status == "passed"
    # A location that sets its own header and so drops the security headers.
    conf = tree / r.NGINX_CONF
    conf.write_text(conf.read_text().replace(
        "location /api/ {", 'location /api/ {\n            add_header X-Debug "1";', 1))
    check = r.check_gixy(tree)
    assert check.status == "failed" and "add_header" in check.detail


def test_promtool_check_config_and_rules(rendered):
    need("promtool")
    tree, _ = rendered
    assert [c.status for c in r.check_promtool(tree)] == ["passed", "passed"]
    alerts = tree / r.ALERTS
    alerts.write_text(alerts.read_text().replace("up{job=\"backend\"} == 0",
                                                 "up{job=\"backend\" == 0", 1))
    assert [c.status for c in r.check_promtool(tree)] == ["failed", "failed"]


def _promtool_test(tree: Path) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "promtool/alerts_test.yml", tree / "monitoring/prometheus/")
    return subprocess.run([need("promtool"), "test", "rules", "alerts_test.yml"],
                          cwd=tree / "monitoring/prometheus", capture_output=True, text=True)


def test_promtool_unit_tests_every_alert(rendered):
    tree, _ = rendered
    tests = yaml.safe_load((HERE / "promtool/alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    alerts = yaml.safe_load((tree / r.ALERTS).read_text())
    defined = {rule["alert"] for g in alerts["groups"] for rule in g["rules"]}
    assert tested == defined
    proc = _promtool_test(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    s = settings(alerts={"memory_used_percent": 99})
    r.write_tree(r.render_tree(s), tmp_path)
    proc = _promtool_test(tmp_path)
    assert proc.returncode != 0 and "HighMemoryUsage" in proc.stdout + proc.stderr


def test_docker_compose_config(rendered):
    need("docker")
    tree, _ = rendered
    assert r.check_compose(tree).status == "passed"
    proc = subprocess.run(
        ["docker", "compose", "--env-file", str(tree / r.ENV_EXAMPLE), "-f",
         str(tree / r.COMPOSE_FILE), "config", "--services"], capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == SERVICES
    compose = tree / r.COMPOSE_FILE
    compose.write_text(compose.read_text().replace("networks: [data]",
                                                   "networks: [data, nowhere]", 1))
    check = r.check_compose(tree)
    assert check.status == "failed" and "nowhere" in check.detail


def test_systemd_analyze_verify(rendered):
    need("systemd-analyze")
    tree, _ = rendered
    assert r.check_unit(tree).status == "passed"
    unit = tree / r.UNIT
    unit.write_text(unit.read_text().replace("Type=oneshot", "Type=sometimes"))
    assert r.check_unit(tree).status == "failed"
