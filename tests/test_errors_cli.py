"""Bad input through the real `inv`/`fab` command line: one `error:` line, no traceback.

Also: `render` never leaves a half-written tree (it writes next to --out and
renames into place).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(argv, *, env=None, cwd=None, preexec_fn=None):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd or "/",
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def one_error_line(proc, code: int, *parts: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("tool", ["inv", "fab"])
def test_render_into_a_forbidden_place_is_one_line(tool):
    proc = run([tool, "-r", str(ROOT), "render", "--out", "/proc/forbidden", "--no-validate"])
    one_error_line(proc, 1, "/proc")
    assert not Path("/proc/forbidden").exists()


def _limit_file_size():
    # nginx.conf (12 kB) is larger than this: the 4th file written fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))


def test_render_failing_midway_leaves_the_old_tree_whole(tmp_path):
    out = tmp_path / "build"
    argv = ["inv", "-r", str(ROOT), "render", "--out", str(out), "--no-validate"]
    ok = run(argv, env={"MAICIVY_DOMAIN": "old.example.org"})
    assert ok.returncode == 0, ok.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run(argv, env={"MAICIVY_DOMAIN": "new.example.org"}, preexec_fn=_limit_file_size)
    one_error_line(proc, 1, "is unchanged")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old tree, whole: not 3 new files and the rest old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no temp dir left


def test_render_failing_midway_writes_nothing(tmp_path):
    out = tmp_path / "build"
    proc = run(["inv", "-r", str(ROOT), "render", "--out", str(out), "--no-validate"],
               preexec_fn=_limit_file_size)
    one_error_line(proc, 1)
    assert list(tmp_path.iterdir()) == []


def test_render_replaces_its_own_tree_but_never_someone_elses(tmp_path):
    out = tmp_path / "build"
    argv = ["inv", "-r", str(ROOT), "render", "--out", str(out), "--no-validate"]
    assert run(argv).returncode == 0
    stale = out / "monitoring/old-file.yml"
    assert run(argv).returncode == 0  # a previous render: replaced whole
    assert not stale.exists()
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    proc = run(["inv", "-r", str(ROOT), "render", "--out", str(home), "--no-validate"])
    one_error_line(proc, 1, "render did not write")
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("tool", ["inv", "fab"])
def test_option_that_is_not_a_number(tool):
    proc = run([tool, "-r", str(ROOT), "deploy.history", "--lines=abc"])
    one_error_line(proc, 2, "--lines must be a whole number (got 'abc')")


def test_restore_from_s3_without_credentials_says_what_to_set(tmp_path):
    env = {"MAICIVY_ROOT": str(tmp_path / "stack"), "MAICIVY_BACKUP__DIR": str(tmp_path / "b")}
    proc = run(["inv", "-r", str(ROOT), "restore.postgres", "--yes", "--backup",
                "s3://acme-backups/maicivy/postgres/postgres-20260101T000000Z.sql.gz"], env=env)
    line = one_error_line(proc, 1, "AWS_ACCESS_KEY_ID", str(tmp_path / "stack/.env"))
    assert "is set but" not in line
