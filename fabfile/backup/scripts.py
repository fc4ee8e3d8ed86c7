"""Server-side scripts of the backup and restore tasks (pure builders, no I/O).

Every script runs through ``bash -c`` on the server (``Host.run``): the data
goes from the container straight into a file in the backup directory, never
through Python or over the SSH link. Scripts print ``key=value`` lines (and
``count<TAB>rows<TAB>table`` lines) that :func:`parse_output` reads back; on
failure they print one ``FAILED: what went wrong`` line on stderr and remove
what they wrote (``*.partial`` files).

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
import shlex

from ..config import Settings
from ..stack import compose

KINDS = ("postgres", "redis")

# Inside the postgres container: connect as the stack's superuser over the
# local socket; the password (if needed) comes from the container's own env.
PG_ENV = (
    'export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" '
    'PGDATABASE="$POSTGRES_DB"'
)
# Inside the redis container: the password from the container's env, never argv.
REDIS_ENV = 'export REDISCLI_AUTH="$REDIS_PASSWORD"'

# Counts the rows of every table in a plain SQL stream (pg_restore -f -): one
# line per row between "COPY <table> (...) FROM stdin;" and "\.".
# Inside a COPY block each line costs one string comparison (a data line can
# never be a lone "\." in COPY's text format: a backslash is written doubled).
COUNT_ROWS_AWK = (
    r'c{if($0=="\\."){printf "count\t%d\t%s\n", n, t; c=0} else n++; next} '
    r'/^COPY /{t=$0; sub(/^COPY /,"",t); sub(/ \(.*$| FROM stdin;$/,"",t); n=0; c=1}'
)

# Exact row count of every ordinary table, named like pg_dump's COPY lines.
COUNT_ROWS_SQL = (
    "SELECT format('%I.%I', n.nspname, c.relname), "
    "(xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM ONLY %I.%I', "
    "n.nspname, c.relname), false, true, '')))[1]::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1"
)

# A backup's name: KIND-<UTC stamp>[-n][-LABEL]; a label marks a safety copy.
LABELS = ("safety",)
NAME_RE = re.compile(r"^(postgres|redis)-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?(-safety)?$")

HEADER = r"""set -Eeuo pipefail
umask 077
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP
# A command that fails outside any check ends the script (set -e): name it.
trap 'rc=$?; [[ $- != *e* ]] || printf "FAILED: step exited %s: %s\n" "$rc" "$BASH_COMMAND" >&2' ERR
echo "started=$(date -u +%s.%N)"
"""

# Picks the compressor on the server (pigz uses every core; gzip otherwise).
COMPRESSOR = r"""pick_compressor() {
  case "$1" in
    zstd)
      if command -v zstd >/dev/null 2>&1; then
        Z=(zstd -q -T0 -3 -c); ZEXT=zst; ZTOOL="$(zstd -V 2>&1 | head -n 1)"; return
      fi
      echo "warning: zstd is not installed on the server; compressing with gzip" >&2 ;;
  esac
  if command -v pigz >/dev/null 2>&1; then
    Z=(pigz -6 -c -p "$(nproc)"); ZTOOL="$(pigz -V 2>&1 | head -n 1)"
  else
    Z=(gzip -6 -c); ZTOOL="$(gzip -V 2>&1 | head -n 1)"
  fi
  ZEXT=gz
}
decompressor() {
  case "$1" in
    *.zst|*.zst.partial)
      command -v zstd >/dev/null 2>&1 ||
        fail "zstd is not installed on the server (apt-get install zstd)"
      D=(zstd -q -d -c) ;;
    *.gz|*.gz.partial)
      if command -v pigz >/dev/null 2>&1; then D=(pigz -d -c); else D=(gzip -d -c); fi ;;
    *) fail "unknown compression of $1 (expected .gz or .zst)" ;;
  esac
}
"""


def bash(script: str) -> str:
    """A command line that runs ``script`` with bash (whatever the login shell)."""
    return "bash -c " + shlex.quote(script)


def q(value: str) -> str:
    return shlex.quote(str(value))


# Variables of the generated scripts that a message may name (expanded by bash).
MESSAGE_VARS = ("dir", "tmp", "gtmp", "archive", "data", "gdata")


def dq(text: str) -> str:
    """``text`` as a bash double-quoted word: inert, except ``$dir``-style references
    to the scripts' own variables (:data:`MESSAGE_VARS`), which expand to real paths."""
    escaped = re.sub(r'([\\"`$])', r"\\\1", str(text))
    for var in MESSAGE_VARS:
        escaped = re.sub(r"\\\$(\{" + var + r"\}|" + var + r"\b)", r"$\1", escaped)
    return f'"{escaped}"'


def kind_dir(settings: Settings, kind: str) -> str:
    return f"{settings.backup.dir}/{kind}"


def lock_path(settings: Settings, kind: str) -> str:
    return f"{settings.backup.dir}/.lock-{kind}"


def exec_in(settings: Settings, service: str, script: str, *args: str) -> str:
    """``docker compose exec -T SERVICE sh -c SCRIPT sh ARGS...`` (quoted)."""
    return compose(settings, "exec", "-T", service, "sh", "-c", script, "sh", *args)


def _new_name(kind: str, label: str = "") -> str:
    """Bash: choose a fresh backup name ``KIND-<UTC stamp>[-n][-LABEL]`` into $name."""
    if label and label not in LABELS:
        raise ValueError(f"unknown backup label {label!r}")
    suffix = f"-{label}" if label else ""
    return (
        f'stamp=$(date -u +%Y%m%dT%H%M%SZ); name={kind}-$stamp{suffix}; i=1\n'
        f'while compgen -G "$dir/{kind}-$stamp*" >/dev/null || '
        f'compgen -G "$dir/.{kind}-$stamp*" >/dev/null; '
        f'do i=$((i+1)); stamp=${{stamp%%-*}}-$i; name={kind}-$stamp{suffix}; done\n'
        'echo "name=$name"\n'
    )


def _pipe_status(labels: tuple[str, ...], writer_first: bool) -> str:
    """Bash: check each exit status of the last pipeline (saved in $st)."""
    lines = []
    order = list(enumerate(labels))
    if writer_first:  # a writer that fails (disk full) also kills the stages before it
        order.reverse()
    for i, label in order:
        lines.append(f'[ "${{st[{i}]}}" = 0 ] || fail {dq(label)}" (exit ${{st[{i}]}})"')
    return "\n".join(lines) + "\n"


def _pipe(command: str, *labels: str, writer_first: bool = False) -> str:
    """Bash: run a pipeline without -e, then fail with the label of the stage that broke."""
    return (f"set +e\n{command}\nst=(\"${{PIPESTATUS[@]}}\")\nset -e\n"
            + _pipe_status(labels, writer_first))


def _finish_file() -> str:
    """Bash: fsync $tmp, then drop it from the page cache so the check reads the disk."""
    return (
        'sync -- "$tmp" || fail "cannot fsync $tmp"\n'
        'dd if="$tmp" iflag=nocache count=0 status=none 2>/dev/null || true\n'
    )


# --- postgres -------------------------------------------------------------------


# Inside the postgres container: pg_dump, its stream read whole by pg_restore
# (rows counted) and checksummed *while* it goes out on stdout: no second pass
# over the data. POSIX sh (no pipefail): statuses, counts and the sha256 of the
# uncompressed stream go to stderr as key=value / count lines.
PG_DUMP_SH = PG_ENV + r"""
st=$(mktemp -d) || exit 1
trap 'rm -rf "$st"' EXIT
mkfifo "$st/r" "$st/s" || exit 1
{ pg_restore -f - < "$st/r"; echo "status_restore=$?" > "$st/rs"; } |
  awk '""" + COUNT_ROWS_AWK.replace("'", "'\\''") + r"""' > "$st/counts" &
sha256sum < "$st/s" > "$st/sha" &
{ pg_dump -Fc -Z0; echo "status_dump=$?" > "$st/ds"; } | tee "$st/r" "$st/s"
echo "status_tee=$?" >&2
wait
cat "$st/counts" "$st/rs" "$st/ds" >&2
echo "raw_sha256=$(cut -d' ' -f1 < "$st/sha")" >&2
"""


def _dump_status(errfile: str, what: str) -> str:
    """Bash: fail unless the dump's in-container steps all exited 0 (see PG_DUMP_SH)."""
    last = (f'$(grep -v -e "^count" -e "^status_" -e "^raw_sha256=" {errfile} '
            "| sed -n '/./h; ${x;p}')")
    return (
        f'grep -qx "status_dump=0" {errfile} || fail "pg_dump failed in the postgres '
        f'container: {last}"\n'
        f'grep -qx "status_restore=0" {errfile} || fail "pg_restore cannot read the whole '
        f'{what}: {last}"\n'
        f'grep -qx "status_tee=0" {errfile} || fail "streaming the dump out of the postgres '
        f'container failed: {last}"\n'
    )


def read_back(archive: str = '"$tmp"') -> str:
    """Bash: read ``archive`` ONCE: its sha256 (into $work/sha) and the sha256 of what
    it decompresses to (into $work/raw), checksum and decompression together."""
    return (
        f"decompressor {archive}\n"
        + 'rm -f -- "$work/f"; mkfifo -- "$work/f" || fail "cannot create a fifo in $work"\n'
        + 'sha256sum < "$work/f" > "$work/sha" &\nshapid=$!\n'
        + 'exec 3> "$work/f"  # a writer of our own: the checksum ends even if tee never ran\n'
        + "set +e\n"
        + f'tee "$work/f" < {archive} | "${{D[@]}}" | sha256sum > "$work/raw"\n'
        + 'st=("${PIPESTATUS[@]}")\nexec 3>&-\nwait "$shapid"; shast=$?\nset -e\n'
        + f'[ "${{st[0]}}" = 0 ] || fail "cannot read "{archive}" to checksum it"\n'
        + '[ "$shast" = 0 ] && [ -s "$work/sha" ] || fail "cannot checksum the archive"\n'
        + '# The checksum first: a damaged file is told by it, whatever else fails.\n'
        + 'echo "sha256=$(cut -d" " -f1 < "$work/sha")"\n'
        + '[ "${st[1]}" = 0 ] || fail "the archive does not decompress (corrupted or truncated)"\n'
    )


def pg_backup_script(settings: Settings, compression: str | None = None,
                     label: str = "") -> str:
    """Dump, compress, fsync, verify and rename one Postgres backup; print its facts."""
    d = kind_dir(settings, "postgres")
    compression = compression or settings.backup.compression
    versions = exec_in(
        settings, "postgres",
        f"{PG_ENV}; pg_dump --version && psql -XtAq -c 'SHOW server_version' "
        "&& psql -XtAq -c 'SELECT current_database()'",
    )
    dump = exec_in(settings, "postgres", PG_DUMP_SH)
    dump_globals = exec_in(settings, "postgres", f"{PG_ENV}; exec pg_dumpall --globals-only")
    return (
        HEADER + COMPRESSOR
        + f"dir={q(d)}\n"
        + 'mkdir -p -- "$dir" || fail "cannot create the backup directory $dir"\n'
        + 'work=$(mktemp -d) || fail "cannot create a temporary directory"\n'
        + "tmp=; gtmp=\n"
        + "trap 'rm -rf -- \"$work\"; [ -z \"$tmp\" ] || rm -f -- \"$tmp\" \"$gtmp\"' EXIT\n"
        + f"pick_compressor {q(compression)}\n"
        + f"versions=$({versions} </dev/null) || "
        + 'fail "postgres does not answer (is the postgres service running?)"\n'
        + 'echo "pg_dump_version=$(sed -n 1p <<<"$versions")"\n'
        + 'echo "server_version=$(sed -n 2p <<<"$versions")"\n'
        + 'echo "database=$(sed -n 3p <<<"$versions")"\n'
        + 'echo "compressor=$ZTOOL"\n'
        + _new_name("postgres", label)
        + 'data=$dir/$name.dump.$ZEXT; tmp=$dir/.$name.dump.$ZEXT.partial\n'
        + 'gdata=$dir/$name.globals.sql.$ZEXT; gtmp=$dir/.$name.globals.sql.$ZEXT.partial\n'
        + "set +e\n"
        + f'{dump} </dev/null 2> "$work/dump.err" | "${{Z[@]}}" > "$tmp"\n'
        + 'st=("${PIPESTATUS[@]}")\nset -e\n'
        + '[ "${st[1]}" = 0 ] || fail "writing the compressed dump to $dir failed (disk full?) '
        + '(exit ${st[1]})"\n'
        + '[ "${st[0]}" = 0 ] || fail "pg_dump failed in the postgres container (exit ${st[0]}): '
        + '$(tail -n 1 "$work/dump.err")"\n'
        + _dump_status('"$work/dump.err"', "dump")
        + _pipe(
            f'{dump_globals} </dev/null | "${{Z[@]}}" > "$gtmp"',
            "pg_dumpall --globals-only failed in the postgres container",
            "writing the globals dump to $dir failed (disk full?)",
            writer_first=True,
        )
        + 'sync -- "$gtmp" || fail "cannot fsync $gtmp"\n'
        + _finish_file()
        + read_back()
        + 'want=$(sed -n "s/^raw_sha256=//p" "$work/dump.err")\n'
        + '[ "$(cut -d" " -f1 < "$work/raw")" = "$want" ] || fail "the archive read back from '
        + '$dir does not decompress to the dump pg_restore read (disk or compressor error)"\n'
        + 'grep "^count" "$work/dump.err" || [ $? = 1 ]  # 1: no table (an empty database)\n'
        + 'decompressor "$gtmp"\n'
        + _pipe('"${D[@]}" < "$gtmp" | wc -c > /dev/null',
                "the globals dump does not decompress", "reading the globals dump failed")
        + 'echo "sha256=$(cut -d" " -f1 < "$work/sha")"\n'
        + 'echo "raw_sha256=$want"\n'
        + 'echo "size=$(stat -c %s -- "$tmp")"\n'
        + 'echo "globals_sha256=$(sha256sum < "$gtmp" | cut -d" " -f1)"\n'
        + 'echo "globals_size=$(stat -c %s -- "$gtmp")"\n'
        + 'mv -f -- "$tmp" "$data" && mv -f -- "$gtmp" "$gdata" && tmp= '
        + '|| fail "cannot rename the verified backup into place"\n'
        + 'sync -- "$dir" || true\n'
        + 'echo "file=${data##*/}"\necho "globals_file=${gdata##*/}"\n'
        + 'echo "finished=$(date -u +%s.%N)"\n'
    )


def pg_check_archive_script(settings: Settings, path: str) -> str:
    """Read an existing archive once: sha256 and full decompression; print sha256, size.

    (Its contents are read whole by pg_restore when it is restored, into a new
    or scratch database, and the row counts compared there.)"""
    return (
        HEADER + COMPRESSOR
        + f"archive={q(path)}\n"
        + '[ -f "$archive" ] || fail "$archive does not exist"\n'
        + 'work=$(mktemp -d) || fail "cannot create a temporary directory"\n'
        + "trap 'rm -rf -- \"$work\"' EXIT\n"
        + read_back('"$archive"')
        + 'echo "raw_sha256=$(cut -d" " -f1 < "$work/raw")"\n'
        + 'echo "size=$(stat -c %s -- "$archive")"\n'
    )


def _check_archive_script(path: str, verify_stream: str) -> str:
    """Checksum an existing archive, run ``verify_stream`` on it, print sha256 and size."""
    return (
        HEADER + COMPRESSOR
        + f"archive={q(path)}\n"
        + '[ -f "$archive" ] || fail "$archive does not exist"\n'
        + 'work=$(mktemp -d) || fail "cannot create a temporary directory"\n'
        + "trap 'rm -rf -- \"$work\"' EXIT\n"
        + 'sha=$(sha256sum < "$archive") || fail "cannot read $archive to checksum it"\n'
        + 'echo "sha256=${sha%% *}"\n'
        + verify_stream
        + 'echo "size=$(stat -c %s -- "$archive")"\n'
    )


def psql_script(settings: Settings, sql: str, database: str = "postgres", **variables) -> str:
    """``compose exec`` running ``sql`` (psql, ON_ERROR_STOP) with psql variables.

    Variables are passed as arguments and used as ``:"name"`` (identifier) or
    ``:'name'`` (literal) in ``sql``, so names are quoted by psql itself.
    """
    args = []
    for key, value in variables.items():
        args += ["-v", f"{key}={value}"]
    inner = (
        f'{PG_ENV}; db="$1"; shift; exec psql -X -q -v ON_ERROR_STOP=1 -tA -d "$db" "$@" '
        f"<<'MAICIVY_SQL'\n{sql}\nMAICIVY_SQL"
    )
    return exec_in(settings, "postgres", inner, database, *args)


def count_rows_script(settings: Settings, database: str) -> str:
    """``count<TAB>rows<TAB>table`` for every table of ``database``."""
    sql = COUNT_ROWS_SQL + ";"
    cmd = psql_script(settings, sql, database)
    awk = r'{n=$NF; sub(/[|][^|]*$/, ""); printf "count\t%s\t%s\n", n, $0}'
    return cmd + " | awk -F'|' " + q(awk)


def pg_restore_into_script(settings: Settings, archive: str, database: str) -> str:
    """Create ``database`` and restore ``archive`` into it in one transaction.

    On any failure the new database is dropped again; nothing else is touched.
    """
    create = exec_in(
        settings, "postgres",
        f'{PG_ENV}; exec psql -X -q -v ON_ERROR_STOP=1 -d postgres -v new="$1" '
        "-v owner=\"$POSTGRES_USER\" <<'MAICIVY_SQL'\n"
        'CREATE DATABASE :"new" TEMPLATE template0 OWNER :"owner";\nMAICIVY_SQL',
        database,
    )
    drop = psql_script(settings, 'DROP DATABASE IF EXISTS :"db";', "postgres", db=database)
    restore = exec_in(
        settings, "postgres",
        f'{PG_ENV}; exec pg_restore --exit-on-error --single-transaction --no-password -d "$1"',
        database,
    )
    return (
        HEADER + COMPRESSOR
        + f"archive={q(archive)}\n"
        + f"{create} </dev/null >/dev/null || fail {q('cannot create database ' + database)}\n"
        + f"drop_new() {{\n{drop} </dev/null >/dev/null 2>&1 || true\n}}\n"
        + "trap drop_new EXIT\n"
        + 'decompressor "$archive"\n'
        + _pipe(
            f'"${{D[@]}}" < "$archive" | {restore}',
            "the archive does not decompress",
            f"pg_restore into {database} failed",
        )
        + "trap - EXIT\n"
        + 'echo "restored=1"\n'
    )


def drop_database_script(settings: Settings, database: str) -> str:
    return psql_script(settings, 'DROP DATABASE IF EXISTS :"db";', "postgres", db=database)


def swap_databases_sql() -> str:
    """SQL (psql vars ``db``, ``new``, ``old``) that swaps ``new`` in place of ``db``.

    Blocks new connections to ``db``, terminates the existing ones (waiting up
    to 10 s), then renames both databases in one transaction: either the swap
    happens whole, or ``db`` is still the original and connectable.
    """
    return r"""SELECT set_config('maicivy.db', :'db', false);
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


def allow_connections_sql() -> str:
    return 'ALTER DATABASE :"db" ALLOW_CONNECTIONS true;'


def database_exists_sql() -> str:
    return "SELECT count(*) FROM pg_database WHERE datname = :'db';"


# --- redis ----------------------------------------------------------------------

# Inside the redis container: BGSAVE and wait until LASTSAVE moves past the
# value it had before (and no save is running), then print where the RDB is.
REDIS_SAVE_SH = r"""REDISCLI_AUTH="$REDIS_PASSWORD"; export REDISCLI_AUTH
timeout="$1"
r() { redis-cli "$@" 2>&1 | tr -d '\r'; }
ping=$(r PING)
[ "$ping" = PONG ] || { echo "FAILED: redis does not answer PING ($ping)" >&2; exit 1; }
start=$(date +%s)
while :; do
  before=$(r LASTSAVE)
  now=$(r TIME | head -n 1)
  # LASTSAVE has a resolution of one second: make sure ours is a later second.
  [ "$before" -lt "$now" ] 2>/dev/null || sleep 1
  out=$(r BGSAVE SCHEDULE)
  case "$out" in
    *started*|*scheduled*) break ;;
    *"already in progress"*) sleep 0.2 ;;
    *) echo "FAILED: redis refused BGSAVE: $out" >&2; exit 1 ;;
  esac
  [ $(( $(date +%s) - start )) -lt "$timeout" ] || {
    echo "FAILED: a save already running did not finish within ${timeout}s" >&2; exit 1; }
done
while :; do
  last=$(r LASTSAVE)
  info=$(r INFO persistence)
  if [ "$last" -gt "$before" ] 2>/dev/null &&
     echo "$info" | grep -q '^rdb_bgsave_in_progress:0'; then
    break
  fi
  [ $(( $(date +%s) - start )) -lt "$timeout" ] || {
    echo "FAILED: BGSAVE did not finish within ${timeout}s (LASTSAVE did not move)" >&2; exit 1; }
  sleep 0.2
done
echo "$info" | grep -q '^rdb_last_bgsave_status:ok' || {
  status=$(echo "$info" | grep '^rdb_last_bgsave_status')
  echo "FAILED: redis reports that BGSAVE failed ($status)" >&2
  exit 1; }
echo "lastsave=$last"
echo "rdb=$(r CONFIG GET dir | sed -n 2p)/$(r CONFIG GET dbfilename | sed -n 2p)"
echo "aof=$(r CONFIG GET appendonly | sed -n 2p)"
echo "appenddirname=$(r CONFIG GET appenddirname | sed -n 2p)"
echo "redis_version=$(r INFO server | sed -n 's/^redis_version://p')"
keys=$(r INFO keyspace | sed -n 's/^db[0-9]*:keys=\([0-9]*\).*/\1/p')
echo "keys_live=$(echo "$keys" | awk '{s+=$1} END {print s+0}')"
"""

# Inside the redis container: check an RDB read from stdin with redis-check-rdb.
REDIS_CHECK_SH = r"""f=$(mktemp) || exit 1
trap 'rm -f "$f"' EXIT
cat > "$f" || exit 1
redis-check-rdb "$f" 2>&1
"""


def redis_verify_stream(settings: Settings, archive: str = '"$tmp"') -> str:
    """Bash: decompress the archive, check it with redis-check-rdb, print keys."""
    check = exec_in(settings, "redis", REDIS_CHECK_SH)
    return (
        f"decompressor {archive}\n"
        + _pipe(
            f'"${{D[@]}}" < {archive} | {check} > "$work/check"',
            "the archive does not decompress (corrupted or truncated)",
            "redis-check-rdb rejects the RDB (corrupted or truncated)",
        )
        + 'grep -q "RDB looks OK" "$work/check" || '
        + 'fail "redis-check-rdb rejects the RDB: $(grep -m1 -i "error\\|fail" "$work/check")"\n'
        + 'echo "keys=$(sed -n "s/.*\\[info\\] \\([0-9]*\\) keys read.*/\\1/p" "$work/check")"\n'
        + 'echo "expires=$(sed -n "s/.*\\[info\\] \\([0-9]*\\) expires.*/\\1/p" "$work/check")"\n'
        + 'echo "rdb_version=$(sed -n "s/.*RDB version \\([0-9]*\\).*/\\1/p;'
        + 's/.*AUX FIELD redis-ver = .\\([0-9.]*\\).*/\\1/p" "$work/check" | head -n 1)"\n'
    )


def redis_backup_script(settings: Settings, compression: str | None = None,
                        label: str = "") -> str:
    """BGSAVE, copy the RDB out, compress, fsync, check, rename; print its facts."""
    d = kind_dir(settings, "redis")
    compression = compression or settings.backup.compression
    save = exec_in(settings, "redis", REDIS_SAVE_SH, str(settings.backup.bgsave_timeout_seconds))
    copy = exec_in(settings, "redis", 'exec cat -- "$1"', "$rdb")
    # "$rdb" must be expanded by bash on the host: un-quote it.
    copy = copy.replace(q("$rdb"), '"$rdb"')
    return (
        HEADER + COMPRESSOR
        + f"dir={q(d)}\n"
        + 'mkdir -p -- "$dir" || fail "cannot create the backup directory $dir"\n'
        + 'work=$(mktemp -d) || fail "cannot create a temporary directory"\n'
        + "tmp=\n"
        + "trap 'rm -rf -- \"$work\"; [ -z \"$tmp\" ] || rm -f -- \"$tmp\"' EXIT\n"
        + f"pick_compressor {q(compression)}\n"
        + f'if ! {save} </dev/null > "$work/save" 2> "$work/save.err"; then\n'
        + '  msg=$(sed -n "s/^FAILED: //p" "$work/save.err" | head -n 1)\n'
        + '  [ -n "$msg" ] || msg="redis does not answer (is the redis service running?): '
        + '$(tail -n 1 "$work/save.err")"\n'
        + '  fail "$msg"\nfi\n'
        + 'cat "$work/save"\n'
        + 'rdb=$(sed -n "s/^rdb=//p" "$work/save")\n'
        + 'echo "compressor=$ZTOOL"\n'
        + _new_name("redis", label)
        + 'data=$dir/$name.rdb.$ZEXT; tmp=$dir/.$name.rdb.$ZEXT.partial\n'
        + _pipe(
            f'{copy} </dev/null | "${{Z[@]}}" > "$tmp"',
            "copying the RDB out of the redis container failed",
            "writing the compressed RDB to $dir failed (disk full?)",
            writer_first=True,
        )
        + _finish_file()
        + 'sha256sum < "$tmp" > "$work/sha" &\nshapid=$!\n'
        + redis_verify_stream(settings)
        + 'wait "$shapid" || fail "cannot read $tmp to checksum it"\n'
        + 'echo "sha256=$(cut -d" " -f1 < "$work/sha")"\n'
        + 'echo "size=$(stat -c %s -- "$tmp")"\n'
        + 'mv -f -- "$tmp" "$data" && tmp= || fail "cannot rename the verified backup into place"\n'
        + 'sync -- "$dir" || true\n'
        + 'echo "file=${data##*/}"\n'
        + 'echo "finished=$(date -u +%s.%N)"\n'
    )


def redis_check_archive_script(settings: Settings, path: str) -> str:
    """Checksum an existing RDB archive and check it with redis-check-rdb."""
    return _check_archive_script(path, redis_verify_stream(settings, '"$archive"'))


# Where the stack's Redis keeps its data: templates/docker/docker-compose.prod.yml
# runs ``redis-server --dir /data --appendonly yes`` with the default file names.
# A restore operates on these, never on paths read from a manifest.
REDIS_DATA_DIR = "/data"
REDIS_DBFILENAME = "dump.rdb"
REDIS_APPENDDIRNAME = "appendonlydir"
REDIS_APPENDONLY = "yes"

# Inside a one-off container of the redis service (redis stopped), with the
# decompressed RDB on stdin: move the current files aside into $2 and install
# the RDB both as dbfilename and, when AOF is on, as the base of a fresh
# multi-part AOF (Redis 7 loads the AOF, not the RDB, when appendonly is yes).
REDIS_INSTALL_SH = r"""set -eu
dir="$1"; aside="$2"; dbfile="$3"; aof="$4"; aofdir="$5"
cd "$dir"
owner=$(stat -c %u:%g .)
mkdir "$aside"
cat > "$aside/.incoming.rdb"
sync
for f in "$dbfile" "$aofdir" appendonly.aof; do
  if [ -e "$f" ]; then mv "$f" "$aside/"; fi
done
mv "$aside/.incoming.rdb" "$dbfile"
if [ "$aof" = yes ]; then
  mkdir "$aofdir"
  cp "$dbfile" "$aofdir/appendonly.aof.1.base.rdb"
  : > "$aofdir/appendonly.aof.1.incr.aof"
  {
    echo 'file appendonly.aof.1.base.rdb seq 1 type b'
    echo 'file appendonly.aof.1.incr.aof seq 1 type i'
  } > "$aofdir/appendonly.aof.manifest"
  chown -R "$owner" "$aofdir"
fi
chown "$owner" "$dbfile"
sync
echo installed
"""

# Put back what REDIS_INSTALL_SH moved aside (rollback when redis does not come back).
REDIS_ROLLBACK_SH = r"""set -eu
dir="$1"; aside="$2"; dbfile="$3"; aofdir="$4"
cd "$dir"
[ -d "$aside" ] || exit 0
rm -rf "$dbfile" "$aofdir"
for f in "$aside"/* ; do [ -e "$f" ] && mv "$f" . ; done
rm -rf "$aside"
sync
echo rolledback
"""


def redis_oneoff(settings: Settings, script: str, *args: str) -> str:
    """A one-off container of the redis service (its volume mounted), stdin attached."""
    return compose(
        settings, "run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "redis",
        "-c", script, "sh", *args,
    )


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
