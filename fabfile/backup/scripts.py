"""The command lines that run the backup and restore scripts (pure builders, no I/O).

The scripts are the ``*.sh`` files beside this module. Those that run on the
server (``pg-backup.sh``, ``redis-backup.sh``, ``check-archive.sh``,
``restore-into.sh``, ``rdb-install.sh``) start with ``common.sh`` (strict mode,
``fail``, the compressor choice, the checks they share) and take their values
as positional arguments, then ``--`` and the stack's ``docker compose``
command. Those that run inside a container (``pg-dump.sh``, ``psql.sh``,
``redis-*.sh``) are POSIX ``sh`` and are passed as arguments to the former, or
run by ``docker compose exec/run ... sh -c``. Nothing here edits script text.

The data goes from the container straight into a file in the backup directory,
never through Python or over the SSH link. Scripts print ``key=value`` lines
(and ``count<TAB>rows<TAB>table`` lines) that :func:`parse_output` reads back;
on failure they print one ``FAILED: what went wrong`` line on stderr and
remove what they wrote (``*.partial`` files).

Layout in ``backup.dir``::

    postgres/postgres-20261125T030000Z.dump.gz          pg_dump -Fc -Z0, compressed here
    postgres/postgres-20261125T030000Z.globals.sql.gz   pg_dumpall --globals-only
    postgres/postgres-20261125T030000Z.json             manifest, written last
    redis/redis-20261125T030500Z.rdb.gz                 the RDB of a fresh BGSAVE
    redis/redis-20261125T030500Z.json
    .lock-postgres, .lock-redis                         one backup at a time per kind
"""

from __future__ import annotations

import re

from ..config import Settings
from ..shell import Script, q, script
from ..stack import compose, compose_argv

KINDS = ("postgres", "redis")

# A backup's name: KIND-<UTC stamp>[-n][-LABEL]; a label marks a safety copy.
LABELS = ("safety",)
NAME_RE = re.compile(r"^(postgres|redis)-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?(-safety)?$")

# Exact row count of every ordinary table, named like pg_dump's COPY lines.
COUNT_ROWS_SQL = (
    "SELECT format('%I.%I', n.nspname, c.relname), "
    "(xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM ONLY %I.%I', "
    "n.nspname, c.relname), false, true, '')))[1]::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1"
)

# Blocks new connections to :"db", terminates the existing ones (waiting up to
# 10 s), then renames both databases in one transaction: either the swap happens
# whole, or :"db" is still the original and connectable. (psql vars db, new, old)
SWAP_DATABASES_SQL = r"""SELECT set_config('maicivy.db', :'db', false);
ALTER DATABASE :"db" ALLOW_CONNECTIONS false;
DO $$
DECLARE n int;
BEGIN
  FOR i IN 1..100 LOOP
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE datname = current_setting('maicivy.db') AND pid <> pg_backend_pid();
    PERFORM pg_stat_clear_snapshot();
    SELECT count(*) INTO n FROM pg_stat_activity
      WHERE datname = current_setting('maicivy.db') AND pid <> pg_backend_pid();
    EXIT WHEN n = 0;
    PERFORM pg_sleep(0.1);
  END LOOP;
  IF n > 0 THEN
    RAISE EXCEPTION '% sessions still connected to %', n, current_setting('maicivy.db');
  END IF;
END $$;
BEGIN;
ALTER DATABASE :"db" RENAME TO :"old";
ALTER DATABASE :"new" RENAME TO :"db";
COMMIT;
SELECT 'swapped';"""

ALLOW_CONNECTIONS_SQL = 'ALTER DATABASE :"db" ALLOW_CONNECTIONS true;'
DROP_DATABASE_SQL = 'DROP DATABASE IF EXISTS :"db";'

# Where the stack's Redis keeps its data: templates/docker/docker-compose.prod.yml
# runs ``redis-server --dir /data --appendonly yes`` with the default file names.
# A restore operates on these, never on paths read from a manifest.
REDIS_DATA_DIR = "/data"
REDIS_DBFILENAME = "dump.rdb"
REDIS_APPENDDIRNAME = "appendonlydir"
REDIS_APPENDONLY = "yes"

# --- the scripts -------------------------------------------------------------------

COMMON = script(__file__, "common.sh")


def _on_server(name: str) -> Script:
    """A host-side script: common.sh, then the file ``name``."""
    return Script(name, COMMON.text + script(__file__, name).text)


PG_BACKUP = _on_server("pg-backup.sh")
REDIS_BACKUP = _on_server("redis-backup.sh")
CHECK_ARCHIVE = _on_server("check-archive.sh")
RESTORE_INTO = _on_server("restore-into.sh")
RDB_INSTALL = _on_server("rdb-install.sh")

LISTING = script(__file__, "listing.sh")

# Inside the containers (POSIX sh).
PG_DUMP = script(__file__, "pg-dump.sh")
PSQL = script(__file__, "psql.sh")
REDIS_SAVE = script(__file__, "redis-save.sh")
REDIS_CHECK = script(__file__, "redis-check.sh")
REDIS_WAIT = script(__file__, "redis-wait.sh")
REDIS_INSTALL = script(__file__, "redis-install.sh")
REDIS_ROLLBACK = script(__file__, "redis-rollback.sh")


def kind_dir(settings: Settings, kind: str) -> str:
    return f"{settings.backup.dir}/{kind}"


def lock_path(settings: Settings, kind: str) -> str:
    return f"{settings.backup.dir}/.lock-{kind}"


def _run(run: Script, settings: Settings, *args) -> str:
    """``bash -c <common.sh + script> NAME ARGS... -- docker compose ...``."""
    return run.command(*args, "--", *compose_argv(settings))


def _label(label: str) -> str:
    if label and label not in LABELS:
        raise ValueError(f"unknown backup label {label!r}")
    return label


def listing_command(settings: Settings) -> str:
    """One round trip: every file of every kind, and every manifest's content."""
    return LISTING.command(*(kind_dir(settings, k) for k in KINDS))


# --- postgres -------------------------------------------------------------------


def pg_backup_command(settings: Settings, compression: str | None = None,
                      label: str = "") -> str:
    """Dump, compress, fsync, verify and rename one Postgres backup; print its facts."""
    return _run(PG_BACKUP, settings, kind_dir(settings, "postgres"),
                compression or settings.backup.compression, _label(label), PG_DUMP.text)


def check_archive_command(settings: Settings, kind: str, path: str) -> str:
    """Read an existing archive: sha256, a full check (decompression; redis-check-rdb
    for Redis), size. (A Postgres archive's contents are read whole by pg_restore
    when it is restored, and the row counts compared there.)"""
    extra = (REDIS_CHECK.text,) if kind == "redis" else ()
    return _run(CHECK_ARCHIVE, settings, kind, path, *extra)


def restore_into_command(settings: Settings, archive: str, database: str) -> str:
    """Create ``database``, restore ``archive`` into it in one transaction (dropped
    again on failure), then count the rows of every table."""
    return _run(RESTORE_INTO, settings, archive, database, PSQL.text, COUNT_ROWS_SQL)


def psql_command(settings: Settings, sql: str, database: str = "postgres",
                 **variables) -> str:
    """``sql`` on psql's stdin in the postgres container (psql.sh, ON_ERROR_STOP),
    with psql variables used as ``:"name"`` / ``:'name'`` (quoted by psql)."""
    args = [a for key, value in variables.items() for a in ("-v", f"{key}={value}")]
    return (f"printf '%s\\n' {q(sql)} | "
            + compose(settings, "exec", "-T", "postgres", *PSQL.argv(database, *args)))


def drop_database_command(settings: Settings, database: str) -> str:
    return psql_command(settings, DROP_DATABASE_SQL, "postgres", db=database)


# --- redis ----------------------------------------------------------------------


def redis_backup_command(settings: Settings, compression: str | None = None,
                         label: str = "") -> str:
    """BGSAVE, copy the RDB out, compress, fsync, check, rename; print its facts."""
    return _run(REDIS_BACKUP, settings, kind_dir(settings, "redis"),
                compression or settings.backup.compression, _label(label),
                settings.backup.bgsave_timeout_seconds, REDIS_SAVE.text, REDIS_CHECK.text)


def redis_wait_command(settings: Settings, timeout: int) -> str:
    """Wait (in the redis container) until redis answers with its data loaded: keys=N."""
    return compose(settings, "exec", "-T", "redis", *REDIS_WAIT.argv(timeout))


def rdb_install_command(settings: Settings, archive: str, aside: str) -> str:
    """Decompress ``archive`` into the redis volume (one-off container, redis stopped),
    the current files moved aside into ``aside``."""
    return _run(RDB_INSTALL, settings, archive, REDIS_INSTALL.text, REDIS_DATA_DIR, aside,
                REDIS_DBFILENAME, REDIS_APPENDONLY, REDIS_APPENDDIRNAME)


def rdb_rollback_command(settings: Settings, aside: str) -> str:
    """Put back what :func:`rdb_install_command` moved aside."""
    return compose(settings, "run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "redis",
                   *REDIS_ROLLBACK.argv(REDIS_DATA_DIR, aside, REDIS_DBFILENAME,
                                        REDIS_APPENDDIRNAME)[1:])


def rdb_discard_command(settings: Settings, aside: str) -> str:
    """Remove the files a successful restore moved aside (in the redis container)."""
    return compose(settings, "exec", "-T", "redis", "sh", "-c", 'rm -rf -- "$1/$2"', "sh",
                   REDIS_DATA_DIR, aside)


# --- parsing --------------------------------------------------------------------


def parse_output(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """``key=value`` facts and ``count<TAB>rows<TAB>table`` row counts of a script."""
    facts: dict[str, str] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("count\t"):
            _, rows, table = line.split("\t", 2)
            counts[table] = int(rows)
        elif "=" in line and re.match(r"^[a-z_0-9]+=", line):
            key, _, value = line.partition("=")
            facts[key] = value.strip()
    return facts, counts


def failure_line(stderr: str, stdout: str = "") -> str:
    """The one line that says what went wrong (the script's FAILED: line, else the last)."""
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED: ")]
    if failed:
        message = failed[-1][len("FAILED: "):]
        # The tool's own complaint just before our line, when there is one.
        idx = lines.index(failed[-1])
        detail = [ln for ln in lines[:idx] if not ln.startswith(("FAILED: ", "warning: "))]
        if detail and detail[-1] not in message:
            message += f": {detail[-1]}"
        return message
    return lines[-1] if lines else "no output"
