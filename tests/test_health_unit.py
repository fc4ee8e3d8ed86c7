"""health: the parallel probe script (run for real, locally) and every verdict."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from fake_tools import calls, fake_path, run

from fabfile import health
from fabfile.config import SERVICES, load_settings
from fabfile.errors import ConfigError
from fabfile.health import CRITICAL, OK, WARNING, Probe


def settings(**over):
    base = {"domain": "maicivy.test", "grafana_domain": "grafana.maicivy.test"}
    return load_settings(environ={}, files=[], overrides={**base, **over})


def run_script(probes, timeout):
    command = health.probe_command(probes, timeout)
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    return health.parse_probe_output(proc.stdout)


# --- the probe script -------------------------------------------------------------


def test_probe_script_reports_each_probes_exit_code_and_output():
    results = run_script([Probe("a", "a", "echo hello; echo world"),
                          Probe("b", "b", "echo oops >&2; exit 3")], timeout=5)
    assert results["a"][0] == 0 and results["a"][2] == "hello\nworld"
    assert results["b"][0] == 3 and results["b"][2] == "oops"


def test_a_hanging_probe_is_cut_at_the_timeout_and_the_others_still_report():
    results = run_script([Probe("hang", "hang", "sleep 30"), Probe("quick", "quick", "echo ok")],
                         timeout=1)
    rc, ms, _ = results["hang"]
    assert rc == 124
    assert results["quick"][0] == 0
    row = health.http_row("backend /health", rc, "", 1, ms / 1000)
    assert row.status == CRITICAL and row.detail == "no answer within 1s"


def test_probes_run_side_by_side_not_one_after_another():
    # Each probe records when it started; all start before any ends.
    results = run_script([Probe(f"p{i}", f"p{i}", "date +%s%N; sleep 1; date +%s%N")
                          for i in range(4)], timeout=10)
    starts = [int(results[f"p{i}"][2].split()[0]) for i in range(4)]
    ends = [int(results[f"p{i}"][2].split()[1]) for i in range(4)]
    assert max(starts) < min(ends)


def test_probe_ids_must_be_plain_names():
    with pytest.raises(ValueError):
        health.probe_command([Probe("a b; rm", "x", "true")], 1)


def test_the_probes_cover_every_check_and_go_through_nginx_with_sni(tmp_path):
    s = settings(publish={"bind": "0.0.0.0", "https": 8443}, health={"timeout_seconds": 3})
    by_id = {p.id: p for p in health.probes(s)}
    assert list(by_id) == ["http", "docker", "maintenance"]
    assert by_id["docker"].parts == ("docker:prometheus", "docker:services", "docker:disk")
    http = by_id["http"]
    assert http.parts == ("frontend", "backend", "backend_deep", "grafana", "cert_0", "cert_1")
    # the one curl, run with a fake curl that keeps its arguments (and prints no
    # certificate: the openssl fallback runs for each name)
    env = {**fake_path(tmp_path, curl='printf "%s\\n" "$@" > "$T/args"',
                       timeout='echo "timeout $*" >> "$T/openssl"',
                       openssl='cat >/dev/null; echo "unable to load certificate" >&2; exit 1'),
           "T": str(tmp_path)}
    r = run(http.command, env, merged=True)
    assert (tmp_path / "args").read_text().splitlines() == [
        "-s", "-k", "--no-sessionid", "--path-as-is", "--parallel", "--parallel-immediate",
        "--parallel-max", "16", "--max-time", "3", "-H", "X-Maicivy-Check: health",
        "--resolve", "maicivy.test:8443:127.0.0.1",
        "--resolve", "grafana.maicivy.test:8443:127.0.0.1",
        "-w", "~~t %{filename_effective}|%{http_code}|%{time_total}|%{exitcode}|%{errormsg}"
        "\\n%{certs}",
        "-o", f"{tmp_path}/http.frontend", "https://maicivy.test:8443/",
        "-o", f"{tmp_path}/http.backend", "https://maicivy.test:8443/health",
        "-o", f"{tmp_path}/http.backend_deep", "https://maicivy.test:8443/health/deep",
        "-o", f"{tmp_path}/http.grafana", "https://grafana.maicivy.test:8443/api/health",
        "-o", f"{tmp_path}/http.cert_0", "https://maicivy.test:8443/../",
        "-o", f"{tmp_path}/http.cert_1", "https://grafana.maicivy.test:8443/../"]
    assert r.stdout.splitlines() == [
        "@@body frontend", "", "@@body backend", "", "@@body backend_deep", "",
        "@@body grafana", "", "@@openssl cert_0", "unable to load certificate",
        "@@openssl cert_1", "unable to load certificate"]
    assert r.returncode == 1
    assert (tmp_path / "openssl").read_text().splitlines() == [
        f"timeout 3 openssl s_client -connect 127.0.0.1:8443 -servername {name}"
        for name in ("maicivy.test", "grafana.maicivy.test")]
    rows = health.http_rows(s, http.parts, r.returncode, r.stdout, 3)
    assert [(row.check, row.status, row.detail) for row in rows] == [
        ("frontend", CRITICAL, "unreachable: unable to load certificate"),
        ("backend /health", CRITICAL, "unreachable: unable to load certificate"),
        ("backend /health/deep", CRITICAL, "unreachable: unable to load certificate"),
        ("grafana", CRITICAL, "unreachable: unable to load certificate"),
        ("certificate maicivy.test", CRITICAL, "no TLS answer (unable to load certificate)"),
        ("certificate grafana.maicivy.test", CRITICAL,
         "no TLS answer (unable to load certificate)")]


def test_an_ipv6_bind_is_reached_in_brackets(tmp_path):
    s = settings(publish={"bind": "::", "https": 443})
    env = {**fake_path(tmp_path, curl='printf "%s\\n" "$@" > "$T/args"'), "T": str(tmp_path)}
    run(health.http_probe(s, ["backend"]).command, env)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("--resolve") + 1] == "maicivy.test:443:[::1]"
    assert args.count("--resolve") == 1 and args[-1] == "https://maicivy.test:443/health"


def test_the_http_checks_run_in_one_curl_for_real(tmp_path):
    """The combined curl against a real (threaded, TLS) HTTP server on 127.0.0.1."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "10", "-subj",
                    "/CN=maicivy.test", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem")], check=True, capture_output=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            answers = {"/": (200, "<html>site</html>"), "/health": (200, '{"status":"ok"}'),
                       "/health/deep": (503, '{"status":"degraded","checks":{"postgres":'
                                             '{"status":"error","error":"refused"}}}'),
                       "/api/health": (200, '{"database":"ok"}')}
            status, body = answers.get(self.path, (404, "no"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = settings(publish={"bind": "127.0.0.1", "https": server.server_port})
        probe = health.http_probe(s)
        rows = health.evaluate(s, [probe], run_script([probe], 10))
    finally:
        server.shutdown()
    assert [(r.check, r.status, r.detail) for r in rows[:4]] == [
        ("frontend", OK, "HTTP 200"),
        ("backend /health", OK, "HTTP 200"),
        ("backend /health/deep", CRITICAL, "HTTP 503 (postgres: refused)"),
        ("grafana", OK, "HTTP 200"),
    ]
    assert [(r.check, r.status) for r in rows[4:]] == [
        ("certificate maicivy.test", WARNING), ("certificate grafana.maicivy.test", WARNING)]
    assert all(r.detail.startswith(("9 days left", "10 days left")) for r in rows[4:])
    assert all(r.seconds is not None and r.seconds < 10 for r in rows)


def test_each_http_check_gives_up_at_the_timeout_when_nothing_answers():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts TCP, never speaks TLS
    try:
        s = settings(publish={"bind": "127.0.0.1", "https": listener.getsockname()[1]},
                     health={"timeout_seconds": 1})
        probe = health.http_probe(s, ["backend", "grafana", "cert_1"])
        rows = health.evaluate(s, [probe], run_script([probe], 1))
    finally:
        listener.close()
    assert [(r.check, r.status, r.detail) for r in rows] == [
        ("backend /health", CRITICAL, "no answer within 1s"),
        ("grafana", CRITICAL, "no answer within 1s"),
        ("certificate grafana.maicivy.test", CRITICAL, "no TLS answer within 1s")]


def test_http_rows_parse_curl_write_out_and_bodies():
    s = settings()
    out = "\n".join([
        "~~t /tmp/x/http.backend_deep|503|0.012|0|",
        "~~t /tmp/x/http.frontend|000|3.001|28|Operation timed out after 3001 milliseconds",
        "@@body frontend", "",
        "@@body backend_deep",
        '{"status":"degraded","checks":{"redis":{"status":"error","error":"refused"}}}',
    ])
    rows = health.http_rows(s, ("frontend", "backend_deep", "grafana"), 0, out, 3)
    assert [(r.check, r.status, r.detail) for r in rows] == [
        ("frontend", CRITICAL, "no answer within 3s"),
        ("backend /health/deep", CRITICAL, "HTTP 503 (redis: refused)"),
        ("grafana", CRITICAL, "unreachable: " + '{"status":"degraded","checks":{"redis":'
         '{"status":"error","error":"refused"}}}'),
    ]


def test_disk_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="health.disk_warn_percent must be at most"):
        settings(health={"disk_warn_percent": 95, "disk_critical_percent": 90})


# --- verdicts ---------------------------------------------------------------------


@pytest.mark.parametrize("rc,output,status,detail", [
    (0, '{"status":"ok"}\n200', OK, "HTTP 200"),
    (0, "<html>\n301", OK, "HTTP 301"),
    (0, '{"error":"bad gateway"}\n502', CRITICAL, "HTTP 502"),
    (7, "curl: (7) Failed to connect to 127.0.0.1 port 9: Connection refused\n000", CRITICAL,
     "unreachable: curl: (7) Failed to connect to 127.0.0.1 port 9: Connection refused"),
    (28, "curl: (28) Operation timed out after 3001 milliseconds\n000", CRITICAL,
     "no answer within 3s"),
])
def test_http_verdicts(rc, output, status, detail):
    row = health.http_row("frontend", rc, output, 3, 0.1)
    assert (row.status, row.detail) == (status, detail)


def test_deep_health_failure_names_the_failing_dependency():
    body = json.dumps({"status": "degraded", "checks": {
        "postgres": {"status": "ok"},
        "redis": {"status": "error", "error": "ConnectionRefusedError: refused"}}})
    row = health.http_row("backend /health/deep", 0, body + "\n503", 3, 0.1)
    assert row.status == CRITICAL
    assert row.detail == "HTTP 503 (redis: ConnectionRefusedError: refused)"


def ps_line(service, state="running", health_="healthy", code=0):
    return f"@@c {service}|{state}|{health_}|{code}|4242|abc123|"


def test_service_rows_one_per_service():
    s = settings()
    lines = [ps_line(x) for x in SERVICES if x != "backend"]
    lines.append(ps_line("backend", "exited", "", 137))
    rows = health.service_rows(s, 0, "\n".join(lines), 0.2)
    assert [r.check for r in rows] == [f"service {x}" for x in SERVICES]
    bad = {r.check: r.detail for r in rows if r.status != OK}
    assert bad == {"service backend": "exited (exit code 137)"}
    lines = [ps_line(x) for x in SERVICES if x != "redis"]
    rows = {r.check: r for r in health.service_rows(s, 0, "\n".join(lines), 0.2)}
    assert rows["service redis"].status == CRITICAL
    assert rows["service redis"].detail == "no container (not created)"


def test_starting_is_a_warning_unhealthy_and_paused_are_critical():
    s = settings()
    lines = [ps_line(x) for x in SERVICES if x not in ("grafana", "frontend", "backend")]
    lines += [ps_line("grafana", health_="starting"),
              ps_line("frontend", health_="unhealthy"),
              ps_line("backend", "paused", "healthy")]
    rows = {r.check: (r.status, r.detail)
            for r in health.service_rows(s, 0, "\n".join(lines), 0.1)}
    assert rows["service grafana"] == (WARNING, "starting")
    assert rows["service frontend"] == (CRITICAL, "unhealthy")
    assert rows["service backend"] == (CRITICAL, "paused")
    assert rows["service redis"] == (OK, "healthy")


def test_a_service_in_the_middle_of_a_deploy_counts_as_its_best_container():
    s = settings()
    lines = [ps_line(x) for x in SERVICES]
    lines.append(ps_line("backend", health_="starting"))
    rows = {r.check: r.status for r in health.service_rows(s, 0, "\n".join(lines), 0.1)}
    assert rows["service backend"] == OK


FAKE_DOCKER = """
case "$1" in
  ps) echo c1; echo c2;;
  inspect) echo "@@c prometheus|running|healthy|0|$PROM_PID|c2|"
           echo "@@c postgres|running|healthy|0|77|c1|$VOLUME";;
  exec) echo "Prometheus Server is Ready.";;
  info) echo /nowhere;;
  *) exit 99;;
esac
"""


@pytest.mark.parametrize("pid", ["0", "4242"])
def test_the_docker_probe_looks_only_at_this_projects_own_containers(tmp_path, pid):
    volume = tmp_path / "volumes" / "pgdata"
    volume.mkdir(parents=True)
    s = settings(compose_project="maicivyprod", root=str(tmp_path),
                 backup={"dir": str(tmp_path / "missing")})
    env = {**fake_path(tmp_path, docker=FAKE_DOCKER, nsenter='echo "ready via nsenter"'),
           "T": str(tmp_path), "PROM_PID": pid, "VOLUME": str(volume)}
    r = run(health.docker_probe(s).command, env)
    assert r.returncode == 0 and r.stderr == ""
    inside = pid != "0" and os.geteuid() == 0
    lines = r.stdout.splitlines()
    assert lines[:3] == ["== services", f"@@c prometheus|running|healthy|0|{pid}|c2|",
                         f"@@c postgres|running|healthy|0|77|c1|{volume}"]
    assert lines[3:] == [
        "== prometheus",
        "ready via nsenter" if inside else "Prometheus Server is Ready.", "@@rc 0",
        "== disk", f"@@path {volume}", f"@@path {tmp_path}", f"@@docker {volume}", "@@df",
    ] + lines[11:] and len(lines) == 11 + 3  # df: its header and two filesystems
    docker_calls = [c for c in calls(tmp_path) if c.startswith("docker ")]
    assert docker_calls[0] == ("docker ps -aq --filter label=com.docker.compose.project="
                               "maicivyprod --filter label=com.docker.compose.oneoff=False")
    assert docker_calls[1].startswith("docker inspect --format @@c ")
    assert docker_calls[1].endswith(" c1 c2")
    assert docker_calls[2:] == ([] if inside else [
        "docker exec c2 wget -q -O - http://127.0.0.1:9090/-/ready"])
    rows = {row.check: (row.status, row.detail) for row in health.docker_rows(
        s, tuple(f"docker:{p}" for p in health.DOCKER_PARTS), 0, r.stdout, 3, 0.05)}
    assert rows["prometheus"] == (OK, "ready")
    assert rows["service postgres"] == (OK, "healthy")
    assert [k for k in rows if k.startswith("disk ")] != []


def test_the_docker_probe_without_containers_says_so(tmp_path):
    s = settings(root=str(tmp_path / "missing"), backup={"dir": str(tmp_path / "missing")})
    env = {**fake_path(tmp_path, docker='[ "$1" = info ] && echo "$T"; true'), "T": str(tmp_path)}
    r = run(health.docker_probe(s).command, env)
    assert r.stdout.splitlines()[:5] == [
        "== services", "", "== prometheus", "no running prometheus container", "@@rc 1"]
    assert r.stdout.splitlines()[5:9] == ["== disk", f"@@path {tmp_path}",
                                          f"@@docker {tmp_path}", "@@df"]


def test_docker_probe_output_gives_prometheus_services_and_disk_rows():
    s = settings(root="/srv/maicivy")
    out = "\n".join(
        ["== services"] + [ps_line(x) for x in SERVICES if x != "prometheus"]
        + [ps_line("prometheus", health_="starting"),
           "== prometheus", "curl: (22) The requested URL returned error: 503",
           "@@rc 22", "== disk"] + DF.splitlines())
    rows = {r.check: (r.status, r.detail)
            for r in health.docker_rows(s, tuple(f"docker:{p}" for p in health.DOCKER_PARTS),
                                        0, out, 3, 0.05)}
    assert rows["prometheus"] == (CRITICAL, "not ready: curl: (22) The requested URL returned "
                                            "error: 503")
    assert rows["service prometheus"] == (WARNING, "starting")
    assert rows["disk /var/backups"][0] == WARNING
    assert len(rows) == 1 + len(SERVICES) + 2


X509 = """serial=0A1B
issuer=CN=Pebble Intermediate CA 7afd1e
subject=CN=maicivy.test
notAfter=Dec 25 12:00:00 2026 GMT"""


@pytest.mark.parametrize("now_days_before,status", [(60, OK), (20, WARNING), (5, CRITICAL)])
def test_certificate_days_left_against_the_thresholds(now_days_before, status):
    from datetime import UTC, datetime

    expiry = datetime(2026, 12, 25, 12, tzinfo=UTC).timestamp()
    row = health.cert_row(settings(), "maicivy.test", 0, X509,
                          expiry - now_days_before * 86400, 5, 0.1)
    assert row.status == status
    assert row.detail.startswith(f"{now_days_before} days left (expires 2026-12-25, Pebble")


def test_no_tls_answer_is_critical():
    row = health.cert_row(settings(), "maicivy.test", 1, "", 0, 5, 0.1)
    assert row.status == CRITICAL and row.detail.startswith("no TLS answer")


DF = """@@path /var/lib/docker
@@path /srv/maicivy
@@path /var/backups/maicivy
@@docker /var/lib/docker
@@df
Filesystem 1024-blocks Used Available Capacity Mounted on
/dev/vda 264212084 23675692 82715220 23% /
/dev/vda 264212084 23675692 82715220 23% /
/dev/vdb 1000000 850000 150000 85% /var/backups"""


def test_disk_rows_one_per_filesystem_with_thresholds():
    s = settings(root="/srv/maicivy")
    rows = health.disk_rows(s, 0, DF, 0.1)
    assert [(r.check, r.status) for r in rows] == [("disk /", OK), ("disk /var/backups", WARNING)]
    assert rows[0].detail == "23% used, 78.9 GiB free (data volume, stack)"
    rows = health.disk_rows(settings(health={"disk_critical_percent": 80,
                                            "disk_warn_percent": 20}), 0, DF, 0.1)
    assert [r.status for r in rows] == [WARNING, CRITICAL]


def test_disk_probe_runs_for_real_here():
    s = settings(root="/tmp", backup={"dir": "/nonexistent-backups"},
                 compose_project="maicivy-no-such-stack")
    probe = health.docker_probe(s, ("disk",))
    rows = health.evaluate(s, [probe], run_script([probe], 20))
    assert rows and all(r.check.startswith("disk /") for r in rows)
    assert "stack" in " ".join(r.detail for r in rows)


def test_overall_status_and_exit_codes():
    rows = [health.Row("a", OK, ""), health.Row("b", WARNING, "")]
    assert health.overall(rows) == WARNING and health.EXIT_CODES[WARNING] == 1
    rows.append(health.Row("c", CRITICAL, ""))
    assert health.overall(rows) == CRITICAL and health.EXIT_CODES[CRITICAL] == 2
    assert health.overall(rows[:1]) == OK and health.EXIT_CODES[OK] == 0


def test_table_is_coloured_only_when_asked_and_json_has_the_exit_code():
    rows = [health.Row("frontend", OK, "HTTP 200", 0.05),
            health.Row("backend /health", CRITICAL, "HTTP 502", 0.04)]
    plain = health.format_table(rows)
    assert "\033[" not in plain and plain.splitlines()[1].startswith("CRIT  backend /health")
    assert "\033[31mCRIT" in health.format_table(rows, colour=True)
    data = json.loads(health.as_json(rows, 0.3, "root@vps"))
    assert data["status"] == CRITICAL and data["exit_code"] == 2
    assert data["checks"][1] == {"check": "backend /health", "status": CRITICAL,
                                 "detail": "HTTP 502", "seconds": 0.04}


def test_a_probe_that_did_not_report_is_critical():
    s = settings()
    rows = health.evaluate(s, [Probe("prometheus", "prometheus", "true")], {})
    assert rows[0].status == CRITICAL


def test_certificate_probe_reads_the_served_certificate_for_real(tmp_path):
    """curl's %{certs} (or the openssl fallback) against a real TLS server here."""
    import socket
    import time

    from conftest import free_port

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "10", "-subj",
                    "/CN=maicivy.test", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem")], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                               str(tmp_path / "c.pem"), "-key", str(tmp_path / "k.pem"),
                               "-www", "-quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "openssl s_server did not start"
                time.sleep(0.1)
        s = settings(publish={"bind": "127.0.0.1", "https": port})
        probe = health.http_probe(s, ["cert_0"])
        [row] = health.evaluate(s, [probe], run_script([probe], 10))
        assert row.status == WARNING  # 10 days < tls.warn_days (21)
        assert row.detail.startswith(("9 days left", "10 days left"))
        assert "maicivy.test), self-signed stand-in" in row.detail
    finally:
        server.terminate()
        server.wait()


def test_curl_certificate_details_become_x509_fields():
    text = """Subject:CN = maicivy.test
Issuer:C = US, O = Pebble, CN = Pebble Intermediate CA 7afd1e
Serial Number:0a1b
Expire date:Dec  4 22:00:28 2026 GMT
-----BEGIN CERTIFICATE-----
-----END CERTIFICATE-----
Subject:CN = Pebble Intermediate CA 7afd1e
Issuer:CN = Pebble Root CA
Expire date:Jan  1 00:00:00 2056 GMT"""
    from fabfile.ssl import parse_x509

    info = parse_x509("maicivy.test", "served", health.curl_certs_to_x509(text), 0)
    assert (info.subject, info.issuer, info.serial) == (
        "maicivy.test", "Pebble Intermediate CA 7afd1e", "0a1b")
    assert info.not_after == "2026-12-04T22:00:28Z"


def test_certificate_transfers_never_resume_a_tls_session():
    # A resumed session sends no certificate: curl's %{certs} would be empty and
    # the check would fail at random (seen with curl 8.14 on Debian 13).
    s = load_settings(environ={}, files=[])
    assert "--no-sessionid" in health.http_probe(s).command
