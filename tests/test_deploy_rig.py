"""deploy on the real rig: the fab CLI over SSH, a real stack, real nginx.

One stack for the module, shared to save time, but no test depends on another
having run: each starts by deploying the state it needs (``rig.at(...)``, a
no-op redeploy when the stack is there already), or from a fresh server
(``rig.fresh()``). The states: V1 (the rig's images), BACKEND2 (backend v2),
BOTH2 (backend and frontend v2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from deploy_support import (
    ClientLoop,
    containers,
    fab,
    fab_popen,
    get,
    remove_release_tags,
    tree_fingerprint,
    write_config,
)
from stack_rig import StackRig

from fabfile.config import SERVICES
from fabfile.host import Host
from fabfile.lock import StackLock
from fabfile.shell import q

pytestmark = pytest.mark.rig

# Another name when several checkouts run this module at once on one Docker.
PROJECT = os.environ.get("MAICIVY_DEPLOY_RIG_PROJECT", "maicivydeploy")


def v1() -> dict:
    return {}


def backend2() -> dict:
    from rig.images import BACKEND_V2

    return {"images": {"backend": BACKEND_V2}}


def both2() -> dict:
    from rig.images import BACKEND_V2, FRONTEND_V2

    return {"images": {"backend": BACKEND_V2, "frontend": FRONTEND_V2}}


class Rig:
    def __init__(self, ssh_host, tmp):
        self.ssh_host = ssh_host
        self.tmp = tmp
        self.stack = StackRig(ssh_host, tmp, PROJECT, deploy={"health_timeout_seconds": 20,
                                                               "keep_releases": 2})
        self.settings = self.stack.settings
        self.base = dict(self.stack.overrides)  # never changed: tests say what they need
        self.root = tmp / "srv"
        self.domain = self.settings.domain
        self.https = self.settings.publish.https
        self.n = 0

    def config(self, **changes):
        """A settings file: the rig's overrides plus ``changes`` (nested dicts merged)."""
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.base.items()}
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        self.n += 1
        return write_config(self.tmp / f"maicivy-{self.n}.yaml", data,
                            [str(self.ssh_host.known_hosts)])

    def fresh(self) -> None:
        """A fresh server after provision: directories, .env; no stack, no stack files,
        no deploy state and no certificate (the first deploy makes its stand-ins)."""
        s = self.settings
        if (self.root / "docker/docker-compose.prod.yml").exists():
            self.stack.down()
        remove_release_tags(PROJECT)
        self.stack.run(f"rm -rf {q(s.root)} {q(s.backup.dir)} {q(s.backup.textfile_dir)} "
                       f"{q(s.tls.webroot)}")
        for d in (s.backup.dir, s.backup.textfile_dir, s.tls.webroot, s.root):
            self.stack.run(f"mkdir -p {q(d)}")
        self.stack.write_env()

    def at(self, changes: dict) -> Path:
        """Deploy ``changes`` (over the rig's settings) -- a no-op when the stack runs
        them already -- with a row in the application's database (for the pre-deploy
        backups). The state a test starts from; returns its settings file."""
        config = self.config(**changes)
        proc = self.deploy(config=config, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.stack.run(self.stack.compose(
            "exec", "-T", "postgres", "sh", "-c",
            'psql -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c '
            '"CREATE TABLE IF NOT EXISTS visits (id serial PRIMARY KEY, '
            'at timestamptz DEFAULT now()); INSERT INTO visits DEFAULT VALUES;"'))
        return config

    def deploy(self, *args, config=None, **kw):
        return fab(self.ssh_host, config or self.config(), "deploy", *args, **kw)

    def backend_version(self) -> str:
        import json

        status, body = get(self.domain, self.https, "/health")
        assert status == 200, body
        return json.loads(body)["version"]

    def frontend_page(self) -> str:
        status, body = get(self.domain, self.https, "/")
        assert status == 200
        return body.decode()

    def running(self, service: str) -> list[str]:
        return [n for n, v in containers(PROJECT).items()
                if f"{PROJECT}-{service}-" in n and v.endswith("@running")]

    def log(self) -> list[str]:
        path = self.root / ".deploy/deploy.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def rig(ssh_host, tmp_path_factory):
    r = Rig(ssh_host, tmp_path_factory.mktemp("deploy"))
    r.fresh()  # also drops the release tags an interrupted earlier run left
    try:
        yield r
    finally:
        r.stack.down()
        remove_release_tags(PROJECT)


def test_first_deploy_brings_every_service_up_healthy(rig):
    rig.fresh()
    proc = rig.deploy(timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rig.stack.service_health() == {name: "healthy" for name in SERVICES}
    env = (rig.root / ".env").read_text().splitlines()
    secrets = [line.split("=", 1)[1] for line in env if "PASSWORD=" in line]
    assert secrets and not any(v in proc.stdout + proc.stderr for v in secrets if v)
    assert rig.backend_version() == "v1"
    assert "release v1" in rig.frontend_page()
    assert re.search(r"result=ok release=\d{8}T\d{6}Z images=\S*backend=\S+/backend:v1@",
                     rig.log()[-1])
    history = fab(rig.ssh_host, rig.config(), "deploy.history")
    assert history.returncode == 0, history.stderr
    head, first = history.stdout.splitlines()[:2]
    assert head.split() == ["TIME", "RESULT", "RELEASE", "USER", "BACKEND", "FRONTEND", "DETAIL"]
    assert first.split()[1:2] == ["ok"] and first.split()[4:6] == ["v1", "test"]


def test_noop_redeploy_recreates_nothing_and_says_so(rig):
    config = rig.at(v1())
    before = containers(PROJECT)
    proc = rig.deploy(config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing changed" in proc.stdout
    assert containers(PROJECT) == before
    assert " result=unchanged " in rig.log()[-1]


def test_dry_run_prints_diffs_and_leaves_the_server_byte_identical(rig):
    rig.at(v1())
    before_tree = tree_fingerprint(rig.root)
    before_containers = containers(PROJECT)
    config = rig.config(rate_limit={"per_minute": 1200},
                        images={"backend": rig.base["images"]["backend"].replace(":v1", ":v2")})
    proc = rig.deploy("--dry-run", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    target = f"{rig.ssh_host.user}@127.0.0.1:{rig.ssh_host.port}"
    assert f"--- {target}:{rig.root}/docker/nginx/nginx.conf" in out
    assert re.search(r"^-.*rate=6000r/m;$", out, re.M)
    assert re.search(r"^\+.*rate=1200r/m;$", out, re.M)
    assert re.search(r"^\+    image: \S+/backend:v2$", out, re.M)
    assert re.search(r"^backend .* replace beside the old", out, re.M)
    assert re.search(r"^nginx .* reload", out, re.M)
    verbose = rig.deploy("--dry-run", "--verbose", config=config).stdout
    assert "[dry-run] would run: docker compose" in verbose and " pull --quiet" in verbose
    assert "nginx -s reload" in verbose
    assert tree_fingerprint(rig.root) == before_tree
    assert containers(PROJECT) == before_containers


def test_new_backend_image_is_deployed_without_a_failed_request(rig):
    rig.at(v1())
    config = rig.config(**backend2())
    others = {n: v for n, v in containers(PROJECT).items() if "-backend-" not in n}
    with ClientLoop(rig.domain, rig.https, rate=50) as loop:
        time.sleep(1)
        proc = rig.deploy(config=config)
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend: starting the new container beside the old one" in proc.stdout
    # The pre-deploy backup (backup namespace) ran before anything changed.
    assert "pre-deploy backup: done" in proc.stdout
    assert proc.stdout.index("pre-deploy backup") < proc.stdout.index("backend: starting")
    assert any(p.is_file() and p.stat().st_size > 0
               for p in (rig.tmp / "backups").rglob("*") if "postgres" in str(p))
    assert loop.failures == [], loop.failures[:10]
    assert loop.total > 100
    assert loop.versions[0] == "v1" and loop.versions[-1] == "v2"
    assert rig.backend_version() == "v2"
    assert len(rig.running("backend")) == 1
    assert rig.stack.service_health() == {name: "healthy" for name in SERVICES}
    # Services whose image and config did not change were not recreated.
    assert {n: v for n, v in containers(PROJECT).items() if "-backend-" not in n} == others


def test_broken_backend_is_rolled_back_automatically(rig):
    from rig.images import BACKEND_BROKEN

    rig.at(backend2())
    before = rig.running("backend")
    with ClientLoop(rig.domain, rig.https, rate=20) as loop:
        proc = rig.deploy(config=rig.config(images={"backend": BACKEND_BROKEN}))
    assert proc.returncode != 0
    assert "rolled back automatically" in proc.stderr
    assert "backend container" in proc.stderr and "did not become healthy" in proc.stderr
    # What the failed container says, printed before the rollback: its health checks and
    # its logs with the traceback; the error line and the deploy log carry the short form.
    out = proc.stdout
    assert "last health checks:" in out and "exit 1" in out
    assert "Traceback (most recent call last):" in out
    crash = "ConnectionRefusedError: maicivy-broken: could not connect to the database"
    assert crash in out and out.index(crash) < out.index("rolling back")
    assert crash in proc.stderr and crash in rig.log()[-1]
    # The rollback names the containers right: the old one keeps serving, the new goes.
    assert re.search(rf"backend: {before[0]} \(previous release\) keeps serving; removing "
                     rf"{PROJECT}-backend-\d+", out), out
    assert "new container healthy" not in out.split("rolling back", 1)[1]
    assert loop.failures == [], loop.failures[:10]
    assert set(loop.versions) == {"v2"}
    assert rig.backend_version() == "v2"
    assert rig.running("backend") == before
    assert " result=rolled-back " in rig.log()[-1]
    # The server's files are those of the release that serves (backend v2).
    compose_file = (rig.root / "docker/docker-compose.prod.yml").read_text()
    assert "backend:v2" in compose_file and "backend:broken" not in compose_file


def test_second_deploy_is_refused_while_one_holds_the_lock(rig):
    config = rig.at(v1())
    conn = rig.ssh_host.connection(rig.stack.overrides)
    lock = StackLock(Host(conn), rig.settings, "deploy",
                     owner="deploy by carol@laptop since 2026-11-25T10:00Z")
    lock.acquire()
    try:
        start = time.monotonic()
        proc = rig.deploy(config=config, timeout=120)
        took = time.monotonic() - start
    finally:
        lock.release()
        conn.close()
    assert proc.returncode != 0
    assert ("another task holds the stack lock: deploy by carol@laptop since "
            "2026-11-25T10:00Z") in proc.stderr
    assert took < 60  # refused at once, not after waiting for the lock
    assert rig.deploy(config=config).returncode == 0  # released with its holder


def _until(proc, marker: str, seen: list[str], timeout: float = 300) -> None:
    """Read the deploy's output until ``marker`` (bounded)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            return


def _journal(rig) -> list[list[str]]:
    return [ln.split(" ", 3) for ln in
            (rig.root / ".deploy/journal").read_text().splitlines()]


def _holder_pids(rig) -> list[int]:
    owner = (rig.root / ".deploy/lock.owner").read_text().split()
    return [int(owner[-2]), int(owner[-1])]


def test_killed_lock_holder_lets_no_second_deploy_overlap(rig):
    """kill -9 of the recorded holder: the lock still holds. Killing every holder
    process: a second deploy gets the lock only after the first one's running step
    ended, and the first stops at its next step (lost lock), without rolling back."""
    config = rig.at(backend2())
    first = fab_popen(rig.ssh_host, config, "deploy", "--backend-tag", "v1")
    seen: list[str] = []
    try:
        _until(first, "backend: starting the new container", seen)
        bash, cat = _holder_pids(rig)
        os.kill(bash, signal.SIGKILL)
        time.sleep(0.5)
        refused = rig.deploy(config=config, timeout=120)
        assert refused.returncode == 75, refused.stdout + refused.stderr
        assert "another task holds the stack lock: deploy by" in refused.stderr
        os.kill(cat, signal.SIGKILL)  # now nothing holds it on the server
        second = rig.deploy("--backend-tag", "v1", config=config, timeout=600)
        rest, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = "".join(seen) + rest
    assert second.returncode == 0, second.stdout + second.stderr
    assert first.returncode != 0 and "lost the stack lock" in out, out
    assert "); rolling back" not in out, out
    assert rig.backend_version() == "v1" and len(rig.running("backend")) == 1
    # The journal: no step of the first deploy after the second one took the lock.
    journal = _journal(rig)
    starts = [j for j in journal if j[2] == "started"]
    a, b = starts[-2][1], starts[-1][1]
    b_started = starts[-1][0]
    a_steps = [j for j in journal if j[1] == a and j[2] in ("step", "step-end")]
    assert a_steps and all(j[0] <= b_started for j in a_steps), journal[-30:]
    assert any(j[1] == a and j[2] == "lost-lock" for j in journal)
    assert any(j[1] == b and j[2] == "finished" for j in journal)
    assert "previous deploy by" in second.stdout  # it was told about the first one
    # The tag given on the command line is in the history.
    history = json.loads(fab(rig.ssh_host, config, "deploy.history", "--json").stdout)
    assert history[-1]["result"] == "ok"
    assert history[-1]["images"]["backend"]["ref"].endswith("/backend:v1")


def test_lost_connection_mid_deploy_is_reported_never_rolled_back(rig):
    config = rig.at(v1())
    log_before = rig.log()
    first = fab_popen(rig.ssh_host, config, "deploy", "--backend-tag", "v2")
    seen: list[str] = []
    try:
        _until(first, "backend: starting the new container", seen)
        time.sleep(1)
        # Drop every SSH connection of the rig's sshd (its per-connection processes).
        master = int((rig.ssh_host.workdir / "sshd.pid").read_text())
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = open(f"/proc/{pid}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                    os.kill(int(pid), signal.SIGKILL)
        rest, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = "".join(seen) + rest
    assert first.returncode == 3, out
    assert "lost the connection during deploy" in out
    assert "); rolling back" not in out and "did not become healthy" not in out
    assert rig.log() == log_before  # nothing written without the lock
    again = rig.deploy("--backend-tag", "v2", config=config, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "the previous deploy by" in again.stdout and "was interrupted" in again.stdout
    assert "state left by the interrupted deploy" in again.stdout
    assert rig.backend_version() == "v2" and len(rig.running("backend")) == 1


def test_unlock_of_a_frozen_deploy_makes_it_fail_when_resumed(rig):
    config = rig.at(backend2())
    first = fab_popen(rig.ssh_host, config, "deploy", "--backend-tag", "v1")
    seen: list[str] = []
    try:
        _until(first, "backend: starting the new container", seen)
        first.send_signal(signal.SIGSTOP)
        unlock = fab(rig.ssh_host, config, "deploy.unlock", timeout=120)
        assert unlock.returncode == 0, unlock.stdout + unlock.stderr
        assert "lock broken (was held by deploy by" in unlock.stdout
        first.send_signal(signal.SIGCONT)
        rest, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    out = "".join(seen) + rest
    assert first.returncode not in (0, None), out
    assert "lost the stack lock" in out and "released" in out
    assert "); rolling back" not in out
    # The next deploy (the settings' backend v2) converges from what it left.
    again = rig.deploy(config=config, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "was interrupted" in again.stdout
    assert rig.backend_version() == "v2" and len(rig.running("backend")) == 1
    assert rig.stack.service_health() == {name: "healthy" for name in SERVICES}


def test_killed_connection_mid_deploy_then_next_deploy_converges(rig):
    rig.at(backend2())
    config = rig.config(**both2())
    proc = fab_popen(rig.ssh_host, config, "deploy")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "frontend: starting the new container" in line:
            break
    time.sleep(2)  # inside the rolling replace: new frontend container starting
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any("frontend: starting" in line for line in seen), "".join(seen)
    again = rig.deploy(config=config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "release v2" in rig.frontend_page()
    assert len(rig.running("frontend")) == 1
    assert rig.stack.service_health() == {name: "healthy" for name in SERVICES}


def test_rollback_on_demand_returns_to_the_previous_release(rig):
    """Its own history first: ok, unchanged, rolled-back, ok, ok -- then the rollback."""
    from rig.images import BACKEND_BROKEN

    rig.at(both2())
    logged = len(rig.log())
    for changes in (v1(), v1(), {"images": {"backend": BACKEND_BROKEN}}, backend2(), both2()):
        rig.deploy(config=rig.config(**changes), timeout=900)
    proc = fab(rig.ssh_host, rig.config(), "deploy.rollback")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "release v1" in rig.frontend_page()  # the frontend of the previous release
    assert rig.backend_version() == "v2"
    assert " result=rollback " in rig.log()[-1]
    history = fab(rig.ssh_host, rig.config(), "deploy.history", "--json", "--lines", "100")
    assert history.returncode == 0, history.stderr
    results = [e["result"] for e in json.loads(history.stdout)][-(len(rig.log()) - logged):]
    assert results[:2] == ["ok", "unchanged"] and results[-1] == "rollback"
    assert "rolled-back" in results
    # Releases were made, two are kept (deploy.keep_releases), with their image tags.
    kept = sorted(p.name for p in (rig.root / ".deploy/releases").iterdir())
    assert len(kept) == 2 and results.count("ok") >= 3
    import subprocess

    tags = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}",
                           f"{PROJECT}-release/*"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert sorted({t.rsplit(":", 1)[1] for t in tags}) == kept
    assert len(tags) == 2 * len(SERVICES)


def test_wrong_host_key_is_refused_and_later_hosts_are_not_touched(rig, tmp_path):

    wrong = rig.ssh_host.forged_known_hosts(tmp_path)
    log_before = rig.log()
    config = write_config(tmp_path / "wrong.yaml", rig.base, [str(wrong)])
    proc = fab(rig.ssh_host, config, "deploy")
    assert proc.returncode == 2
    assert "has CHANGED" in proc.stderr and "refusing to connect" in proc.stderr
    # Two hosts, the first with an unknown key: it stops there, the second is untouched.
    hosts = (f"{rig.ssh_host.user}@localhost:{rig.ssh_host.port},"
             f"{rig.ssh_host.user}@127.0.0.1:{rig.ssh_host.port}")
    proc = fab(rig.ssh_host, rig.config(), "deploy", host=hosts)
    assert proc.returncode == 2
    assert "is unknown; refusing to connect" in proc.stderr
    assert rig.log() == log_before


def test_missing_config_value_is_refused_before_any_remote_command(rig):
    sshd_log = rig.ssh_host.workdir / "sshd.log"
    accepted = sshd_log.read_text().count("Accepted publickey")
    proc = rig.deploy(env={"MAICIVY_IMAGES__BACKEND": ""})
    assert proc.returncode == 2
    assert "maicivy.images.backend must be an image reference" in proc.stderr
    assert sshd_log.read_text().count("Accepted publickey") == accepted
