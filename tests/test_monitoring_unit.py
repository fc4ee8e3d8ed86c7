"""monitoring: install/rollback scripts and the Grafana reload (run for real, locally)."""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_tools import calls, fake_path

from fabfile import monitoring
from fabfile.config import load_settings
from fabfile.errors import OpsError


def settings(**over):
    return load_settings(environ={}, files=[], overrides=over)


def test_the_monitoring_tree_is_prometheus_and_grafana_files_only():
    files = monitoring.monitoring_files(settings())
    assert set(files) == {
        "monitoring/prometheus/prometheus.yml",
        "monitoring/prometheus/alerts.yml",
        "monitoring/grafana/provisioning/datasources/prometheus.yml",
        "monitoring/grafana/provisioning/dashboards/dashboard.yml",
        "monitoring/grafana/dashboards/maicivy_overview.json",
        "monitoring/alertmanager/alertmanager.yml",
        "monitoring/alertmanager/entrypoint.sh",
    }
    monitoring.lint(files)


def test_lint_refuses_broken_yaml_or_json_before_anything_is_uploaded():
    with pytest.raises(OpsError, match="rendered monitoring/prometheus/alerts.yml is not valid"):
        monitoring.lint({"monitoring/prometheus/alerts.yml": b"groups: [\n"})
    with pytest.raises(OpsError, match="maicivy_overview.json is not valid"):
        monitoring.lint({"monitoring/grafana/dashboards/maicivy_overview.json": b"{"})


def test_promtool_runs_from_the_stacks_own_image_without_network_on_a_read_only_copy():
    s = settings(images={"prometheus": "127.0.0.1:5000/maicivy/prometheus:test"})
    a = shlex.split(monitoring.promtool_command(s, "/opt/maicivy/monitoring/.staging/abc"))
    assert a[:3] == ["docker", "run", "--rm"]
    assert a[a.index("--network") + 1] == "none"
    assert a[a.index("--entrypoint") + 1] == "promtool"
    assert a[a.index("-v") + 1] == (
        "/opt/maicivy/monitoring/.staging/abc/monitoring/prometheus:/candidate:ro")
    assert a[-4:] == ["127.0.0.1:5000/maicivy/prometheus:test", "check", "config",
                      "/candidate/prometheus.yml"]


def test_promtool_reason_is_the_line_that_says_what_is_wrong(tmp_path):
    if not shutil.which("promtool"):
        pytest.fail("promtool not found: apt-get install prometheus (tests/install-deps.sh)")
    (tmp_path / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n"
                                             "rule_files: [alerts.yml]\n")
    (tmp_path / "alerts.yml").write_text(
        "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: up{job=\n")
    proc = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    reason = monitoring.promtool_reason(proc.stdout + proc.stderr)
    assert "FAILED" in reason and "\n" not in reason


def test_install_keeps_the_previous_files_and_rollback_puts_them_back(tmp_path):
    root = tmp_path / "srv"
    s = settings(root=str(root))
    live = root / "monitoring/prometheus"
    live.mkdir(parents=True)
    (live / "prometheus.yml").write_text("old config\n")
    staging = root / "monitoring/.staging/t1"
    for rel, text in (("monitoring/prometheus/prometheus.yml", "new config\n"),
                      ("monitoring/grafana/dashboards/new.json", "{}\n")):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(text)
    changed = ["monitoring/grafana/dashboards/new.json", "monitoring/prometheus/prometheus.yml"]
    subprocess.run(["bash", "-c", monitoring.install_command(s, str(staging), changed)],
                   check=True)
    assert (live / "prometheus.yml").read_text() == "new config\n"
    assert (root / "monitoring/grafana/dashboards/new.json").read_text() == "{}\n"
    subprocess.run(["bash", "-c", monitoring.rollback_command(s, str(staging), changed)],
                   check=True)
    assert (live / "prometheus.yml").read_text() == "old config\n"
    assert not (root / "monitoring/grafana/dashboards/new.json").exists()


class _FakeGrafana(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        auth = self.headers.get("Authorization", "")
        user_pass = base64.b64decode(auth.split(" ", 1)[1]).decode() if auth else ""
        type(self).seen.append((self.path, user_pass))
        self.send_response(200 if user_pass else 401)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_grafana_reload_sends_basic_auth_from_the_environment_even_with_odd_characters():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGrafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _FakeGrafana.seen = []
        argv = monitoring.GRAFANA_RELOAD.argv(server.server_port)
        password = 'p"a\\ss wo$rd'
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "GF_SECURITY_ADMIN_USER": "boss",
                                   "GF_SECURITY_ADMIN_PASSWORD": password})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split("\n")[:2] == ["datasources 200", "dashboards 200"]
        assert _FakeGrafana.seen == [
            ("/api/admin/provisioning/datasources/reload", f"boss:{password}"),
            ("/api/admin/provisioning/dashboards/reload", f"boss:{password}")]
        assert password not in monitoring.grafana_reload_command(settings())
    finally:
        server.shutdown()


TARGETS = {"status": "success", "data": {"activeTargets": [
    {"labels": {"job": "node", "instance": "node-exporter:9100"}, "health": "up",
     "lastError": "", "lastScrape": "2026-11-25T10:00:01.123Z"},
    {"labels": {"job": "backend", "instance": "backend:8080"}, "health": "down",
     "lastError": "Get \"http://backend:8080/metrics\": dial tcp: lookup backend: no such host",
     "lastScrape": "2026-11-25T10:00:00.5Z"}]}}
ALERTS = {"status": "success", "data": {"alerts": [
    {"labels": {"alertname": "BackendDown", "severity": "critical"}, "state": "firing",
     "annotations": {"summary": "Backend backend:8080 is down"},
     "activeAt": "2026-11-25T09:58:59Z"}]}}


def test_status_parses_targets_and_alerts_and_prints_them():
    out = json.dumps(TARGETS) + "\n@@alerts\n" + json.dumps(ALERTS)
    targets, alerts = monitoring.parse_status(out)
    assert [(t.job, t.health) for t in targets] == [("backend", "down"), ("node", "up")]
    assert alerts[0].name == "BackendDown" and alerts[0].state == "firing"
    text = "\n".join(monitoring.format_status(targets, alerts))
    assert "backend  backend:8080" in text and "no such host" in text
    assert "FIRING" in text and "Backend backend:8080 is down" in text


def test_status_without_an_answer_says_so():
    with pytest.raises(OpsError, match="Prometheus did not answer"):
        monitoring.parse_status("wget: can't connect to remote host")


def test_status_command_queries_prometheus_inside_its_container(tmp_path):
    s = settings()
    argv = shlex.split(monitoring.status_command(s))
    assert argv[:9] == ["docker", "compose", "--project-name", s.compose_project,
                        "--env-file", s.env_file, "-f", s.compose_file, "exec"]
    assert argv[9:11] == ["-T", "prometheus"]
    # the script itself, with a fake wget
    env = fake_path(tmp_path, wget='case "$4" in *targets*) echo \'{"t":1}\';; '
                                   '*) echo \'{"a":2}\';; esac')
    r = subprocess.run(argv[11:], env=env, capture_output=True, text=True, timeout=30)
    assert r.stdout.splitlines() == ['{"t":1}', "", "@@alerts", '{"a":2}']
    assert calls(tmp_path) == [
        "wget -q -O - http://127.0.0.1:9090/api/v1/targets?state=active",
        "wget -q -O - http://127.0.0.1:9090/api/v1/alerts"]
    r = subprocess.run(argv[11:], env=fake_path(tmp_path, wget="echo 'wget: refused' >&2; exit 1"),
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "wget: refused\n")


def test_grafana_reload_says_which_reload_failed(tmp_path):
    env = fake_path(tmp_path, curl='cat >/dev/null; case "$*" in *datasources*) printf 200;; '
                                   '*) printf 401;; esac')
    r = subprocess.run(monitoring.GRAFANA_RELOAD.argv(3000), env=env, capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stdout) == (1, "datasources 200\ndashboards 401\n")
    env = fake_path(tmp_path, curl="echo 'curl: (7) Failed to connect' >&2; exit 7")
    r = subprocess.run(monitoring.GRAFANA_RELOAD.argv(3000), env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert r.stdout == "datasources curl failed\ndashboards curl failed\n"


def test_alertmanager_reload_proves_the_new_configuration_loaded(tmp_path):
    argv = shlex.split(monitoring.alertmanager_reload_command(settings()))
    assert argv[8:11] == ["exec", "-T", "alertmanager"]
    metric = "alertmanager_config_last_reload_successful"
    for loaded, code in (("1", 0), ("0", 1)):
        env = fake_path(tmp_path, sh='echo "entrypoint $*"', sleep="",
                        wget=f'echo "# HELP x"; echo "{metric} {loaded}"')
        r = subprocess.run(["/bin/sh", *argv[12:]], env=env, capture_output=True, text=True,
                           timeout=30)
        assert (r.returncode, r.stdout) == (code, "entrypoint /etc/alertmanager/entrypoint.sh "
                                                  "reload\n")
    assert calls(tmp_path)[-1] == "wget -q -O - http://127.0.0.1:9093/metrics"


def test_test_alert_probe_reads_alerts_then_alertmanagers_log(tmp_path):
    s = settings()
    env = fake_path(tmp_path, docker='case "$*" in *" exec "*) echo \'{"alerts":[]}\';; '
                                     '*" logs "*) echo "level=debug msg=Notify success";; esac')
    r = subprocess.run(["bash", "-c", monitoring.test_alert_probe(s, 1700000000)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.splitlines() == ['{"alerts":[]}', "", "@@logs",
                                     "level=debug msg=Notify success"]
    compose = (f"docker compose --project-name {s.compose_project} --env-file {s.env_file} "
               f"-f {s.compose_file}")
    assert calls(tmp_path) == [
        f"{compose} exec -T prometheus wget -q -O - http://127.0.0.1:9090/api/v1/alerts",
        f"{compose} logs --no-color --since 1700000000 alertmanager"]


def test_paths_used_by_push_are_all_under_the_stack_root(tmp_path):
    s = settings(root=str(tmp_path))
    for rel in monitoring.monitoring_files(s):
        assert not Path(rel).is_absolute() and ".." not in rel


# --- push_files, run here (local Host) with a fake docker ---------------------------------

PUSH_DOCKER = """case "$*" in
  *"--entrypoint promtool"*) [ "${PROMTOOL:-0}" = 0 ] || { echo "FAILED: bad rule" >&2; exit 1; };;
  *"exec -T prometheus"*) ;;
  *"exec -T grafana"*) echo "datasources 200"; echo "dashboards ${GRAFANA:-200}"
                        [ "${GRAFANA:-200}" = 200 ];;
  *) echo "unexpected docker $*" >&2; exit 99;;
esac"""


def push_setup(tmp_path, monkeypatch, **env):
    from invoke import Context

    from fabfile.host import Host

    root = tmp_path / "srv"
    (root / "monitoring/prometheus").mkdir(parents=True)
    (root / "monitoring/prometheus/prometheus.yml").write_text("old: 1\n")
    for key, value in {**fake_path(tmp_path, docker=PUSH_DOCKER), **env}.items():
        monkeypatch.setenv(key, value)
    files = {"monitoring/prometheus/prometheus.yml": b"new: 2\n",
             "monitoring/grafana/dashboards/new.json": b"{}\n"}
    return settings(root=str(root)), Host(Context()), root, files


def docker_calls(tmp_path):
    """What each docker call ran: promtool/amtool, or the service it exec'd into."""
    return [c.split()[6] if " --entrypoint " in c else c.split(" exec -T ")[-1].split()[0]
            for c in calls(tmp_path)]


def test_push_installs_what_changed_and_reloads_prometheus_and_grafana(tmp_path, monkeypatch):
    s, host, root, files = push_setup(tmp_path, monkeypatch)
    result = monitoring.push_files(host, s, files)
    assert result.changed == sorted(files)
    assert (result.prometheus_reloaded, result.grafana_reloaded,
            result.alertmanager_reloaded) == (True, True, False)
    assert (root / "monitoring/prometheus/prometheus.yml").read_text() == "new: 2\n"
    assert docker_calls(tmp_path) == ["promtool", "prometheus", "grafana"]
    assert calls(tmp_path)[1].endswith(
        " exec -T prometheus wget -q -O - --post-data= http://127.0.0.1:9090/-/reload")
    assert calls(tmp_path)[2].endswith(" monitoring-grafana-reload.sh 3000")
    assert list((root / "monitoring/.staging").iterdir()) == []
    again = monitoring.push_files(host, s, files)
    assert again.changed == [] and len(calls(tmp_path)) == 3


def test_push_puts_the_previous_files_back_when_grafana_refuses(tmp_path, monkeypatch):
    s, host, root, files = push_setup(tmp_path, monkeypatch, GRAFANA="401")
    with pytest.raises(OpsError) as err:
        monitoring.push_files(host, s, files)
    assert str(err.value) == ("Grafana did not reload its provisioning: datasources 200; "
                              "dashboards 401; the previous monitoring files were put back")
    assert (root / "monitoring/prometheus/prometheus.yml").read_text() == "old: 1\n"
    assert not (root / "monitoring/grafana/dashboards/new.json").exists()
    assert docker_calls(tmp_path) == ["promtool", "prometheus", "grafana", "prometheus"]
    assert list((root / "monitoring/.staging").iterdir()) == []


def test_push_changes_nothing_when_promtool_rejects(tmp_path, monkeypatch):
    s, host, root, files = push_setup(tmp_path, monkeypatch, PROMTOOL="1")
    with pytest.raises(OpsError) as err:
        monitoring.push_files(host, s, files)
    assert str(err.value) == ("promtool rejects the new Prometheus configuration: "
                              "FAILED: bad rule; nothing was changed on the server")
    assert (root / "monitoring/prometheus/prometheus.yml").read_text() == "old: 1\n"
    assert len(calls(tmp_path)) == 1
    assert list((root / "monitoring/.staging").iterdir()) == []
