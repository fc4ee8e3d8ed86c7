"""deploy's pure half: the parsing of what the server says, the plan, the deploy
log -- and every server script (fabfile/deploy/*.sh) run for real by a local
bash with fake ``docker``/``curl`` on PATH (no SSH, no Docker)."""

from __future__ import annotations

import subprocess
import tarfile

import pytest

from fabfile.config import SERVICES, load_settings
from fabfile.deploy.diagnose import parse_diagnoses
from fabfile.deploy.history import history_table, log_line, parse_log_line
from fabfile.deploy.proof import gate_failures
from fabfile.deploy.release import (
    Container,
    parse_images,
    parse_plan,
    parse_state,
    reloads_for,
)
from fabfile.deploy.scripts import (
    deploy_report_script,
    diagnose_script,
    gate_script,
    plan_script,
    probe_script,
    record_script,
    restore_script,
    scale_up_cmd,
    state_script,
    swap_cmd,
)
from fabfile.errors import OpsError
from fabfile.shell import sections


def settings(tmp_path=None, **extra):
    over = {"root": str(tmp_path / "srv") if tmp_path else "/opt/maicivy", **extra}
    return load_settings(invoke_section=over, environ={}, files=[])


def container_line(cid, service, h="h", image="sha256:new", state="running", health="healthy",
                   created="2026-11-25T10:00:00Z", ref="ref"):
    return f"{cid}|/p-{service}-1|{service}|{h}|{image}|{ref}|{state}|{health}|{created}"


def plan_output(containers, hashes=None, images=None):
    hashes = hashes or {s: "h" for s in SERVICES}
    images = images or {"ref": "sha256:new"}
    lines = ["== hashes", *(f"{s} {h}" for s, h in hashes.items()), "== images",
             *(f"{r} {i}" for r, i in images.items()), "== containers", *containers]
    return "\n".join(lines) + "\n"


REFS = {s: "ref" for s in SERVICES}


def test_sections_split_marked_output():
    text = "noise\n== a\n1\n2\n== b x\n\n== c\n"
    assert sections(text) == {"a": ["1", "2"], "b": ["x"], "c": []}


def test_parse_state_busy_hashes_current_and_unset_names():
    text = ("== locked\n== hashes\nabc  docker/x.yml\n== current\n20261125T100000Z\n"
            "== releases\n20261125T100000Z\n20261124T090000Z\njunk\n== unset\nREDIS_PASSWORD\n"
            "== ready\n")
    st = parse_state(text)
    assert st.busy is None
    assert st.hashes == {"docker/x.yml": "abc"}
    assert st.current == "20261125T100000Z"
    assert st.releases == ["20261124T090000Z", "20261125T100000Z"]
    assert st.unset == ["REDIS_PASSWORD"]
    busy = parse_state("== busy\nalice@laptop since 2026-11-25T10:00:00Z pid 42\n")
    assert busy.busy.startswith("alice@laptop since")


def test_plan_nothing_to_do_when_every_service_runs_the_wanted_config_and_image():
    lines = [container_line(f"id{i}", s) for i, s in enumerate(SERVICES)]
    plan = parse_plan(plan_output(lines), REFS)
    assert plan.unchanged


def test_plan_replaces_backend_beside_the_old_one_and_recreates_others():
    lines = [container_line(f"id{i}", s) for i, s in enumerate(SERVICES)]
    hashes = {s: "h" for s in SERVICES}
    hashes["backend"] = "h2"  # config changed
    hashes["redis"] = "h2"
    plan = parse_plan(plan_output(lines, hashes), REFS)
    assert plan.rolling == ["backend"]
    assert plan.recreate == ["redis"]
    assert [c.id for c in plan.stale("backend")] == [f"id{SERVICES.index('backend')}"]


def test_plan_sees_a_new_image_behind_the_same_tag():
    lines = [container_line(f"id{i}", s, image="sha256:old" if s == "frontend" else "sha256:new")
             for i, s in enumerate(SERVICES)]
    plan = parse_plan(plan_output(lines), REFS)
    assert plan.rolling == ["frontend"] and plan.recreate == []


def test_plan_first_deploy_uses_compose_up_for_everything():
    plan = parse_plan(plan_output([]), REFS)
    assert plan.rolling == [] and plan.recreate == list(SERVICES)


def test_plan_after_an_interrupted_swap_keeps_the_good_container():
    lines = [container_line(f"id{i}", s) for i, s in enumerate(SERVICES)]
    lines.append(container_line("old", "backend", image="sha256:old",
                                created="2026-11-25T09:00:00Z"))
    plan = parse_plan(plan_output(lines), REFS)
    assert plan.rolling == ["backend"]
    assert [c.id for c in plan.good("backend")] != []
    assert [c.id for c in plan.stale("backend")] == ["old"]
    assert plan.running_images()["backend"] == ("ref", "sha256:old")  # oldest first


def test_plan_refuses_an_image_the_pull_did_not_bring():
    with pytest.raises(OpsError, match="not on the server after the pull"):
        parse_plan(plan_output([], images={"ref": "missing"}), REFS)


def test_gate_reports_unhealthy_services_and_http_errors():
    lines = [container_line(f"id{i}", s) for i, s in enumerate(SERVICES)]
    ok = "== containers\n" + "\n".join(lines) + "\n== http\n/health 200\n/ 200\n"
    assert gate_failures(ok) == []
    lines[2] = container_line("x", SERVICES[2], health="unhealthy")
    bad = ("== containers\n" + "\n".join(lines[:-1]) + "\n== http\n/health 502\n"
           "/health/deep 000\n")
    problems = gate_failures(bad)
    assert f"{SERVICES[2]}: unhealthy" in problems
    assert f"{SERVICES[-1]}: no container" in problems
    assert "GET /health through nginx: HTTP 502" in problems
    assert "GET /health/deep through nginx: HTTP 000" in problems


def test_reloads_follow_the_files_each_service_mounts():
    assert reloads_for(["docker/nginx/nginx.conf", "systemd/maicivy.service"]) == ["nginx"]
    assert reloads_for(["monitoring/prometheus/alerts.yml"]) == ["prometheus"]
    assert reloads_for(["docker/docker-compose.prod.yml"]) == []


def test_log_line_names_time_user_result_release_and_images():
    line = log_line("2026-11-25T10:00:00Z", "alice@laptop", "ok", "20261125T100000Z",
                    {"backend": ("reg/backend:v2", "sha256:" + "a" * 64)}, "detail x")
    assert line == ('2026-11-25T10:00:00Z user=alice@laptop result=ok release=20261125T100000Z '
                    'images=backend=reg/backend:v2@aaaaaaaaaaaa detail="detail x"')


def test_diagnosis_of_a_failed_container_keeps_health_log_logs_and_a_short_form():
    import json as _json

    health = [{"Start": "2026-11-29T10:00:01.1Z", "End": "2026-11-29T10:00:01.2Z",
               "ExitCode": 1, "Output": "curl: (22) The requested URL returned error: 500\n"}]
    text = "\n".join([
        "== status running unhealthy", "== diag /p-backend-3", "== exit running 0 false",
        "== health-log", _json.dumps(health), "== logs",
        "| Traceback (most recent call last):", '|   File "/app/x.py", line 3, in f',
        "| ConnectionRefusedError: no database", "| 10.0.0.1 GET /health 500", "== end-diag"])
    (d,) = parse_diagnoses(text)
    assert d.name == "p-backend-3" and d.state == "running" and not d.oom
    assert d.health == ["10:00:01: exit 1: curl: (22) The requested URL returned error: 500"]
    assert d.logs[0] == "Traceback (most recent call last):"
    assert "log: ConnectionRefusedError: no database" in d.short
    assert "health check: exit 1: curl: (22)" in d.short
    oom = parse_diagnoses("== diag /p-x-1\n== exit exited 137 true\n== health-log\n== logs\n"
                          "== end-diag\n")[0]
    assert oom.short == "out of memory (OOMKilled)" and "exit code 137" in oom.lines[0]


def test_image_tags_from_the_command_line():
    from fabfile.deploy.tasks import with_tag, with_tags

    assert with_tag("127.0.0.1:5000/maicivy/backend:v1", "sha-abc") == \
        "127.0.0.1:5000/maicivy/backend:sha-abc"
    assert with_tag("ghcr.io/acme/app@sha256:00", "v2") == "ghcr.io/acme/app:v2"
    assert with_tag("localhost:5000/app", "v3") == "localhost:5000/app:v3"
    s = settings()
    t = with_tags(s, {"backend": "sha-1", "frontend": ""})
    assert t.image("backend").endswith(":sha-1") and t.image("frontend") == s.image("frontend")
    for bad in ("-x", "a b", "x;id", "a" * 129, "$(id)"):
        with pytest.raises(OpsError, match="--backend-tag must be an image tag"):
            with_tags(s, {"backend": bad})


def test_history_table_and_json_entries_from_the_log():
    line = log_line("2026-11-29T10:00:00Z", "alice@laptop", "rolled-back", "20261129T100000Z",
                    {"backend": ("r/maicivy/backend:sha-1", "sha256:" + "a" * 64),
                     "frontend": ("r/maicivy/frontend:v2", "sha256:" + "b" * 64)},
                    "health gate: backend: unhealthy")
    e = parse_log_line(line)
    assert e["result"] == "rolled-back" and e["release"] == "20261129T100000Z"
    assert e["images"]["backend"] == {"ref": "r/maicivy/backend:sha-1", "id": "a" * 12}
    assert e["detail"] == "health gate: backend: unhealthy"
    assert parse_log_line("garbage") is None
    signed = parse_log_line(line + " server_user=root sudo_user=- ssh_from=10.0.0.9:5022")
    assert signed["detail"] == "health gate: backend: unhealthy"
    assert (signed["server_user"], signed["ssh_from"]) == ("root", "10.0.0.9:5022")
    plain = parse_log_line("2026-11-29T10:00:00Z user=a@b result=unchanged release=- "
                           "images=- server_user=root sudo_user=bob ssh_from=-")
    assert plain["sudo_user"] == "bob" and plain["images"] == {} and plain["release"] == ""
    table = history_table([e]).splitlines()
    assert table[0].split() == ["TIME", "RESULT", "RELEASE", "USER", "BACKEND", "FRONTEND",
                                "DETAIL"]
    assert table[1].split()[:6] == ["2026-11-29T10:00:00Z", "rolled-back", "20261129T100000Z",
                                    "alice@laptop", "sha-1", "v2"]


# --- the server scripts, run for real with fake tools on PATH ----------------------------


def fake_tools(tmp_path, **bodies):
    """A bin directory of fake tools: each appends ``NAME ARGS`` to $LOG, then runs its body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> "$LOG"\n{body}\n')
        path.chmod(0o755)
    return bin_dir


def sh(command, tmp_path, bin_dir=None, **env):
    """Run a command line as the server would (bash), fake tools first on PATH."""
    path = f"{bin_dir}:/usr/bin:/bin" if bin_dir else "/usr/bin:/bin"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "LOG": str(tmp_path / "log"), "HOME": str(tmp_path),
                               **env})


def calls(tmp_path) -> list[str]:
    log = tmp_path / "log"
    return log.read_text().splitlines() if log.exists() else []


def digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_state_report_snapshots_the_files_and_keeps_an_interrupted_attempts_base(tmp_path):
    import re

    s = settings(tmp_path)
    root, d = tmp_path / "srv", tmp_path / "srv/.deploy"
    (root / "docker").mkdir(parents=True)
    (root / "docker/a.conf").write_text("a\n")
    (root / ".env").write_text("POSTGRES_PASSWORD=\nREDIS_PASSWORD=CHANGE_ME\nPOSTGRES_USER=u\n")
    (d / "releases/20261125T100000Z").mkdir(parents=True)
    (d / "releases/junk").mkdir()
    (d / "current").write_text("20261125T100000Z\n")
    (d / "pre").mkdir()
    managed = [f"{root}/docker/a.conf", f"{root}/docker/missing.conf"]
    proc = sh(deploy_report_script(s, managed), tmp_path, T="abcdef0123456789")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    st = parse_state(proc.stdout)
    assert re.fullmatch(r"\d{8}T\d{6}Z-abcdef01", st.base) and not st.base_interrupted
    assert st.hashes == {"docker/a.conf": digest("a\n")}
    assert (st.current, st.releases) == ("20261125T100000Z", ["20261125T100000Z"])
    assert st.unset == ["POSTGRES_PASSWORD", "REDIS_PASSWORD"]
    with tarfile.open(d / f"attempts/{st.base}/files.tar") as tar:
        assert tar.getnames() == ["docker/a.conf"]
    assert (d / "attempt").read_text() == st.base + "\n" and not (d / "pre").exists()
    # The deploy dies: the next one keeps its snapshot (taken before it changed anything).
    (root / "docker/a.conf").write_text("half-deployed\n")
    (d / f"attempts/{st.base}/images").write_text("backend reg/b:1 sha256:1\n")
    again = parse_state(sh(deploy_report_script(s, managed), tmp_path, T="99").stdout)
    assert (again.base, again.base_interrupted) == (st.base, True)
    assert again.base_images == {"backend": ("reg/b:1", "sha256:1")}
    # It ended: a new snapshot, and only the newest attempts are kept (KEEP_ATTEMPTS = 5).
    (d / "attempt").unlink()
    for i in range(6):
        (d / f"attempts/2026010{i}T000000Z-old").mkdir()
    fresh = parse_state(sh(deploy_report_script(s, managed), tmp_path, T="12345678").stdout)
    assert fresh.base != st.base and not fresh.base_interrupted
    kept = sorted(p.name for p in (d / "attempts").iterdir())
    assert len(kept) == 5 and fresh.base in kept and st.base in kept
    assert kept[:3] == ["20260103T000000Z-old", "20260104T000000Z-old", "20260105T000000Z-old"]


def test_state_probe_says_who_holds_the_lock_and_the_state_names_a_missing_env(tmp_path):
    import fcntl

    s = settings(tmp_path)
    d = tmp_path / "srv/.deploy"
    d.mkdir(parents=True)
    (d / "lock.owner").write_text("deploy by alice@laptop since T pid 12 13\n")
    out = sh(probe_script(s, []), tmp_path).stdout
    assert "== busy" not in out and out.endswith("== ready\n")
    assert parse_state(out).unset == [".env"]
    with open(d / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = parse_state(sh(probe_script(s, []), tmp_path).stdout)
    assert busy.busy == "deploy by alice@laptop since T"
    state = sh(state_script(s), tmp_path).stdout
    assert sections(state) == {"hashes": [], "current": [], "releases": [], "unset": [".env"]}


DOCKER_PLAN = r'''
case "$*" in
  *" config --hash "*) [ -z "${FAIL_HASH:-}" ] || exit 1; printf 'backend h1\nnginx h2\n';;
  *" pull --quiet") ;;
  "ps "*) printf 'c1\n';;
  "inspect "*) echo 'c1|/maicivy-backend-1|backend|h1|sha256:b|reg/b:1|running|healthy|T';;
  "image inspect "*) [ "${!#}" = reg/b:1 ] || exit 1; echo sha256:b;;
  "login "*) cat >> "$LOG.stdin"; printf '\n' >> "$LOG.stdin"
    [ -z "${FAIL_LOGIN:-}" ] || { echo 'WARNING! insecure' >&2; echo 'denied: bad' >&2; exit 1; };;
esac
'''

CURL_HEALTH = r'''
for a; do last=$a; done
case "$last" in */health/deep) printf 502;; *) printf 200;; esac
'''


def test_gate_reads_the_containers_and_the_health_urls_through_nginx(tmp_path):
    s = settings(tmp_path)
    bin_dir = fake_tools(tmp_path, docker=DOCKER_PLAN, curl=CURL_HEALTH)
    proc = sh(gate_script(s), tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    sec = sections(proc.stdout)
    assert sec["containers"] == ["c1|/maicivy-backend-1|backend|h1|sha256:b|reg/b:1|running|"
                                 "healthy|T"]
    assert sorted(sec["http"]) == ["/ 200", "/health 200", "/health/deep 502"]
    assert gate_failures(proc.stdout, ["backend"]) == [
        "GET /health/deep through nginx: HTTP 502"]
    curl = [c for c in calls(tmp_path) if c.startswith("curl ")]
    assert ("curl -sk -o /dev/null -w %{http_code} --max-time 5 -H X-Maicivy-Check: health "
            "--resolve maicivy.example.com:443:127.0.0.1 https://maicivy.example.com:443/health"
            ) in curl


def test_plan_reads_hashes_images_and_containers_and_pulls_only_when_asked(tmp_path):
    s = settings(tmp_path)
    bin_dir = fake_tools(tmp_path, docker=DOCKER_PLAN, curl=CURL_HEALTH)
    refs = {"backend": "reg/b:1", "nginx": "nginx:gone"}
    proc = sh(plan_script(s, refs, pull=False, http=True), tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    sec = sections(proc.stdout)
    assert sec["hashes"] == ["backend h1", "nginx h2"]
    assert sorted(sec["images"]) == ["nginx:gone missing", "reg/b:1 sha256:b"]
    assert len(sec["containers"]) == 1 and len(sec["http"]) == 3
    assert not any(" pull " in c or c.startswith("docker login") for c in calls(tmp_path))
    (tmp_path / "log").unlink()
    proc = sh(plan_script(s, refs, pull=True), tmp_path, bin_dir)
    assert proc.returncode == 0 and "http" not in sections(proc.stdout)
    assert (f"docker compose --project-name maicivy --env-file {tmp_path}/srv/.env -f "
            f"{tmp_path}/srv/docker/docker-compose.prod.yml pull --quiet") in calls(tmp_path)
    failed = sh(plan_script(s, refs, pull=False), tmp_path, bin_dir, FAIL_HASH="1")
    assert failed.returncode == 1
    assert failed.stderr == "docker compose config --hash failed\n"


def test_plan_logs_in_with_the_password_on_stdin_only(tmp_path):
    password = "s3cret 'with' $pecial \"chars\""
    s = settings(tmp_path, images={"backend": "ghcr.io/acme/backend:1",
                                   "frontend": "127.0.0.1:5000/x:1"})
    (tmp_path / "srv").mkdir()
    env = tmp_path / "srv/.env"
    env.write_text(f"REGISTRY_USERNAME=deployer\nREGISTRY_PASSWORD='{password}'\n")
    bin_dir = fake_tools(tmp_path, docker=DOCKER_PLAN)
    command = plan_script(s, {"backend": "reg/b:1"}, pull=True)
    proc = sh(command, tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    logins = [c for c in calls(tmp_path) if c.startswith("docker login")]
    assert logins == ["docker login --username deployer --password-stdin 127.0.0.1:5000",
                      "docker login --username deployer --password-stdin ghcr.io"]
    assert (tmp_path / "log.stdin").read_text().splitlines() == [password, password]
    assert password not in command and password not in proc.stdout + proc.stderr
    # A refused login: one line naming the registry and the reason, exit 3.
    refused = sh(command, tmp_path, bin_dir, FAIL_LOGIN="1")
    assert refused.returncode == 3
    assert refused.stdout.splitlines() == ["== login-failed 127.0.0.1:5000: denied: bad"]
    # No credentials: no login at all.
    env.write_text("REGISTRY_USERNAME=\nREGISTRY_PASSWORD=\n")
    (tmp_path / "log").unlink()
    assert sh(command, tmp_path, bin_dir).returncode == 0
    assert not any(c.startswith("docker login") for c in calls(tmp_path))


DOCKER_CONTAINERS = r'''
case "$*" in
  "compose "*) ;;
  "ps "*) printf '%s\n' $IDS;;
  "inspect --format {{.Id}} "*) printf 'old1 running healthy\nnew1 exited none\n';;
  "inspect --format {{.Name}} "*) echo /maicivy-backend-2;;
  *ExitCode*) echo 'exited 3 false';;
  *"json .State.Health.Log"*)
    echo '[{"End":"2026-11-29T10:00:01.2Z","ExitCode":1,"Output":"500"}]';;
  *Aliases*) echo 'backend maicivy-backend-2 ';;
  *State.Status*) echo "$STATUS";;
  "logs "*) printf 'starting\nConnectionRefusedError: no database\n';;
esac
'''


def scale_up(tmp_path, status, timeout=20, ids="old1 new1"):
    bin_dir = fake_tools(tmp_path, docker=DOCKER_CONTAINERS, sleep="")
    return sh(scale_up_cmd(settings(), "backend", 2, timeout, ["old1"]), tmp_path, bin_dir,
              STATUS=status, IDS=ids)


def test_scale_up_keeps_the_new_container_off_nginx_until_it_is_healthy(tmp_path):
    proc = scale_up(tmp_path, "running healthy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["== new new1 maicivy-backend-2",
                                        "== status running healthy"]
    log = calls(tmp_path)
    assert log[0] == ("docker compose --project-name maicivy --env-file /opt/maicivy/.env -f "
                      "/opt/maicivy/docker/docker-compose.prod.yml up --no-start --no-deps "
                      "--no-recreate --scale backend=2 backend")
    network = [c for c in log if c.startswith(("docker network", "docker start"))]
    assert network == ["docker network disconnect maicivy_edge new1", "docker start new1",
                       "docker network connect --alias backend --alias maicivy-backend-2 "
                       "maicivy_edge new1"]


def test_scale_up_of_a_failing_container_prints_its_diagnosis(tmp_path):
    proc = scale_up(tmp_path, "running unhealthy")
    assert proc.returncode == 4
    assert proc.stdout.splitlines()[:3] == ["== new new1 maicivy-backend-2",
                                            "== status running unhealthy",
                                            "== diag /maicivy-backend-2"]
    (d,) = parse_diagnoses(proc.stdout)
    assert (d.name, d.state, d.exit_code) == ("maicivy-backend-2", "exited", "3")
    assert d.health == ["10:00:01: exit 1: 500"]
    assert d.logs == ["starting", "ConnectionRefusedError: no database"]
    assert not any(c.startswith("docker network connect") for c in calls(tmp_path))


def test_scale_up_times_out_or_finds_no_new_container(tmp_path):
    slow = scale_up(tmp_path, "running starting", timeout=0)
    assert slow.returncode == 5
    assert "== status running starting (timed out)" in slow.stdout.splitlines()
    assert parse_diagnoses(slow.stdout)[0].name == "maicivy-backend-2"
    none = scale_up(tmp_path, "running healthy", ids="old1")
    assert none.returncode == 3 and none.stdout == "== status no new container\n"


def test_diagnose_questions_only_the_containers_that_are_not_healthy(tmp_path):
    bin_dir = fake_tools(tmp_path, docker=DOCKER_CONTAINERS)
    proc = sh(diagnose_script(settings()), tmp_path, bin_dir, IDS="old1 new1", STATUS="")
    assert proc.returncode == 0, proc.stderr
    assert len(parse_diagnoses(proc.stdout)) == 1
    assert [c for c in calls(tmp_path) if c.startswith("docker logs")] == [
        "docker logs --tail 30 new1"]


DOCKER_SWAP = r'''case "$*" in *" ps -q nginx") echo N1;; esac'''
COMPOSE = ("docker compose --project-name maicivy --env-file /opt/maicivy/.env -f "
           "/opt/maicivy/docker/docker-compose.prod.yml")


def test_swap_reloads_nginx_before_and_after_retiring_the_old_container(tmp_path):
    old = [Container("abc", "/p-backend-1", "backend", "h", "i", "r", "running", "healthy")]
    bin_dir = fake_tools(tmp_path, docker=DOCKER_SWAP, sleep="")
    proc = sh(swap_cmd(settings(), old), tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    reload = ["docker exec N1 nginx -t -q", "docker exec N1 nginx -s reload"]
    assert calls(tmp_path) == [f"{COMPOSE} ps -q nginx", *reload, "sleep 1",
                               "docker stop -t 30 abc", *reload, "docker rm -f abc"]


def test_swap_removes_an_unhealthy_container_before_nginx_can_see_it(tmp_path):
    old = [Container("bad", "/p-backend-2", "backend", "h", "i", "r", "running", "unhealthy")]
    bin_dir = fake_tools(tmp_path, docker=DOCKER_SWAP, sleep="")
    assert sh(swap_cmd(settings(), old), tmp_path, bin_dir).returncode == 0
    assert calls(tmp_path) == [f"{COMPOSE} ps -q nginx", "docker rm -f bad",
                               "docker exec N1 nginx -t -q", "docker exec N1 nginx -s reload"]


def test_restore_script_puts_back_files_and_removes_added_ones(tmp_path):
    s = settings(tmp_path)
    root = tmp_path / "srv"
    (root / "docker").mkdir(parents=True)
    (root / "docker/a.conf").write_text("old\n")
    (root / "docker/same.conf").write_text("same\n")
    snap = tmp_path / "snap.tar"
    with tarfile.open(snap, "w") as tar:
        tar.add(root / "docker/a.conf", arcname="docker/a.conf")
        tar.add(root / "docker/same.conf", arcname="docker/same.conf")
    (root / "docker/a.conf").write_text("new\n")
    (root / "docker/added.conf").write_text("x\n")
    inode = (root / "docker/same.conf").stat().st_ino
    managed = [f"{root}/docker/a.conf", f"{root}/docker/added.conf", f"{root}/docker/same.conf"]
    bin_dir = fake_tools(tmp_path, docker="")
    proc = sh(restore_script(s, str(snap), managed, {"backend": ("reg/b:1", "sha256:1")}),
              tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert (root / "docker/a.conf").read_text() == "old\n"
    assert not (root / "docker/added.conf").exists()
    assert (root / "docker/same.conf").stat().st_ino == inode  # not extracted again
    assert sorted(sections(proc.stdout)["changed"]) == ["docker/a.conf", "docker/added.conf"]
    assert calls(tmp_path) == ["docker tag sha256:1 reg/b:1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "log", "snap.tar", "srv"]


DOCKER_RECORD = r'''
case "$*" in
  "images --format "*) printf '%s\n' maicivy-release/backend:20261120T000000Z \
    maicivy-release/backend:20261122T000000Z other/x:20261120T000000Z;;
esac
'''


def test_record_keeps_the_release_makes_it_current_and_prunes_old_ones(tmp_path):
    s = settings(tmp_path)
    root, d = tmp_path / "srv", tmp_path / "srv/.deploy"
    (root / "docker").mkdir(parents=True)
    (root / "docker/a.conf").write_text("a\n")
    for old in ("20261120T000000Z", "20261121T000000Z", "20261122T000000Z"):
        (d / "releases" / old).mkdir(parents=True)
    images = {"backend": ("reg/backend:v2", "sha256:1"), "nginx": ("nginx:1", "sha256:2")}
    release = "20261125T100000Z"
    bin_dir = fake_tools(tmp_path, docker=DOCKER_RECORD)
    proc = sh(record_script(s, release, [f"{root}/docker/a.conf", f"{root}/docker/gone"],
                            images), tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert (d / "current").read_text() == release + "\n"
    assert sorted(p.name for p in (d / "releases").iterdir()) == [
        "20261121T000000Z", "20261122T000000Z", release]  # deploy.keep_releases = 3
    text = (d / f"releases/{release}/images").read_text()
    assert text == "backend reg/backend:v2 sha256:1\nnginx nginx:1 sha256:2\n"
    assert parse_images(text) == images
    with tarfile.open(d / f"releases/{release}/files.tar") as tar:
        assert tar.getnames() == ["docker/a.conf"]
    log = calls(tmp_path)
    assert log[:2] == ["docker tag sha256:1 maicivy-release/backend:20261125T100000Z",
                       "docker tag sha256:2 maicivy-release/nginx:20261125T100000Z"]
    assert "docker rmi maicivy-release/backend:20261120T000000Z" in log
    assert log[-1] == "docker image prune -f"


CURL_REGISTRY = r'''
case "$*" in
  *" -G "*) echo '{"token": "tok123"}';;
  *"Authorization: Bearer tok123"*)
    printf 'HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:abc\r\n\r\n';;
  *127.0.0.1:5000*) printf 'HTTP/1.1 404 Not Found\r\n\r\n';;
  *) printf 'HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Bearer realm="https://auth.test/token"'
     printf ',service="registry.test",scope="repository:acme/app:pull"\r\n\r\n';;
esac
'''
DOCKER_FACTS = r'''
case "$*" in
  "ps "*) echo c1;;
  "inspect "*)
    echo 'c1|/maicivy-backend-1|backend|h1|sha256:i1|ghcr.io/acme/app:1|running|healthy|T';;
  "image inspect "*) echo "@@image sha256:i1 ghcr.io/acme/app@sha256:old ";;
esac
'''


def test_dry_run_facts_ask_each_registry_for_the_digest_with_a_bearer_token(tmp_path):
    from fabfile.deploy.plan import facts_script

    bin_dir = fake_tools(tmp_path, docker=DOCKER_FACTS, curl=CURL_REGISTRY)
    proc = sh(facts_script(settings(), ["ghcr.io/acme/app:1", "127.0.0.1:5000/x:1"]), tmp_path,
              bin_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["== containers",
                         "c1|/maicivy-backend-1|backend|h1|sha256:i1|ghcr.io/acme/app:1|running|"
                         "healthy|T", "@@image sha256:i1 ghcr.io/acme/app@sha256:old "]
    assert sorted(lines[3:]) == ["@@remote 127.0.0.1:5000/x:1 ?HTTP 404",
                                 "@@remote ghcr.io/acme/app:1 sha256:abc"]
    token = [c for c in calls(tmp_path) if " -G " in c]
    assert token == ["curl -s --max-time 10 -G https://auth.test/token --data-urlencode "
                     "service=registry.test --data-urlencode scope=repository:acme/app:pull"]
    heads = [c for c in calls(tmp_path) if c.startswith("curl -sSI")]
    assert ("curl -sSI --max-time 10 -H Accept: application/vnd.oci.image.index.v1+json, "
            "application/vnd.docker.distribution.manifest.list.v2+json, "
            "application/vnd.docker.distribution.manifest.v2+json, "
            "application/vnd.oci.image.manifest.v1+json http://127.0.0.1:5000/v2/x/manifests/1"
            ) in heads
