"""The generated backup scripts' failure paths, run for real by bash with fake tools.

``docker`` (the containers) and ``pigz`` (the compressor) are stand-ins on PATH;
everything else is the real script. Each failure must end in one line that
names the real directory, never a literal ``$dir``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fabfile.backup.scripts import failure_line, pg_backup_script, redis_backup_script
from fabfile.config import load_settings

FAKE_DOCKER = r"""#!/bin/bash
# docker compose ... exec -T SERVICE sh -c SCRIPT sh ARGS...: answer like the containers.
all="$*"
case "$all" in
  *"pg_dump --version"*) printf 'pg_dump (PostgreSQL) 15.4\n15.4\nmaicivy\n' ;;
  *"pg_dump -Fc -Z0"*)  # the dump, read whole in the container as it goes out
    printf 'DUMP\n'
    printf 'status_tee=0\nstatus_restore=0\nstatus_dump=0\nraw_sha256=%s\n' \
      "$(printf 'DUMP\n' | sha256sum | cut -d' ' -f1)" >&2 ;;
  *"pg_dumpall --globals-only"*) printf 'GLOBALS\n' ;;
  *BGSAVE*) printf 'lastsave=1\nrdb=/data/dump.rdb\naof=yes\nappenddirname=appendonlydir\n' ;;
  *"exec cat"*) printf 'RDB\n' ;;
  *) cat > /dev/null ;;
esac
"""

# A compressor that runs out of disk on the stream named by $FAKE_FULL.
FAKE_PIGZ = r"""#!/bin/bash
case " $* " in *" -V "*) echo "pigz 2.6"; exit 0 ;; *" -d "*) exec cat ;; esac
data=$(cat)
if [ "$data" = "$FAKE_FULL" ]; then
  echo "pigz: write error: No space left on device" >&2; exit 1
fi
[ "$data" = "$FAKE_CORRUPT" ] && data="${data}X"  # a compressor or disk that lies
printf '%s\n' "$data"
"""


@pytest.fixture
def tools(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("pigz", FAKE_PIGZ)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return bindir


def run(script: str, tools: Path, full: str, corrupt: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "FAKE_FULL": full,
           "FAKE_CORRUPT": corrupt}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("kind, full, message", [
    ("postgres", "DUMP", "writing the compressed dump to {dir} failed (disk full?) (exit 1)"),
    ("postgres", "GLOBALS", "writing the globals dump to {dir} failed (disk full?) (exit 1)"),
    ("redis", "RDB", "writing the compressed RDB to {dir} failed (disk full?) (exit 1)"),
])
def test_a_full_disk_names_the_real_backup_directory(tmp_path, tools, kind, full, message):
    backups = tmp_path / "backups"
    s = load_settings(invoke_section={"backup": {"dir": str(backups)}}, environ={}, files=[])
    script = pg_backup_script(s) if kind == "postgres" else redis_backup_script(s)
    proc = run(script, tools, full)
    assert proc.returncode == 1, proc.stderr
    expected = message.format(dir=backups / kind)
    assert failure_line(proc.stderr, proc.stdout) == \
        expected + ": pigz: write error: No space left on device"
    assert "$dir" not in proc.stderr
    assert list((backups / kind).iterdir()) == []  # no partial file left


def test_the_file_read_back_must_decompress_to_the_stream_pg_restore_read(tmp_path, tools):
    backups = tmp_path / "backups"
    s = load_settings(invoke_section={"backup": {"dir": str(backups)}}, environ={}, files=[])
    good = run(pg_backup_script(s), tools, "")
    assert good.returncode == 0, good.stderr
    assert "raw_sha256=" in good.stdout and "file=postgres-" in good.stdout
    bad = run(pg_backup_script(s), tools, "", corrupt="DUMP")
    assert bad.returncode == 1
    assert failure_line(bad.stderr, bad.stdout) == (
        f"the archive read back from {backups / 'postgres'} does not decompress to the dump "
        "pg_restore read (disk or compressor error)")
    assert not [p for p in (backups / "postgres").iterdir() if p.name.endswith(".partial")]
