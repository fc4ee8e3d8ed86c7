"""The backup and restore scripts (fabfile/backup/*.sh), run for real with fake tools.

``docker`` runs the in-container script it is given with ``sh`` right here (as
``docker compose exec``/``run`` would in the container), and ``pg_dump``,
``pg_restore``, ``pg_dumpall``, ``psql``, ``redis-cli``, ``redis-check-rdb`` and
``pigz`` are small stand-ins on PATH; everything else (bash, awk, sha256sum,
mkfifo, the scripts themselves) is real. The tests assert the facts a run
prints and the exact line a user sees when it fails, which must name the real
directory, never a literal ``$dir`` nor a Python list.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from fabfile.backup.scripts import (
    check_archive_command,
    failure_line,
    listing_command,
    parse_output,
    pg_backup_command,
    psql_command,
    rdb_install_command,
    rdb_rollback_command,
    redis_backup_command,
    redis_wait_command,
    restore_into_command,
)
from fabfile.config import load_settings

# docker compose [options] exec -T SERVICE sh -c SCRIPT NAME ARGS...
# docker compose [options] run --rm --no-deps -T --entrypoint sh SERVICE -c SCRIPT NAME ARGS...
FAKE_DOCKER = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_STATE/docker.log"
while [ $# -gt 0 ]; do
  case "$1" in
    exec) shift 2; service=$1; shift; break ;;
    run) shift 6; service=$1; shift; set -- sh "$@"; break ;;
    *) shift ;;
  esac
done
if [ "$service" = "$FAKE_DOWN" ]; then
  echo "service \"$service\" is not running" >&2; exit 1
fi
export POSTGRES_USER=maicivy POSTGRES_PASSWORD=secret POSTGRES_DB=maicivy REDIS_PASSWORD=secret
args=()
for a in "$@"; do [ "$a" = /data ] && a=$FAKE_REDIS_DATA; args+=("$a"); done
exec "${args[@]}"
"""

FAKE_PG_DUMP = r"""#!/bin/bash
case "$*" in
  --version) echo "pg_dump (PostgreSQL) 15.4" ;;
  "-Fc -Z0")
    if [ -n "$FAKE_PG_DUMP_FAILS" ]; then
      echo "pg_dump: error: connection to server failed: $FAKE_PG_DUMP_FAILS" >&2; exit 1
    fi
    cat "$FAKE_STATE/dump" ;;
  *) echo "fake pg_dump: unexpected $*" >&2; exit 2 ;;
esac
"""

# pg_restore -f -: the plain SQL of the custom-format dump (here: the dump is that SQL).
FAKE_PG_RESTORE = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_STATE/pg_restore.log"
if [ -n "$FAKE_PG_RESTORE_FAILS" ]; then
  cat > /dev/null; echo "pg_restore: error: $FAKE_PG_RESTORE_FAILS" >&2; exit 1
fi
case "$*" in
  "-f -") cat ;;
  *) cat > "$FAKE_STATE/restored" ;;
esac
"""

FAKE_PG_DUMPALL = r"""#!/bin/bash
[ "$*" = "--globals-only" ] || exit 2
echo "CREATE ROLE maicivy;"
"""

# psql -c for the versions; psql.sh's SQL on stdin otherwise (logged with its argv).
FAKE_PSQL = r"""#!/bin/bash
case "$*" in
  *"SHOW server_version"*) echo 15.4; exit 0 ;;
  *"SELECT current_database()"*) echo maicivy; exit 0 ;;
esac
sql=$(cat)
printf 'psql %s\n%s\n' "$*" "$sql" >> "$FAKE_STATE/psql.log"
case "$sql" in
  *"query_to_xml"*) printf 'public.accounts|2\npublic."odd name"|1\npublic.empty|0\n' ;;
esac
"""

FAKE_REDIS_CLI = r"""#!/bin/bash
s=$FAKE_STATE
[ -z "$FAKE_REDIS_DOWN" ] || { echo "Could not connect to Redis at 127.0.0.1:6379" >&2; exit 1; }
case "$*" in
  PING) echo PONG ;;
  LASTSAVE) cat "$s/lastsave" 2>/dev/null || echo 100 ;;
  TIME) printf '200\n0\n' ;;
  "BGSAVE SCHEDULE")
    if [ -n "$FAKE_BGSAVE_REPLY" ]; then echo "$FAKE_BGSAVE_REPLY"; exit 0; fi
    echo 201 > "$s/lastsave"; echo "Background saving started" ;;
  "INFO persistence")
    printf 'loading:0\r\nrdb_bgsave_in_progress:0\r\nrdb_last_bgsave_status:%s\r\n' \
      "${FAKE_BGSAVE_STATUS:-ok}" ;;
  "CONFIG GET dir") printf 'dir\n%s\n' "$FAKE_REDIS_DATA" ;;
  "CONFIG GET dbfilename") printf 'dbfilename\ndump.rdb\n' ;;
  "CONFIG GET appendonly") printf 'appendonly\nyes\n' ;;
  "CONFIG GET appenddirname") printf 'appenddirname\nappendonlydir\n' ;;
  "INFO server") printf 'redis_version:7.2.4\r\n' ;;
  "INFO keyspace") printf 'db0:keys=3,expires=1,avg_ttl=0\r\n' ;;
  *) echo "fake redis-cli: unexpected $*" >&2; exit 2 ;;
esac
"""

FAKE_REDIS_CHECK_RDB = r"""#!/bin/bash
if [ "$(cat "$1")" != RDB ]; then
  echo "--- RDB ERROR DETECTED ---"
  echo "[offset 3] Unexpected EOF reading RDB file"
  exit 1
fi
echo "[offset 0] Checking RDB file $1"
echo "[offset 27] AUX FIELD redis-ver = '7.2.4'"
echo "[info] 3 keys read"
echo "[info] 1 expires"
echo "[offset 90] \o/ RDB looks OK! \o/"
"""

# The compressor: identity (so a test can read what was "compressed"); it runs
# out of disk on the stream $FAKE_FULL, lies about the stream $FAKE_CORRUPT, and
# refuses to decompress anything holding CORRUPT.
FAKE_PIGZ = r"""#!/bin/bash
case " $* " in *" -V "*) echo "pigz 2.6"; exit 0 ;; esac
data=$(cat)
case " $* " in *" -d "*)
  case "$data" in *CORRUPT*)
    echo "pigz: skipping: <stdin>: corrupted -- incomplete deflate data" >&2; exit 1 ;;
  esac
  printf '%s\n' "$data"; exit 0 ;;
esac
if [ -n "${FAKE_FULL:-}" ] && [ "$data" = "$FAKE_FULL" ]; then
  echo "pigz: write error: No space left on device" >&2; exit 1
fi
# a compressor or disk that lies:
[ -n "${FAKE_CORRUPT:-}" ] && [ "$data" = "$FAKE_CORRUPT" ] && data="${data}X"
printf '%s\n' "$data"
"""

DUMP_SQL = r"""COPY public.accounts (id, name) FROM stdin;
1	ada
2	back\\slash
\.
COPY public."odd name" (id) FROM stdin;
1
\.
COPY public.empty (id) FROM stdin;
\."""

FAKES = {"docker": FAKE_DOCKER, "pg_dump": FAKE_PG_DUMP, "pg_restore": FAKE_PG_RESTORE,
         "pg_dumpall": FAKE_PG_DUMPALL, "psql": FAKE_PSQL, "redis-cli": FAKE_REDIS_CLI,
         "redis-check-rdb": FAKE_REDIS_CHECK_RDB, "pigz": FAKE_PIGZ}


class Server:
    """A backup directory, a Redis data directory and the fake tools."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.state = tmp / "state"
        self.redis_data = tmp / "redis-data"
        for d in (self.bin, self.state, self.redis_data):
            d.mkdir()
        for name, text in FAKES.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        (self.state / "dump").write_text(DUMP_SQL + "\n")
        (self.redis_data / "dump.rdb").write_text("RDB\n")
        self.backups = tmp / "backups"
        self.settings = load_settings(invoke_section={"backup": {"dir": str(self.backups)}},
                                      environ={}, files=[])
        self.env: dict[str, str] = {}

    def run(self, command: str, **env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
                   "FAKE_STATE": str(self.state), "FAKE_REDIS_DATA": str(self.redis_data),
                   **self.env, **env}
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              env=environ, timeout=60)

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def files(self, kind: str) -> list[str]:
        d = self.backups / kind
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture
def server(tmp_path):
    return Server(tmp_path)


def ok(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return parse_output(proc.stdout)[0]


def failed(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = failure_line(proc.stderr, proc.stdout)
    assert "$" not in line and "['" not in line, line
    return line


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# --- postgres backup ---------------------------------------------------------------


def test_a_postgres_backup_prints_its_facts_and_renames_the_verified_files(server):
    proc = server.run(pg_backup_command(server.settings))
    facts, counts = parse_output(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    name = facts["name"]
    assert name.startswith("postgres-") and facts["file"] == f"{name}.dump.gz"
    assert server.files("postgres") == [f"{name}.dump.gz", f"{name}.globals.sql.gz"]
    data = (server.backups / "postgres" / facts["file"]).read_bytes()
    assert data == (DUMP_SQL + "\n").encode()  # the fake compressor is the identity
    assert facts["sha256"] == sha(data) and facts["raw_sha256"] == sha(data)
    assert facts["size"] == str(len(data))
    assert facts["globals_file"] == f"{name}.globals.sql.gz"
    assert facts["globals_sha256"] == sha("CREATE ROLE maicivy;\n")
    assert (facts["pg_dump_version"], facts["server_version"], facts["database"],
            facts["compressor"]) == ("pg_dump (PostgreSQL) 15.4", "15.4", "maicivy", "pigz 2.6")
    # Rows counted by awk in the stream pg_restore read (a "\\." inside data is data).
    assert counts == {"public.accounts": 2, 'public."odd name"': 1, "public.empty": 0}
    assert float(facts["started"]) <= float(facts["finished"])
    assert proc.stderr == ""


def test_a_second_backup_in_the_same_second_gets_its_own_name(server):
    first = ok(server.run(pg_backup_command(server.settings, label="safety")))
    assert first["name"].endswith("-safety")
    # A partial file of the same second counts as taken: the next name is -2.
    stamp = first["name"].split("-")[1]
    (server.backups / "postgres" / first["file"]).rename(
        server.backups / "postgres" / f".postgres-{stamp}.dump.gz.partial")
    proc = server.run(pg_backup_command(server.settings))
    second = ok(proc)
    if second["name"].split("-")[1] == stamp:  # still the same second
        assert second["name"] == f"postgres-{stamp}-2"


@pytest.mark.parametrize("kind, full, message", [
    ("postgres", DUMP_SQL, "writing the compressed dump to {dir} failed (disk full?) (exit 1)"),
    ("postgres", "CREATE ROLE maicivy;",
     "writing the globals dump to {dir} failed (disk full?) (exit 1)"),
    ("redis", "RDB", "writing the compressed RDB to {dir} failed (disk full?) (exit 1)"),
])
def test_a_full_disk_names_the_real_backup_directory(server, kind, full, message):
    build = pg_backup_command if kind == "postgres" else redis_backup_command
    proc = server.run(build(server.settings), FAKE_FULL=full)
    expected = message.format(dir=server.backups / kind)
    assert failed(proc) == expected + ": pigz: write error: No space left on device"
    assert server.files(kind) == []  # no partial file left


def test_the_file_read_back_must_decompress_to_the_stream_pg_restore_read(server):
    proc = server.run(pg_backup_command(server.settings), FAKE_CORRUPT=DUMP_SQL)
    assert failed(proc) == (
        f"the archive read back from {server.backups / 'postgres'} does not decompress to the "
        "dump pg_restore read (disk or compressor error)")
    assert server.files("postgres") == []


def test_pg_dump_failing_in_the_container_says_why(server):
    proc = server.run(pg_backup_command(server.settings), FAKE_PG_DUMP_FAILS="timeout")
    assert failed(proc) == ("pg_dump failed in the postgres container: pg_dump: error: "
                            "connection to server failed: timeout")
    assert server.files("postgres") == []


def test_pg_restore_unable_to_read_the_dump_fails_the_backup(server):
    proc = server.run(pg_backup_command(server.settings), FAKE_PG_RESTORE_FAILS="bad header")
    assert failed(proc) == "pg_restore cannot read the whole dump: pg_restore: error: bad header"
    assert server.files("postgres") == []


def test_postgres_down_is_one_line_naming_the_service(server):
    proc = server.run(pg_backup_command(server.settings), FAKE_DOWN="postgres")
    assert failed(proc) == ('postgres does not answer (is the postgres service running?): '
                            'service "postgres" is not running')


# --- redis backup ------------------------------------------------------------------


def test_a_redis_backup_prints_its_facts(server):
    facts = ok(server.run(redis_backup_command(server.settings)))
    name = facts["name"]
    assert server.files("redis") == [f"{name}.rdb.gz"]
    data = (server.backups / "redis" / facts["file"]).read_bytes()
    assert data == b"RDB\n" and facts["sha256"] == sha(data) and facts["size"] == "4"
    assert {k: facts[k] for k in ("lastsave", "rdb", "aof", "appenddirname", "redis_version",
                                  "keys_live", "keys", "expires", "rdb_version")} == {
        "lastsave": "201", "rdb": f"{server.redis_data}/dump.rdb", "aof": "yes",
        "appenddirname": "appendonlydir", "redis_version": "7.2.4", "keys_live": "3",
        "keys": "3", "expires": "1", "rdb_version": "7.2.4"}


@pytest.mark.parametrize("env, message", [
    ({"FAKE_BGSAVE_STATUS": "err"},
     "redis reports that BGSAVE failed (rdb_last_bgsave_status:err)"),
    ({"FAKE_BGSAVE_REPLY": "MISCONF Errors writing to the RDB file"},
     "redis refused BGSAVE: MISCONF Errors writing to the RDB file"),
    ({"FAKE_REDIS_DOWN": "1"},
     "redis does not answer PING (Could not connect to Redis at 127.0.0.1:6379)"),
    ({"FAKE_DOWN": "redis"},
     'redis does not answer (is the redis service running?): service "redis" is not running'),
])
def test_redis_save_failures_are_one_line(server, env, message):
    assert failed(server.run(redis_backup_command(server.settings), **env)) == message
    assert server.files("redis") == []


def test_an_rdb_that_redis_check_rdb_rejects_is_not_kept(server):
    (server.redis_data / "dump.rdb").write_text("RD")
    proc = server.run(redis_backup_command(server.settings))
    assert failed(proc) == "redis-check-rdb rejects the RDB (corrupted or truncated) (exit 1)"
    assert server.files("redis") == []


# --- checking an existing archive ----------------------------------------------------


def _archive(server, name: str, text: str) -> Path:
    d = server.backups / "postgres"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    return d / name


def test_check_archive_reads_a_postgres_archive_once(server):
    path = _archive(server, "postgres-20261125T030000Z.dump.gz", "DUMP\n")
    facts = ok(server.run(check_archive_command(server.settings, "postgres", str(path))))
    assert facts["sha256"] == sha("DUMP\n") == facts["raw_sha256"] and facts["size"] == "5"


@pytest.mark.parametrize("kind, name, text, message", [
    ("postgres", "postgres-20261125T030000Z.dump.gz", "CORRUPT\n",
     "the archive does not decompress (corrupted or truncated)"),
    ("postgres", "postgres-20261125T030000Z.dump.bz2", "DUMP\n",
     "unknown compression of {path} (expected .gz or .zst)"),
    ("redis", "redis-20261125T030000Z.rdb.gz", "RD\n",
     "redis-check-rdb rejects the RDB (corrupted or truncated) (exit 1)"),
    ("redis", "redis-20261125T030000Z.rdb.gz", "CORRUPT\n",
     "the archive does not decompress (corrupted or truncated) (exit 1)"),
])
def test_check_archive_refuses_a_damaged_archive_after_printing_its_checksum(
        server, kind, name, text, message):
    path = _archive(server, name, text)
    proc = server.run(check_archive_command(server.settings, kind, str(path)))
    assert failed(proc).startswith(message.format(path=path))
    if "unknown" not in message:
        assert parse_output(proc.stdout)[0]["sha256"] == sha(text)


def test_check_archive_of_a_redis_archive_counts_its_keys(server):
    path = _archive(server, "redis-20261125T030000Z.rdb.gz", "RDB\n")
    facts = ok(server.run(check_archive_command(server.settings, "redis", str(path))))
    assert (facts["sha256"], facts["keys"], facts["expires"], facts["size"]) == \
        (sha("RDB\n"), "3", "1", "4")


def test_check_archive_of_a_missing_file(server):
    path = server.backups / "postgres" / "postgres-20261125T030000Z.dump.gz"
    proc = server.run(check_archive_command(server.settings, "postgres", str(path)))
    assert failed(proc) == f"{path} does not exist"


# --- restoring ---------------------------------------------------------------------


def test_restore_into_creates_restores_and_counts(server):
    path = _archive(server, "postgres-20261125T030000Z.dump.gz", DUMP_SQL + "\n")
    proc = server.run(restore_into_command(server.settings, str(path), "maicivy_restore_1"))
    facts, counts = parse_output(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert facts["restored"] == "1"
    assert counts == {"public.accounts": 2, 'public."odd name"': 1, "public.empty": 0}
    assert (server.state / "restored").read_text() == DUMP_SQL + "\n"
    assert "--single-transaction" in server.log("pg_restore") and \
        "-d maicivy_restore_1" in server.log("pg_restore")
    log = server.log("psql")
    assert "-d postgres -v new=maicivy_restore_1\n" \
           'CREATE DATABASE :"new" TEMPLATE template0 OWNER :"owner";' in log
    assert "-v owner=maicivy" in log and "DROP DATABASE" not in log


def test_a_failed_restore_into_drops_the_new_database(server):
    path = _archive(server, "postgres-20261125T030000Z.dump.gz", DUMP_SQL + "\n")
    proc = server.run(restore_into_command(server.settings, str(path), "maicivy_restore_1"),
                      FAKE_PG_RESTORE_FAILS='role "ghost" does not exist')
    assert failed(proc) == ('pg_restore into maicivy_restore_1 failed (exit 1): '
                            'pg_restore: error: role "ghost" does not exist')
    assert "restored=1" not in proc.stdout
    assert 'DROP DATABASE IF EXISTS :"db";' in server.log("psql").split(
        "-v db=maicivy_restore_1\n", 1)[1]


def test_psql_command_passes_the_sql_on_stdin_and_values_as_variables(server):
    sql = "SELECT 1;\nSELECT ':''x'' $HOME';"
    ok(server.run(psql_command(server.settings, sql, "postgres", db="a b", new="it's")))
    assert server.log("psql") == (
        "psql -X -q -v ON_ERROR_STOP=1 -tA -v owner=maicivy -d postgres "
        f"-v db=a b -v new=it's\n{sql}\n")


def test_rdb_install_moves_the_old_files_aside_and_writes_a_fresh_aof(server):
    data = server.redis_data
    (data / "appendonlydir").mkdir()
    (data / "appendonlydir" / "old.aof").write_text("old")
    path = server.backups / "redis" / "redis-20261125T030000Z.rdb.gz"
    path.parent.mkdir(parents=True)
    path.write_text("NEW RDB\n")
    proc = server.run(rdb_install_command(server.settings, str(path), "aside"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "installed"
    assert (data / "dump.rdb").read_text() == "NEW RDB\n"
    assert (data / "aside" / "dump.rdb").read_text() == "RDB\n"
    assert (data / "aside" / "appendonlydir" / "old.aof").read_text() == "old"
    assert (data / "appendonlydir" / "appendonly.aof.1.base.rdb").read_text() == "NEW RDB\n"
    assert (data / "appendonlydir" / "appendonly.aof.manifest").read_text() == (
        "file appendonly.aof.1.base.rdb seq 1 type b\n"
        "file appendonly.aof.1.incr.aof seq 1 type i\n")
    assert "run --rm --no-deps -T --entrypoint sh redis -c" in server.log("docker")

    back = server.run(rdb_rollback_command(server.settings, "aside"))
    assert back.returncode == 0 and back.stdout == "rolledback\n", back.stderr
    assert sorted(p.name for p in data.iterdir()) == ["appendonlydir", "dump.rdb"]
    assert (data / "dump.rdb").read_text() == "RDB\n"
    assert [p.name for p in (data / "appendonlydir").iterdir()] == ["old.aof"]


def test_rdb_install_of_an_archive_that_does_not_decompress_fails_and_rolls_back(server):
    path = server.backups / "redis" / "redis-20261125T030000Z.rdb.zst"
    path.parent.mkdir(parents=True)
    path.write_text("not zstd")
    proc = server.run(rdb_install_command(server.settings, str(path), "aside"))
    assert failed(proc) == "the archive does not decompress: zstd: /*stdin*\\: unsupported format"
    # What was installed is not the backup: restore.redis puts the previous files back.
    ok(server.run(rdb_rollback_command(server.settings, "aside")))
    assert (server.redis_data / "dump.rdb").read_text() == "RDB\n"
    assert sorted(p.name for p in server.redis_data.iterdir()) == ["dump.rdb"]


def test_redis_wait_prints_the_keys_or_says_redis_did_not_come_back(server):
    proc = server.run(redis_wait_command(server.settings, 5))
    assert proc.returncode == 0 and proc.stdout == "keys=3\n", proc.stderr
    down = server.run(redis_wait_command(server.settings, 1), FAKE_REDIS_DOWN="1")
    assert failed(down) == "redis did not come back within 1s"


def test_the_listing_gives_every_file_and_manifest(server):
    d = server.backups / "postgres"
    d.mkdir(parents=True)
    (d / "postgres-20261125T030000Z.dump.gz").write_text("x" * 7)
    (d / "postgres-20261125T030000Z.json").write_text('{\n  "a": 1\n}\n')
    proc = server.run(listing_command(server.settings))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [
        "file\tpostgres\tpostgres-20261125T030000Z.dump.gz\t7",
        "file\tpostgres\tpostgres-20261125T030000Z.json\t13",
        'manifest\tpostgres\tpostgres-20261125T030000Z.json\t{  "a": 1}',
    ]
