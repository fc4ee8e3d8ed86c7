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
SERVICES = ["alertmanager", "backend", "frontend", "grafana", "nginx", "node-exporter",
            "postgres", "prometheus", "redis"]


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
        "docker/nginx/mime.types",
        "docker/nginx/ffdhe2048.pem",
        "docker/nginx/maintenance/maintenance.html",
        "monitoring/prometheus/prometheus.yml",
        "monitoring/prometheus/alerts.yml",
        "monitoring/grafana/provisioning/datasources/prometheus.yml",
        "monitoring/grafana/provisioning/dashboards/dashboard.yml",
        "monitoring/grafana/dashboards/maicivy_overview.json",
        "monitoring/alertmanager/alertmanager.yml",
        "monitoring/alertmanager/entrypoint.sh",
        "systemd/maicivy.service",
    }


def test_render_is_deterministic():
    assert r.render_tree(settings()) == r.render_tree(settings())


def _server_blocks(conf: str) -> list[str]:
    return re.findall(r"\n    server \{.*?\n    \}", conf, flags=re.S)


def test_nginx_conf(tree):
    conf = tree["docker/nginx/nginx.conf"].decode()
    # Upstream names are resolved at request time through Docker's DNS (a
    # restarted container's new address is found), never once at start.
    assert "resolver 127.0.0.11 valid=5s ipv6=off;" in conf
    assert not re.search(r"^\s*upstream ", conf, re.M)
    for name, port in (("backend", 8080), ("frontend", 3000), ("grafana", 3000)):
        assert f"set ${name} {name}:{port};" in conf
        assert f"proxy_pass http://{name};" not in conf
    assert conf.count("proxy_pass http://$backend;") == 5
    assert re.search(r"location /ws/ \{[^}]*Upgrade \$http_upgrade;[^}]*proxy_pass "
                     r"http://\$backend;", conf)
    assert "return 308 https://$host$request_uri;" in conf
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
    assert {j["job_name"] for j in prom["scrape_configs"]} == {
        "prometheus", "backend", "node", "alertmanager"}
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"]
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


def _bind_mounts(tree) -> list[tuple[str, str, str]]:
    """(service, source relative to the stack root, target) of every bind mount of a
    path the stack root holds (relative sources: the compose file's directory)."""
    import posixpath

    compose = yaml.safe_load(tree["docker/docker-compose.prod.yml"])
    out = []
    for name, svc in compose["services"].items():
        for entry in svc.get("volumes", []):
            source, target = entry.split(":")[:2]
            if source.startswith("."):
                out.append((name, posixpath.normpath(posixpath.join("docker", source)), target))
    return out


def test_compose_mounts_directories_never_single_files(tree):
    """A deploy replaces files by rename (new inode): a single-file bind mount keeps
    showing the old file; a directory mount shows the new one."""
    mounts = _bind_mounts(tree)
    assert {(s, src) for s, src, _t in mounts} >= {
        ("nginx", "docker/nginx"), ("prometheus", "monitoring/prometheus"),
        ("grafana", "monitoring/grafana/provisioning")}
    for service, source, target in mounts:
        assert source not in tree, f"{service} mounts the single file {source} at {target}"
        assert any(rel.startswith(source + "/") for rel in tree), (service, source)
    # nginx's whole /etc/nginx is ours: the config, mime.types, dhparam, certs/.
    nginx = tree["docker/nginx/nginx.conf"].decode()
    for path in re.findall(r"(?:include|ssl_dhparam) /etc/nginx/(\S+);", nginx):
        assert f"docker/nginx/{path}" in tree, path


def test_config_id_is_a_digest_of_the_file_itself():
    a = r.render_tree(settings())["docker/nginx/nginx.conf"]
    b = r.render_tree(settings(rate_limit={"per_minute": 101}))["docker/nginx/nginx.conf"]
    ida, idb = r.embedded_config_id(a), r.embedded_config_id(b)
    assert ida and idb and ida != idb
    assert f'return 200 "{ida}\\n";' in a.decode()
    assert r.CONFIG_ID_PLACEHOLDER.encode() not in a
    # A hand-edited file carries no valid id any more.
    assert r.embedded_config_id(a.replace(b"rate=100r/m", b"rate=99r/m")) is None
    assert r.embedded_config_id(b"no id here") is None


def test_systemd_findings_split_machine_facts_from_file_errors():
    out = (
        "maicivy.service: Failed to create maicivy.service/start: Unit docker.service "
        "not found.\n"
        "maicivy.service: Command /usr/bin/docker is not executable: No such file or "
        "directory\n"
        "maicivy.service: Command /usr/bin/docker is not executable: No such file or "
        "directory\n"
        "cups.service: something about another unit\n"
    )
    errors, facts = r.unit_findings(out)
    assert errors == []
    assert facts == ["Unit docker.service not found",
                     "Command /usr/bin/docker is not executable"]
    errors, facts = r.unit_findings(
        out + "maicivy.service:9: Failed to parse service type, ignoring: sometimes\n")
    assert errors == ["maicivy.service:9: Failed to parse service type, ignoring: sometimes"]
    # Another missing unit or command is an error in the file, not a fact of the machine.
    errors, _ = r.unit_findings("maicivy.service: Failed to create maicivy.service/start: "
                                "Unit dokcer.service not found.\n")
    assert errors


# --- real validators -----------------------------------------------------------


def test_render_task_validates_default_render(tmp_path):
    proc = subprocess.run(["inv", "-r", str(HERE.parent), "render", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("wrote ") for line in lines) == 14
    for name in ("nginx -t", "gixy", "promtool check config", "promtool check rules",
                 "amtool check-config", "docker compose config", "systemd-analyze verify"):
        assert any(line.split() and line.split()[0] == "passed" and name in line
                   for line in lines), (name, proc.stdout)


def test_nginx_t(rendered):
    need("nginx")
    tree, s = rendered
    assert r.check_nginx(tree, s).status == "passed"
    conf = tree / r.NGINX_CONF
    conf.write_text(conf.read_text().replace("proxy_pass http://$backend;",
                                             "proxy_pass http://$backend", 1))
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


# A machine without Docker: its unit files and binary are hidden in a mount
# namespace of the test's own (the host is untouched).
_NO_DOCKER = r"""
set -e
units=$(mktemp -d)
cp -a /usr/lib/systemd/system/. "$units"/
rm -f "$units"/docker.service "$units"/docker.socket
mount --bind "$units" /usr/lib/systemd/system
for bin in /usr/bin/docker /usr/local/bin/docker; do
  [ -e "$bin" ] && mount --bind /dev/null "$bin"
done
exec "$@"
"""


def test_render_on_a_machine_without_docker_exits_0(tmp_path):
    """The README's first command on a fresh machine: no Docker there, and gixy only
    in the virtualenv (not on PATH). Machine facts are skipped with why; errors in the
    unit file still fail."""
    import os
    import sys

    need("systemd-analyze")
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "gixy").exists(), "gixy is in the test extra (setup.cfg)"
    path = "/usr/sbin:/usr/bin:/sbin:/bin"  # no venv, no /usr/local/bin
    flags = ["--mount"] if os.geteuid() == 0 else ["--mount", "--map-root-user"]
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    def render(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["unshare", *flags, "bash", "-c", _NO_DOCKER, "no-docker", str(venv_bin / "inv"),
             "-r", str(HERE.parent), "render", "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=300)

    proc = render(tmp_path / "build")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    def status(name: str) -> str:
        m = re.search(rf"^ *(passed|failed|skipped)  {re.escape(name)}( \(|$)", proc.stdout,
                      re.M)
        return m.group(1) if m else f"{name}: not reported"

    assert status("gixy") == "passed", proc.stdout
    assert status("nginx -t") == "passed", proc.stdout
    assert status("docker compose config") == "skipped", proc.stdout
    assert status("systemd-analyze verify") == "skipped", proc.stdout
    assert ("Docker is not installed on this machine" in proc.stdout
            and "Unit docker.service not found" in proc.stdout
            and "no error in the file" in proc.stdout), proc.stdout
    # An error in the unit file still fails there.
    tree = tmp_path / "broken"
    r.write_tree(r.render_tree(settings()), tree)
    analyze = subprocess.run(
        ["unshare", *flags, "bash", "-c", _NO_DOCKER, "no-docker", "systemd-analyze",
         "verify", str(tree / r.UNIT)], capture_output=True, text=True, env=env)
    errors, facts = r.unit_findings(analyze.stdout + analyze.stderr)
    assert facts and not errors, analyze.stderr
    unit = tree / r.UNIT
    unit.write_text(unit.read_text().replace("Type=oneshot", "Type=sometimes"))
    analyze = subprocess.run(
        ["unshare", *flags, "bash", "-c", _NO_DOCKER, "no-docker", "systemd-analyze",
         "verify", str(unit)], capture_output=True, text=True, env=env)
    errors, facts = r.unit_findings(analyze.stdout + analyze.stderr)
    assert errors and facts, analyze.stdout + analyze.stderr


# --- version-aware nginx (issue 12) ----------------------------------------------


@pytest.mark.parametrize("nginx,openssl,listen,http2_on,curves", [
    ("1.27", "3.3", "listen 443 ssl;", True, "X25519:prime256v1:secp384r1"),
    ("1.25.1", "3.5", "listen 443 ssl;", True, "X25519MLKEM768:X25519:prime256v1:secp384r1"),
    ("1.22", "3.0", "listen 443 ssl http2;", False, "X25519:prime256v1:secp384r1"),
])
def test_nginx_conf_follows_the_image_versions(nginx, openssl, listen, http2_on, curves):
    conf = r.render_tree(settings(nginx={"version": nginx, "openssl_version": openssl}))[
        r.NGINX_CONF].decode()
    assert listen in conf and ("http2 on;" in conf) is http2_on
    assert f"ssl_ecdh_curve {curves};" in conf
    assert not re.search(r"(?<!EC)DHE-", conf) and "ssl_dhparam" not in conf


def test_for_older_nginx_changes_only_the_version_directives():
    new = r.render_tree(settings(nginx={"version": "1.27", "openssl_version": "3.5"}))[
        r.NGINX_CONF].decode()
    old = r.render_tree(settings(nginx={"version": "1.22", "openssl_version": "3.0"}))[
        r.NGINX_CONF].decode()
    adapted = r.for_older_nginx(new, "1.22.1", "3.0.19")
    strip = re.compile(r"^# Rendered.*\n|^\s*# TLS: Mozilla.*\n|^\s*# OpenSSL.*\n"
                       r"|^\s*return 200 \"[0-9a-f]+\\n\";\n", re.M)  # (config-id: a digest)
    assert strip.sub("", adapted) == strip.sub("", old).replace(
        "listen 443 ssl default_server;", "listen 443 ssl http2 default_server;").replace(
        "listen [::]:443 ssl default_server;", "listen [::]:443 ssl http2 default_server;")
