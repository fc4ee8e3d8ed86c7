"""The stack lock run for real by a local bash (flock, no SSH, no Docker): it holds
when its recorded holder is killed, a broken lock stops the next step, backups
share it, the journal reports an interrupted task, a deploy's rollback snapshot
survives an interrupted attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from invoke import Context

import fabfile.lock
from fabfile.config import load_settings
from fabfile.deploy.release import parse_state
from fabfile.deploy.scripts import deploy_report_script
from fabfile.errors import OpsError
from fabfile.host import Host
from fabfile.lock import (
    LockBusy,
    LostLock,
    StackLock,
    break_lock,
    interrupted,
    lock_holder,
    parse_journal,
    server_lock,
    stack_lock,
)
from fabfile.shell import last_lines


def settings(tmp_path, **extra):
    over = {"root": str(tmp_path / "srv"), **extra}
    return load_settings(invoke_section=over, environ={}, files=[])


@pytest.fixture
def s(tmp_path):
    (tmp_path / "srv").mkdir()
    return settings(tmp_path, deploy={"lock_wait_seconds": 1}, backup={"lock_wait_seconds": 1})


def journal(tmp_path) -> list[str]:
    return (tmp_path / "srv/.deploy/journal").read_text().splitlines()


def owner_pids(tmp_path) -> list[int]:
    owner = (tmp_path / "srv/.deploy/lock.owner").read_text().split()
    return [int(owner[-2]), int(owner[-1])]


def test_second_task_is_refused_naming_the_holder_and_released_with_it(tmp_path, s):
    first = StackLock(Host(Context()), s, "deploy", owner="deploy by alice@laptop since T")
    first.acquire()
    second = StackLock(Host(Context()), s, "monitoring.push")
    with pytest.raises(LockBusy, match="another task holds the stack lock: deploy by "
                                       "alice@laptop since T"):
        second.acquire()
    assert str(lock_holder(Host(Context()), s)) == "deploy by alice@laptop since T"
    first.release()
    assert lock_holder(Host(Context()), s) is None
    second.acquire()
    second.release()


def test_killing_the_recorded_holder_pid_does_not_free_the_lock(tmp_path, s):
    lock = StackLock(Host(Context()), s, "deploy")
    lock.acquire()
    try:
        bash, cat = owner_pids(tmp_path)
        os.kill(bash, signal.SIGKILL)
        time.sleep(0.3)
        with pytest.raises(LockBusy):
            StackLock(Host(Context()), s, "deploy").acquire()
        # ... and the task that holds it goes on.
        host = Host(Context(), guard=lock)
        assert host.run("echo still ours").stdout.strip() == "still ours"
    finally:
        lock.release()


def test_a_broken_lock_stops_the_next_step_which_does_not_run(tmp_path, s):
    host = Host(Context())
    with stack_lock(host, s, "deploy") as lock:
        lock.step("first step")
        host.run("true")
        assert break_lock(Host(Context()), s).startswith("deploy by ")
        lock.step("second step")
        marker = tmp_path / "ran"
        with pytest.raises(LostLock, match="lost the stack lock before step 'second step' "
                                           "of deploy .released."):
            host.run(f"touch {marker}")
        assert not marker.exists()
        with pytest.raises(LostLock):  # and every later step too
            host.run("true")
    lines = journal(tmp_path)
    assert [ln.split()[2] for ln in lines] == ["started", "step", "step-end", "unlocked",
                                               "lost-lock"]
    # The next holder hears about it.
    with stack_lock(Host(Context()), s, "deploy") as again:
        assert again.previous is not None
        assert "stopped at step 'first step'" in again.previous.describe()


def test_a_new_holder_waits_for_a_running_step_of_the_old_one(tmp_path, s):
    """The old holder's processes are gone (killed), one of its steps still runs: the
    next task takes the lock only after that step ended -- they never overlap."""
    lock = StackLock(Host(Context()), s, "deploy")
    lock.acquire()
    host = Host(Context(), guard=lock)
    lock.step("slow step")
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", host.run("sleep 3")))
    t.start()
    time.sleep(1)
    for pid in owner_pids(tmp_path):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    second = StackLock(Host(Context()), s, "deploy")
    second.acquire()
    t.join()
    try:
        entries = {e.token: e for e in parse_journal(journal(tmp_path))}
        first_e, second_e = entries[lock.token[:8]], entries[second.token[:8]]
        end = [ln.split()[0] for ln in journal(tmp_path)
               if ln.split()[1:3] == [lock.token[:8], "step-end"]][-1]
        assert end <= second_e.started  # ISO times sort as strings
        assert first_e.steps and second.previous.token == first_e.token
        with pytest.raises(LostLock, match="now held by deploy by"):
            host.run("true")
    finally:
        second.release()
        lock.release()


def test_backups_share_the_lock_and_a_deploy_waits_for_them(tmp_path, s):
    from fabfile.lock import holder_script

    other = subprocess.Popen(  # a backup run by another process (cron)
        ["bash", "-c", holder_script(str(tmp_path / "srv/.deploy/lock"), 5, "backup.redis",
                                     shared=True)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "LOCKED\n"
    with stack_lock(Host(Context()), s, "backup.postgres", shared=True):
        held = lock_holder(Host(Context()), s)
        assert held.mode == "shared" and len(held.holders) == 2
        start = time.monotonic()
        with pytest.raises(LockBusy, match="a backup still holds the stack lock after 1s"):
            StackLock(Host(Context()), s, "deploy").acquire()
        assert time.monotonic() - start >= 1
    other.stdin.close()
    other.wait(timeout=10)
    with stack_lock(Host(Context()), s, "deploy"):
        cron = subprocess.run(  # a cron backup while the deploy runs: waits, then says who
            ["bash", "-c", holder_script(str(tmp_path / "srv/.deploy/lock"), 1,
                                         "backup.postgres", shared=True)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert cron.returncode == 75 and cron.stdout.startswith("BUSY deploy by ")


def test_nested_requests_take_nothing(tmp_path, s):
    host = Host(Context())
    with stack_lock(host, s, "deploy") as lock:
        with stack_lock(host, s, "backup.postgres", shared=True) as inner:
            assert inner is None
        assert host.run("true").ok and lock.holder.alive()


def test_kind_lock_refuses_a_second_holder(tmp_path):
    path = str(tmp_path / "b/.lock-postgres")
    with server_lock(Host(Context()), path, wait=0, task="first"):
        with pytest.raises(LockBusy, match="held by first"):
            with server_lock(Host(Context(), out=None), path + "", wait=0, task="second") as _:
                pass


def test_rollback_snapshot_survives_an_interrupted_attempt(tmp_path, s):
    root = tmp_path / "srv"
    (root / "docker").mkdir()
    conf = root / "docker/a.conf"
    conf.write_text("good\n")
    managed = [str(conf)]

    def attempt():
        lock = StackLock(Host(Context()), s, "deploy",
                         report=deploy_report_script(s, managed))
        return lock, parse_state(lock.acquire())

    lock, st = attempt()
    assert st.base and not st.base_interrupted and st.hashes == {"docker/a.conf": st.hashes[
        "docker/a.conf"]}
    first = st.base
    conf.write_text("half-deployed\n")  # then the deploy dies (no end line, no clean end)
    lock.release()
    lock, st = attempt()
    assert st.base == first and st.base_interrupted
    with tarfile.open(root / f".deploy/attempts/{first}/files.tar") as tar:
        assert tar.extractfile("docker/a.conf").read() == b"good\n"
    lock.finish("rolled-back", f"rm -f {root}/.deploy/attempt")
    lock.release()
    lock, st = attempt()
    assert st.base != first and not st.base_interrupted
    lock.release()


def test_journal_parsing_and_interrupted():
    lines = [
        "2026-11-29T10:00:00.000Z aaaaaaaa started task=deploy by=alice@x",
        "2026-11-29T10:00:01.000Z aaaaaaaa step upload changed files",
        "2026-11-29T10:00:01.500Z aaaaaaaa step-end rc=0",
        "2026-11-29T10:00:02.000Z aaaaaaaa finished result=ok",
        "2026-11-29T11:00:00.000Z bbbbbbbb started task=deploy by=bob@y",
        "2026-11-29T11:00:01.000Z bbbbbbbb step backend: start the new container",
    ]
    assert interrupted(lines[:4]) is None
    e = interrupted(lines)
    assert e.by == "bob@y" and "'backend: start the new container'" in e.describe()
    assert "did not finish" in e.describe()


def test_last_lines_of_a_failed_command():
    assert last_lines("", "") == "no output"
    assert last_lines("a\nb\n\nc\nd\n", "") == "b | c | d"
    assert last_lines("", "out1\nout2") == "out1 | out2"


def test_lock_scripts_are_shellcheck_clean():
    """The scripts are files (run above for real); their command lines are bash."""
    from fabfile.lock import guard_script, holder_read_script, stack_lock_script, unlock_script

    here = Path(fabfile.lock.__file__).parent
    files = sorted(str(p) for p in (here / "scripts").glob("lock-*.sh"))
    assert len(files) == 5
    proc = subprocess.run(["shellcheck", "-S", "warning", *files], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout
    for script in (stack_lock_script("/d", "t" * 32, "me", "deploy", 5, "true"),
                   guard_script("/d", "t" * 32, "echo hi", "label"),
                   unlock_script("/d", "me"), holder_read_script("/d")):
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + script


def test_errors_are_ops_errors():
    assert issubclass(LostLock, OpsError) and issubclass(LockBusy, OpsError)
