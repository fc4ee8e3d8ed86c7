"""Pure halves of app, doctor, progress and stream (no server needed)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

from fabfile import app, doctor, progress
from fabfile.config import SERVICES, load_settings
from fabfile.host import Host
from fabfile.stream import INTERRUPTED, stream, watched


def settings(**overrides):
    return load_settings(environ={}, files=[], overrides=overrides)


STATUS = """@@now 1000000
@@c backend|/p-backend-1|running|healthy|reg/backend:v1|sha256:aaa|1970-01-12T13:40:00.123Z|2|0|
@@c backend|/p-backend-2|running|starting|reg/backend:v2|sha256:bbb|1970-01-12T13:46:00Z|0|0|
@@c nginx|/p-nginx-1|running|healthy|nginx:1|sha256:ccc|1970-01-12T13:46:30Z|0|0|\
127.0.0.1:8443->443/tcp 127.0.0.1:8080->80/tcp
@@c redis|/p-redis-1|exited||redis:7|sha256:ddd|1970-01-12T13:00:00Z|5|137|
@@i sha256:aaa|reg/backend@sha256:1111,
@@i sha256:ccc|
@@release 20260101T000000Z
@@lock == exclusive deploy by bob@laptop since 2026-01-01T00:00:00Z pid 42 43
@@maintenance since 2026-01-01T00:00:00Z by bob
"""


def test_status_is_parsed_per_service_best_container_first():
    st = app.parse_status(STATUS, "vps")
    by = {s.service: s for s in st.services}
    assert list(by) == list(SERVICES)
    assert by["backend"].health == "healthy" and by["backend"].digest == "sha256:1111"
    assert by["backend"].containers == ["p-backend-1", "p-backend-2"]
    assert by["backend"].uptime_seconds == 1000000 - 999600 and by["backend"].restarts == 2
    assert by["nginx"].ports == ["127.0.0.1:8443->443/tcp", "127.0.0.1:8080->80/tcp"]
    assert by["redis"].state == "exited" and by["redis"].exit_code == 137 and not by["redis"].ok
    assert by["postgres"].state == "missing"
    assert st.release == "20260101T000000Z" and "bob@laptop" in st.lock
    assert not st.healthy
    text = app.format_status(st)
    assert "exited (137)" in text and "maintenance: ON" in text
    assert text.splitlines()[-1] == "vps: NOT healthy: postgres, redis, frontend, prometheus, " \
        "grafana, node-exporter, alertmanager"


def test_human_durations():
    assert [app.human_duration(x) for x in (None, 5, 65, 3700, 90000)] == \
        ["-", "5s", "1m5s", "1h1m", "1d1h"]


def test_logs_command_streams_through_grep_line_by_line():
    s = settings()
    cmd = app.logs_command(s, ["backend", "nginx"], follow=True, since="10m", grep="a'b")
    assert "logs --no-color --timestamps --follow --since 10m --tail 100 backend nginx" in cmd
    assert cmd.endswith("| grep --line-buffered -E -e 'a'\"'\"'b'")
    assert "--tail all" in app.logs_command(s, [])


def test_unknown_service_is_one_clear_error():
    import pytest

    from fabfile.errors import OpsError

    with pytest.raises(OpsError, match="unknown service 'db'"):
        app._services("backend,db")
    assert app._services(["backend,frontend", "nginx"]) == ["backend", "frontend", "nginx"]


def test_database_shells_take_credentials_from_the_container_environment():
    argv = app.psql_argv("select 1")
    assert argv[:2] == ["sh", "-c"]
    assert 'PGPASSWORD="$POSTGRES_PASSWORD"' in argv[2] and argv[-2:] == ["-c", "select 1"]
    assert 'REDISCLI_AUTH="$REDIS_PASSWORD"' in app.redis_argv("dbsize")[2]
    cmd = app.exec_command(settings(), "postgres", argv, tty=False)
    assert " exec -T postgres sh -c " in cmd


# --- doctor --------------------------------------------------------------------------


PORTS = [
    "p-nginx-1|maicivy|nginx|0.0.0.0:80->80/tcp, :::80->80/tcp, 0.0.0.0:443->443/tcp",
    "redis-x|other|redis|0.0.0.0:6379->6379/tcp, :::6379->6379/tcp",
    "registry|||127.0.0.1:5000->5000/tcp",
    "p-grafana-1|maicivy|grafana|3000/tcp",
]


def test_doctor_names_ports_published_past_ufw():
    s = settings()
    facts = {"ports": PORTS, "ufw": "Status: active"}
    check = doctor.ports_check(s, facts)
    assert check.status == doctor.FAIL
    assert check.detail.endswith("redis-x 0.0.0.0:6379->6379/tcp; redis-x [::]:6379->6379/tcp")
    assert "bypass ufw" in check.fix
    assert doctor.ports_check(s, {"ports": [PORTS[0], PORTS[2]], "ufw": ""}).status == doctor.OK


def test_doctor_env_mode_and_unset_secrets():
    s = settings()
    assert doctor.env_check(s, {"env": "600 root", "unset": []}).status == doctor.OK
    bad = doctor.env_check(s, {"env": "644 root", "unset": ["REDIS_PASSWORD"]})
    assert bad.status == doctor.FAIL and "mode 644" in bad.detail and "REDIS_PASSWORD" in bad.detail
    assert f"chmod 600 {s.env_file}" in bad.fix
    assert doctor.env_check(s, {"unset": []}).status == doctor.FAIL


def test_doctor_stale_lock():
    now = 1_800_000_000.0
    assert doctor.lock_check({}, now).status == doctor.OK
    old = doctor.lock_check({"holder": ["== exclusive a@b since 2026-01-01T00:00:00Z pid 3 4"]},
                            now)
    assert old.status == doctor.WARN and "deploy.unlock" in old.fix and "a@b since" in old.detail
    fresh = doctor.lock_check({"holder": ["== exclusive deploy by x since "
                                          "2027-01-15T07:59:00Z pid 1 2"]}, now)
    assert fresh.status == doctor.OK
    assert doctor.lock_check({"holder": ["== shared backup.postgres by cron"]},
                             now).status == doctor.OK
    left = doctor.lock_check({"ownerfile": "1700000000 bob since T pid 1 2"}, now)
    assert left.status == doctor.WARN and "bob" in left.detail
    journal = ["2026-01-01T00:00:00.000Z abcdef12 started task=deploy by=eve@ci",
               "2026-01-01T00:00:01.000Z abcdef12 step pull and plan"]
    stopped = doctor.lock_check({"journal": journal}, now)
    assert stopped.status == doctor.WARN and "stopped at step 'pull and plan'" in stopped.detail


def test_doctor_clock_and_versions_and_exit_codes():
    assert doctor.clock_check({"ntp": "yes"}, 0.3, 0.1).status == doctor.OK
    assert doctor.clock_check({"ntp": "yes"}, 10, 0.1).status == doctor.WARN
    assert doctor.clock_check({"ntp": ""}, -90, 0.1).status == doctor.FAIL
    checks = doctor.docker_checks({"docker": "20.10.24+dfsg1", "compose": "2.19.0"})
    assert [c.status for c in checks] == [doctor.OK, doctor.FAIL]
    ok = doctor.Check("a", doctor.OK, "")
    warn = doctor.Check("b", doctor.WARN, "", "do x")
    assert doctor.overall([ok]) == "ok" and doctor.overall([ok, warn]) == "warn"
    assert "-> do x" in doctor.format_checks([ok, warn])


def test_doctor_facts_parse():
    text = "\n".join([
        "@@now 1800000000.5", "@@df", "@@path /var/lib/docker",
        "/dev/sda1 100 50 50 50% /", "@@inodes", "/dev/sda1 100 95 5 95% /",
        "@@mem", "MemTotal: 4000000 kB", "MemAvailable: 2000000 kB",
        "@@docker 24.0.7", "@@compose 2.24.0", "@@ntp yes", "@@addresses 10.0.0.5 fe80::1",
        "@@dns a.example 10.0.0.5 ", "@@dns b.example ", "@@ports", PORTS[0], "@@ufw ",
        "@@backup postgres none", "@@env 600 root", "@@unset POSTGRES_DB",
    ])
    facts = doctor.parse_facts(text)
    s = settings()
    disk = doctor.disk_checks(s, facts)
    assert [(c.check, c.status) for c in disk] == [("disk /", "ok"), ("inodes /", "fail")]
    assert doctor.memory_check(facts).status == doctor.OK
    dns = {c.check: c.status for c in doctor.dns_checks(facts)}
    assert dns == {"dns a.example": "ok", "dns b.example": "fail"}
    assert facts["unset"] == ["POSTGRES_DB"]


# --- progress and stream -------------------------------------------------------------


def test_progress_prints_only_step_lines_when_not_a_terminal():
    out = io.StringIO()
    with progress.step("pull images", out=out) as s:
        s.update("3 of 8 layers")
    try:
        with progress.step("backup", out=out):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("pull images: done in ") and lines[0].endswith("s")
    assert lines[1].startswith("backup: failed after ")


def test_watched_command_stops_when_stdin_closes():
    proc = subprocess.Popen(["bash", "-c", watched("echo started; exec sleep 60")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout.readline() == b"started\n"
    start = time.monotonic()
    proc.stdin.close()
    assert proc.wait(timeout=10) != 0
    assert time.monotonic() - start < 5


def test_local_stream_copies_output_and_returns_the_exit_code():
    out, err = io.BytesIO(), io.BytesIO()
    rc = stream(Host(object()), "echo out; echo err >&2; exit 3", out=out, err=err)
    assert (rc, out.getvalue(), err.getvalue()) == (3, b"out\n", b"err\n")


def test_local_stream_ctrl_c_stops_the_command():
    out = io.BytesIO()
    marker = f"sleep 61.{os.getpid()}"

    def interrupt():
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    rc = stream(Host(object()), f"echo go; {marker}", out=out, err=io.BytesIO())
    assert rc == INTERRUPTED and out.getvalue() == b"go\n"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout
        if not left:
            break
        time.sleep(0.1)
    assert not left


# --- deploy --dry-run as a plan ------------------------------------------------------


def test_image_references_are_split_as_the_registry_api_wants():
    from fabfile.deploy.plan import split_ref

    assert split_ref("postgres:15-alpine") == ("registry-1.docker.io", "library/postgres",
                                               "15-alpine")
    assert split_ref("prom/prometheus:v2.53.0") == ("registry-1.docker.io", "prom/prometheus",
                                                    "v2.53.0")
    assert split_ref("127.0.0.1:5000/maicivy/backend") == ("127.0.0.1:5000", "maicivy/backend",
                                                           "latest")
    assert split_ref("ghcr.io/acme/api:1.2") == ("ghcr.io", "acme/api", "1.2")


def test_plan_rows_say_what_would_happen_to_each_service():
    from fabfile.deploy.plan import format_plan, plan_rows

    s = settings(images={"backend": "reg:5000/app/backend:v2"})
    ref = {svc: s.image(svc) for svc in SERVICES}
    lines = ["== containers"]
    for svc in SERVICES:
        r = "reg:5000/app/backend:v1" if svc == "backend" else ref[svc]
        lines.append(f"id{svc}|/p-{svc}-1|{svc}|h|img-{svc}|{r}|running|healthy|2026")
    lines.append("@@image img-backend reg:5000/app/backend@sha256:aaa")
    lines.append(f"@@image img-redis {ref['redis'].split(':')[0]}@sha256:old")
    lines.append("@@remote reg:5000/app/backend:v2 sha256:bbb")
    lines.append(f"@@remote {ref['redis']} sha256:new")
    lines.append(f"@@remote {ref['grafana']} ?HTTP 401")
    rows = {r.service: r for r in plan_rows(s, "\n".join(lines), "services: {}\n",
                                            "services: {}\n", ["docker/nginx/nginx.conf"])}
    assert rows["backend"].action == "replace beside the old"
    assert rows["backend"].now == "reg:5000/app/backend:v1@aaa"
    assert rows["backend"].then == "reg:5000/app/backend:v2@bbb"
    assert rows["redis"].action == "recreate" and "newer image" in rows["redis"].why
    assert rows["nginx"].action == "reload"
    assert rows["postgres"].action == "nothing"
    assert rows["grafana"].action == "nothing" and rows["grafana"].then.endswith("(HTTP 401)")
    table = format_plan(list(rows.values())).splitlines()
    assert table[0].split() == ["SERVICE", "RUNNING", "NOW", "REGISTRY", "NOW", "WOULD"]
    assert table[1].split()[2] == "->"


def test_progress_on_a_terminal_shows_a_live_line_then_the_step_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with progress.step("health gate", out=out) as s:
        s.update("2 of 8 healthy")
        s.failed = True
    text = out.getvalue()
    assert "\r\033[Khealth gate: 2 of 8 healthy (0s)" in text
    assert text.endswith("\r\033[Khealth gate: failed after 0.0s\n")


# --- doctor's facts script, run for real with fake tools ----------------------------------


def test_doctor_facts_script_gathers_every_fact_with_fake_tools(tmp_path):
    from fake_tools import fake_path, run

    root, backups = tmp_path / "srv", tmp_path / "backups"
    s = settings(root=str(root), domain="maicivy.test", grafana_domain="grafana.maicivy.test",
                 backup={"dir": str(backups)})
    (backups / "postgres").mkdir(parents=True)
    (backups / "postgres" / "p1.json").write_text('{"offsite": {"key": "x"}}\n')
    (root / "state").mkdir(parents=True)
    root.joinpath(".env").write_text('POSTGRES_PASSWORD="pw"\nREDIS_PASSWORD=CHANGE_ME\n'
                                     "POSTGRES_USER=app\nPOSTGRES_DB=\n")
    os.chmod(root / ".env", 0o600)
    env = fake_path(
        tmp_path,
        docker=f"""case "$1 $2" in
  "info --format") echo {tmp_path};;
  "version --format") echo 27.3.1;;
  "compose version") echo 2.29.7;;
  "ps --format") echo 'p-nginx-1|maicivy|nginx|0.0.0.0:443->443/tcp';;
  *) exit 1;;
esac""",
        timedatectl="echo yes", hostname="echo 203.0.113.5 2001:db8::5",
        getent='echo "203.0.113.5     STREAM $2"; echo "203.0.113.5     DGRAM"',
        ufw="echo 'Status: active'; echo; echo 'To Action From'")
    r = run(doctor.facts_command(s), env)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("@@now ") and lines[1] == "@@df"
    assert lines[2:5] == [f"@@path {tmp_path}", f"@@path {root}", f"@@path {backups}"]
    for line in ("@@docker 27.3.1", "@@compose 2.29.7", "@@ntp yes",
                 "@@addresses 203.0.113.5 2001:db8::5", "@@dns maicivy.test 203.0.113.5 ",
                 "@@dns grafana.maicivy.test 203.0.113.5 ", "@@ports",
                 "p-nginx-1|maicivy|nginx|0.0.0.0:443->443/tcp", "@@ufw Status: active",
                 "@@cert maicivy.test", "@@cert grafana.maicivy.test",
                 "@@backup redis none", f"@@env 600 {os.environ.get('USER') or 'root'}",
                 "@@unset REDIS_PASSWORD", "@@unset POSTGRES_DB", "@@journal"):
        assert line in lines, line
    backup = [ln for ln in lines if ln.startswith("@@backup postgres ")]
    assert backup[0].split()[3:] == ["1", f"{backups}/postgres/p1.json"]
    facts = doctor.parse_facts(r.stdout)
    assert facts["paths"] == [str(tmp_path), str(root), str(backups)]
    assert len(facts["df"]) == 3 and len(facts["inodes"]) == 3
    assert facts["mem"]["MemTotal"] > 0 and facts["unset"] == [
        "REDIS_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "POSTGRES_DB"]
    assert facts["holder"] == [] and facts["journal"] == []


def test_doctor_facts_script_without_docker_or_env_file(tmp_path):
    from fake_tools import fake_path, run

    s = settings(root=str(tmp_path / "none"), backup={"dir": str(tmp_path / "none2")})
    env = fake_path(tmp_path, docker="exit 1", timedatectl="exit 1", ufw="exit 1")
    r = run(doctor.facts_command(s), env)
    assert r.returncode == 0
    facts = doctor.parse_facts(r.stdout)
    assert facts["paths"] == [] and facts["docker"] == "" and facts["compose"] == ""
    assert facts["env"] == "missing" and facts["backups"] == {"postgres": ["none"],
                                                              "redis": ["none"]}


# --- app's server scripts, run for real with fake tools ------------------------------------


def test_status_script_reads_containers_images_release_lock_and_flag(tmp_path):
    from fake_tools import calls, fake_path, run

    s = settings(root=str(tmp_path), compose_project="maicivyprod")
    (tmp_path / ".deploy").mkdir()
    (tmp_path / ".deploy/current").write_text("20260101T000000Z\n")
    flag = tmp_path / "docker/nginx/maintenance/on"
    flag.parent.mkdir(parents=True)
    flag.write_text("since 2026-01-01T00:00:00Z by bob\nsecond line\n")
    env = fake_path(tmp_path, docker="""case "$1 $2 $3" in
  "ps -aq --filter") echo c1; echo c2;;
  "inspect --format @@c"*)
    echo "@@c backend|/p-backend-1|running|healthy|reg/backend:v1|sha256:aaa|T|0|0|"
    echo "@@c nginx|/p-nginx-1|running|healthy|nginx:1|sha256:ccc|T|0|0|";;
  "inspect --format {{.Image}}") echo sha256:ccc; echo sha256:aaa; echo sha256:aaa;;
  "image inspect --format") echo "@@i $5|";;
  *) exit 99;;
esac""")
    r = run(app.status_command(s), env)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("@@now ") and lines[1:] == [
        "@@c backend|/p-backend-1|running|healthy|reg/backend:v1|sha256:aaa|T|0|0|",
        "@@c nginx|/p-nginx-1|running|healthy|nginx:1|sha256:ccc|T|0|0|",
        "@@i sha256:aaa|", "@@i sha256:ccc|",
        "@@release 20260101T000000Z",
        "@@maintenance since 2026-01-01T00:00:00Z by bob"]
    assert calls(tmp_path)[0] == ("docker ps -aq --filter label=com.docker.compose.project="
                                  "maicivyprod --filter label=com.docker.compose.oneoff=False")
    st = app.parse_status(r.stdout, "vps")
    assert st.maintenance == "since 2026-01-01T00:00:00Z by bob"


def test_status_script_with_no_containers(tmp_path):
    from fake_tools import calls, fake_path, run

    s = settings(root=str(tmp_path))
    r = run(app.status_command(s), fake_path(tmp_path, docker="true"))
    assert r.returncode == 0 and r.stdout.splitlines()[1:] == ["@@release "]
    assert len(calls(tmp_path)) == 1


WAIT_DOCKER = """case "$1" in
  compose) [ -n "${CONTAINER:-}" ] && echo "$CONTAINER";;
  inspect) echo "$STATE";;
esac"""


def test_wait_healthy_says_the_state_it_ended_on(tmp_path):
    from fake_tools import calls, fake_path, run

    s = settings(compose_project="maicivyprod")
    env = fake_path(tmp_path, docker=WAIT_DOCKER)
    cases = [({"CONTAINER": "c1", "STATE": "running healthy"}, 0, "== status running healthy"),
             ({"CONTAINER": "c1", "STATE": "running none"}, 0, "== status running none"),
             ({"CONTAINER": "c1", "STATE": "running unhealthy"}, 4,
              "== status running unhealthy"),
             ({"CONTAINER": "c1", "STATE": "exited 0"}, 4, "== status exited 0"),
             ({"STATE": ""}, 5, "== status no container (timed out)")]
    for extra, code, line in cases:
        r = run(app.wait_healthy_cmd(s, "redis", 0), {**env, **extra})
        assert (r.returncode, r.stdout.splitlines()) == (code, [line])
    assert calls(tmp_path)[0] == (f"docker compose --project-name maicivyprod --env-file "
                                  f"{s.env_file} -f {s.compose_file} ps -q redis")


def test_probe_site_reads_the_status_code_and_retry_after(tmp_path):
    from fake_tools import calls, fake_path, run

    s = settings(domain="maicivy.test", publish={"bind": "::", "https": 8443})
    curl = """case "$*" in
  *" -D - "*) printf 'HTTP/2 503\\r\\nretry-after: 120\\r\\ncontent-type: text/html\\r\\n\\r\\n';;
  *) printf 200;;
esac"""
    r = run(app.probe_site_cmd(s), fake_path(tmp_path, curl=curl))
    assert r.stdout.splitlines() == ["site 503 120", "health 200"]
    assert calls(tmp_path) == [
        "curl -sk -o /dev/null -D - --max-time 10 --resolve maicivy.test:8443:[::1] "
        "https://maicivy.test:8443/",
        "curl -sk -o /dev/null -w %{http_code} --max-time 10 --resolve "
        "maicivy.test:8443:[::1] https://maicivy.test:8443/health"]
    r = run(app.probe_site_cmd(s), fake_path(tmp_path, curl="exit 7"))
    assert r.stdout.splitlines() == ["site 000 -", "health "]
