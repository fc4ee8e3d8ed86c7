"""``inv backup.postgres`` ON the server as a non-root sudoer (``sudo: true``).

The operator logs in as themselves and runs ``inv``; everything privileged goes
through ``sudo -n``, including the files the task writes (the backup's manifest,
the metrics) into directories only root may enter. One stack (postgres), one
backup, by a throw-away user with NOPASSWD sudo made for this module.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from backup_support import ROOT, BackupRig, seed_postgres, sha256_file

from fabfile.backup.manifest import parse_metrics

pytestmark = pytest.mark.rig


@pytest.fixture(scope="module")
def sudoer():
    """A user (no home, no password) allowed ``sudo -n`` for everything."""
    if shutil.which("sudo") is None:
        pytest.fail("the rig needs sudo (tests/install-deps.sh installs it)")
    name = f"maicivyop{os.getpid()}"
    rule = Path(f"/etc/sudoers.d/{name}")
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", name], check=True)
    try:
        # The rig's docker clients need its API version (/etc/maicivy-rig.env); a real
        # server's need nothing: sudo's own environment otherwise.
        rule.write_text(f'Defaults:{name} env_keep += "DOCKER_HOST DOCKER_API_VERSION"\n'
                        f"{name} ALL=(ALL) NOPASSWD: ALL\n")
        rule.chmod(0o440)
        yield name
    finally:
        rule.unlink(missing_ok=True)
        subprocess.run(["userdel", name], check=False)


@pytest.fixture(scope="module")
def rig(ssh_host, tmp_path_factory):
    r = BackupRig(ssh_host, tmp_path_factory.mktemp("sudoer"), f"maicivysudo{os.getpid()}")
    try:
        r.stack.prepare()
        r.compose("up", "-d", "--wait", "--wait-timeout", "180", "postgres", timeout=240)
        seed_postgres(r)
        yield r
    finally:
        r.down()


def user_python() -> list[str]:
    """A Python the user may run, with this checkout's packages: the venv's own when
    its interpreter is reachable, else the system's of the same version."""
    real = os.path.realpath(sys.executable)
    if all(os.stat(p).st_mode & stat.S_IXOTH for p in Path(real).parents):
        return [sys.executable]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(system):
        pytest.fail(f"no {system} for a non-root user (the venv's is under {real})")
    return [system]


def test_inv_backup_as_a_non_root_sudoer_writes_root_only_files(rig, sudoer):
    backups, textfile = rig.backup_dir, Path(rig.settings.backup.textfile_dir)
    for d in (backups, textfile):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        d.chmod(0o700)  # only root may enter: every file goes through sudo
    home = Path(tempfile.mkdtemp(prefix="maicivy-sudoer-"))
    try:
        home.chmod(0o755)
        config = home / "maicivy.yaml"
        shutil.copy(rig.config(sudo=True), config)
        config.chmod(0o644)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "MAICIVY_CONFIG": str(config),
               "PYTHONPATH": sysconfig.get_paths()["purelib"]}
        proc = subprocess.run(
            ["runuser", "-u", sudoer, "--", "env", "-i",
             *[f"{k}={v}" for k, v in env.items()],
             *user_python(), "-m", "invoke", "-r", str(ROOT), "backup.postgres"],
            capture_output=True, text=True, timeout=600, cwd="/", stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifests = sorted((backups / "postgres").glob("*.json"))
    assert len(manifests) == 1, sorted(p.name for p in (backups / "postgres").iterdir())
    m = json.loads(manifests[0].read_text())
    assert f"postgres backup {m['name']}" in proc.stdout
    assert m["verification"]["ok"] and m["rows"] > 0
    data = backups / "postgres" / m["file"]
    assert sha256_file(data) == m["sha256"] and data.stat().st_size == m["size"]
    for path in (manifests[0], data):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), path
    assert sorted(p.name for p in (backups / "postgres").iterdir()
                  if p.name.startswith(".")) == []  # no temporary file left
    metrics = textfile / "maicivy_backup_postgres.prom"
    assert metrics.stat().st_uid == 0
    assert parse_metrics(metrics.read_text())["maicivy_backup_last_result"] == 1
    assert (backups.stat().st_uid, stat.S_IMODE(backups.stat().st_mode)) == (0, 0o700)
