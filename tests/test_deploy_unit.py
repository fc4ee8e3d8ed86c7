"""deploy's pure half: scripts, their parsing, the plan -- plus the lock and the
restore script run for real by a local bash (no SSH, no Docker)."""

from __future__ import annotations

import re
import subprocess
import tarfile

import pytest
from invoke import Context

from fabfile.config import SERVICES, load_settings
from fabfile.deploy import DeployLock
from fabfile.errors import OpsError
from fabfile.host import Host
from fabfile.release import (
    Container,
    gate_failures,
    log_line,
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


def test_lock_refuses_a_second_holder_and_is_released_with_its_holder(tmp_path):
    s = settings(tmp_path)
    (tmp_path / "srv").mkdir()
    host = Host(Context())
    first = DeployLock(host, s, [], owner="alice@laptop since T")
    state = first.acquire()
    assert state.busy is None
    second = DeployLock(host, s, [], owner="bob@desk since T2")
    with pytest.raises(OpsError, match="another deploy holds the lock: alice@laptop since T"):
        second.acquire()
    # The holder dies (lost connection, killed client): the lock goes with it.
    first._proc.kill()
    first._proc.wait()
    first._proc = None
    assert second.acquire().busy is None
    second.log("2026-11-25T10:00:00Z user=bob@desk result=ok")
    second.release()
    assert not (tmp_path / "srv/.deploy/lock.owner").exists()
    # What the holder is given on stdin goes to the deploy log.
    log = (tmp_path / "srv/.deploy/deploy.log").read_text()
    # ... followed by who ran it as the server sees it (fabfile/audit.py).
    assert re.fullmatch(r"2026-11-25T10:00:00Z user=bob@desk result=ok server_user=\S+ "
                        r"sudo_user=\S+ ssh_from=\S+\n", log), log


def test_lock_snapshot_holds_the_managed_files(tmp_path):
    s = settings(tmp_path)
    root = tmp_path / "srv"
    (root / "docker").mkdir(parents=True)
    (root / "docker/a.conf").write_text("A\n")
    lock = DeployLock(Host(Context()), s, [f"{root}/docker/a.conf", f"{root}/missing"])
    state = lock.acquire()
    try:
        assert list(state.hashes) == ["docker/a.conf"]
        with tarfile.open(root / ".deploy/pre/files.tar") as tar:
            assert tar.getnames() == ["docker/a.conf"]
        assert state.unset == [".env"]
    finally:
        lock.release()
