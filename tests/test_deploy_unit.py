"""deploy's pure half: scripts, their parsing, the plan -- plus the lock and the
restore script run for real by a local bash (no SSH, no Docker)."""

from __future__ import annotations

import subprocess
import tarfile

import pytest

from fabfile.config import SERVICES, load_settings
from fabfile.deploy.release import (
    Container,
    gate_failures,
    log_line,
    parse_diagnoses,
    parse_images,
    parse_plan,
    parse_state,
    plan_script,
    prune_lines,
    record_script,
    reloads_for,
    restore_script,
    sections,
    swap_cmd,
)
from fabfile.errors import OpsError


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


def test_images_file_round_trip_and_release_tags_in_record_script(tmp_path):
    s = settings(tmp_path)
    images = {"backend": ("reg/backend:v2", "sha256:1"), "nginx": ("nginx:1", "sha256:2")}
    script = record_script(s, "20261125T100000Z", [f"{s.root}/a"], images, "LINE")
    assert "docker tag sha256:1 maicivy-release/backend:20261125T100000Z" in script
    assert "head -n -3" in "\n".join(prune_lines(s))
    text = "backend reg/backend:v2 sha256:1\nnginx nginx:1 sha256:2\n"
    assert parse_images(text) == images


def test_plan_script_pulls_only_when_asked():
    s = settings()
    assert "pull --quiet" in plan_script(s, REFS, pull=True)
    assert "pull" not in plan_script(s, REFS, pull=False)


def test_swap_reloads_nginx_before_and_after_retiring_the_old_container():
    s = settings()
    old = [Container("abc", "/p-backend-1", "backend", "h", "i", "r", "running", "healthy")]
    lines = swap_cmd(s, old).splitlines()
    assert lines[3:] == ["reload", "sleep 1", "docker stop -t 30 abc >/dev/null", "reload",
                         "docker rm -f abc >/dev/null"]
    assert "nginx -s reload" in lines[2]


def test_swap_removes_an_unhealthy_container_before_nginx_can_see_it():
    s = settings()
    old = [Container("bad", "/p-backend-2", "backend", "h", "i", "r", "running", "unhealthy")]
    assert swap_cmd(s, old).splitlines()[3:] == ["docker rm -f bad >/dev/null", "reload"]


def test_restore_script_puts_back_files_and_removes_added_ones(tmp_path):
    s = settings(tmp_path)
    root = tmp_path / "srv"
    (root / "docker").mkdir(parents=True)
    (root / "docker/a.conf").write_text("old\n")
    snap = tmp_path / "snap.tar"
    with tarfile.open(snap, "w") as tar:
        tar.add(root / "docker/a.conf", arcname="docker/a.conf")
    (root / "docker/a.conf").write_text("new\n")
    (root / "docker/added.conf").write_text("x\n")
    managed = [f"{root}/docker/a.conf", f"{root}/docker/added.conf"]
    out = subprocess.run(["bash", "-c", restore_script(s, str(snap), managed, {})],
                         capture_output=True, text=True, check=True).stdout
    assert (root / "docker/a.conf").read_text() == "old\n"
    assert not (root / "docker/added.conf").exists()
    assert sorted(sections(out)["changed"]) == ["docker/a.conf", "docker/added.conf"]




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
    from fabfile.deploy.tasks import history_table, parse_log_line

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


def test_deploy_scripts_parse():
    from fabfile.deploy.release import deploy_report_script, diagnose_script, scale_up_cmd

    s = settings()
    for script in (scale_up_cmd(s, "backend", 2, 20, ["a", "b"]), diagnose_script(s),
                   'D=/d; T=t\n' + deploy_report_script(s, ["/opt/maicivy/docker/x.yml"])):
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + script
    # The new container joins nginx's network (edge) only once it is healthy.
    up = scale_up_cmd(s, "backend", 2, 20)
    assert "--no-start" in up and "docker network disconnect maicivy_edge" in up
    assert up.index('"running healthy"|"running none") join;') > up.index("join() {")
