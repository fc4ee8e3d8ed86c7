"""Restores that check before they touch anything, and never lose the current data.

Order of a restore: find the backup (name, file on the server, or s3:// URL,
fetched into backup.dir first); verify it (sha256 against its manifest and a
full read); ask for confirmation; take a verified safety backup of what is
there now; then restore *next to* the live data, check it, and only then swap
it in. If anything fails before the swap, the live data was never touched; if
the swap itself fails, the original is put back.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from invoke import Collection

from .. import clock
from ..config import Settings
from ..core import host_for, ops_task, settings_for
from ..errors import OpsError
from ..host import Host
from ..lock import server_lock, stack_lock
from ..progress import step
from ..shell import q
from ..stack import compose, read_env
from . import s3 as s3mod
from .manifest import (
    Entry,
    check_manifest,
    find_entry,
    list_backups,
    manifest_json,
    name_of,
)
from .runner import (
    check_archive,
    count_differences,
    drop_database,
    restore_into,
    run_backup,
)
from .scripts import (
    ALLOW_CONNECTIONS_SQL,
    REDIS_DATA_DIR,
    SWAP_DATABASES_SQL,
    failure_line,
    kind_dir,
    lock_path,
    psql_command,
    rdb_discard_command,
    rdb_install_command,
    rdb_rollback_command,
    redis_wait_command,
)

# --- finding and fetching the backup ------------------------------------------------


@dataclass
class InBucket:
    """A backup in S3 whose manifest was read and checked; nothing fetched yet."""

    ref: str
    bucket: str
    base: str  # key prefix, ending in "/" (or "")
    name: str
    manifest: dict


def resolve(host: Host, settings: Settings, ref: str, kind: str) -> Entry | InBucket:
    """The backup ``ref`` names: latest, a name, a file or path on the server, s3://...

    An S3 backup is only *described* here (its manifest, checked): it is
    downloaded by :func:`fetch` after the confirmation.
    """
    if ref.startswith("s3://"):
        return s3_backup(host, settings, ref, kind)
    if ref.startswith("/") and not ref.startswith(kind_dir(settings, kind) + "/"):
        return _entry_at_path(host, settings, ref, kind)
    return find_entry(list_backups(host, settings), ref, kind)


def _entry_at_path(host: Host, settings: Settings, path: str, kind: str) -> Entry:
    directory, _, fname = path.rpartition("/")
    name = name_of(fname)
    if name is None or not name.startswith(kind + "-"):
        raise OpsError(f"{path} is not a {kind} backup file (expected {kind}-<time>.*)")
    manifest_file = f"{directory}/{name}.json"
    r = host.check(f"cat -- {q(manifest_file)}", sudo=True)
    if r.failed:
        raise OpsError(f"{manifest_file} is missing: without its manifest the archive cannot "
                       "be checked; copy the .json next to it")
    try:
        manifest = json.loads(r.stdout)
    except ValueError as exc:
        raise OpsError(f"{manifest_file} is not valid JSON; refusing to use {path}") from exc
    check_manifest(kind, name, manifest, manifest_file)
    return Entry(kind, name, manifest, {manifest["file"]: 0}, directory=directory)


def s3_backup(host: Host, settings: Settings, ref: str, kind: str) -> Entry | InBucket:
    """Read and check the manifest of an S3 backup (the local copy if it is the same)."""
    bucket, key = s3mod.parse_url(ref)
    prefix, _, fname = key.rpartition("/")
    name = name_of(fname)
    if name is None or not name.startswith(kind + "-"):
        raise OpsError(f"{ref} is not a {kind} backup (expected .../{kind}-<time>.*)")
    s3 = s3mod.client(settings, read_env(host, settings))
    base = f"{prefix}/" if prefix else ""
    where = f"s3://{bucket}/{base}{name}.json"
    try:
        manifest = json.loads(s3mod.get_small(s3, bucket, f"{base}{name}.json"))
    except ValueError as exc:
        raise OpsError(f"the manifest {where} is not valid JSON; nothing was changed") from exc
    check_manifest(kind, name, manifest, where)
    local = {e.name: e for e in list_backups(host, settings).get(kind, [])}
    if name in local and local[name].complete and \
            local[name].manifest.get("sha256") == manifest.get("sha256"):
        host.say(f"{name} is already on the server")
        return local[name]
    return InBucket(ref, bucket, base, name, manifest)


def fetch(host: Host, settings: Settings, found: Entry | InBucket, kind: str) -> Entry:
    """The backup on the server, checked: an S3 one is downloaded now (after the
    confirmation) into a fresh private directory, checked there (sha256 while it
    streams, then the full read) and only then moved into backup.dir."""
    if isinstance(found, Entry):
        return found
    m, name = found.manifest, found.name
    s3 = s3mod.client(settings, read_env(host, settings))
    d = kind_dir(settings, kind)
    # Names validated by check_manifest: plain file names of this backup.
    files = [(m["file"], m["sha256"])]
    if m.get("globals"):
        files.append((m["globals"]["file"], m["globals"]["sha256"]))
    with server_lock(host, lock_path(settings, kind), wait=settings.backup.lock_wait_seconds,
                     task="restore (fetch from s3)"):
        host.run(f"install -d -m 700 -- {q(settings.backup.dir)} {q(d)}", sudo=True)
        r = host.run(f"mktemp -d -p {q(settings.backup.dir)} .fetch-XXXXXXXX", sudo=True)
        work = r.stdout.strip()
        if not work.startswith(settings.backup.dir + "/.fetch-") or "/" in \
                work[len(settings.backup.dir) + 1:]:
            raise OpsError(f"mktemp gave an unexpected directory {work!r}")
        try:
            for f, sha in files:
                writer = s3mod.ServerWriter(host, f"{work}/{f}")
                try:
                    _, got = s3mod.download(s3, found.bucket, f"{found.base}{f}", writer)
                finally:
                    writer.close()
                if got != sha:
                    raise OpsError(f"s3://{found.bucket}/{found.base}{f} does not match its "
                                   "manifest (sha256 differs); refusing to use it")
            staged = Entry(kind, name, m, {f: 0 for f, _ in files}, directory=work)
            check_archive(host, settings, staged)
            host.run(" && ".join(f"mv -f -- {q(work + '/' + f)} {q(d + '/' + f)}"
                                 for f, _ in files), sudo=True)
            host.write_file(f"{d}/{name}.json", manifest_json({**m, "fetched_from": found.ref}),
                            mode=0o600, sudo=True)
        finally:
            host.run(f"rm -rf -- {q(work)}", sudo=True, warn=True)
    host.say(f"fetched {name} from s3://{found.bucket}/{found.base}")
    return find_entry(list_backups(host, settings), name, kind)


def check_found(host: Host, settings: Settings, found: Entry | InBucket) -> None:
    """Check a backup already on the server before asking (S3 ones: after, in fetch)."""
    if isinstance(found, Entry):
        check_archive(host, settings, found)


# --- confirmation -----------------------------------------------------------------


def confirm(what: str, expected: str, yes: bool, stdin=None, out=None) -> None:
    """Ask the user to type ``expected``; ``--yes`` skips; no terminal and no --yes refuses."""
    if yes:
        return
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    if stdin is None or not stdin.isatty():
        raise OpsError(f"refusing to {what} without confirmation: there is no terminal to ask "
                       "on; pass --yes to confirm non-interactively")
    print(f"This will {what}.\nType {expected!r} to confirm: ", end="", file=out, flush=True)
    answer = stdin.readline().strip()
    if answer != expected:
        raise OpsError(f"confirmation did not match ({expected!r} expected); nothing was changed")


# --- services ---------------------------------------------------------------------


def _running(host: Host, settings: Settings, service: str) -> bool:
    r = host.check(compose(settings, "ps", "--status", "running", "-q", service), sudo=True)
    return r.ok and bool(r.stdout.strip())


def _stop(host: Host, settings: Settings, service: str) -> None:
    host.run(compose(settings, "stop", service), sudo=True, timeout=180)


def _start(host: Host, settings: Settings, service: str) -> None:
    host.run(compose(settings, "start", service), sudo=True, timeout=180)


@contextmanager
def _stopped(host: Host, settings: Settings, service: str):
    """``service`` stopped for the block if it was running, started again after it."""
    running = _running(host, settings, service)
    if running:
        _stop(host, settings, service)
    try:
        yield
    finally:
        if running:
            _start(host, settings, service)


def _safety_backup(host: Host, settings: Settings, kind: str) -> dict:
    """A verified, labelled backup of what a restore is about to replace."""
    safety = run_backup(host, settings, kind, reason="pre-restore", offsite=False,
                        prune=False, lock=False, label="safety")
    what = "database" if kind == "postgres" else "data"
    host.say(f"safety backup of the current {what}: {safety['name']}")
    return safety


def _undo(safety: dict | None, kind: str) -> str:
    """The end of a restore's last line: how to go back to what was there."""
    if not safety:
        return " (no safety backup was taken)"
    return f"; to go back: restore.{kind} --backup {safety['name']}"


# --- postgres ---------------------------------------------------------------------


def _psql(host: Host, settings: Settings, sql: str, **variables) -> str:
    r = host.run(psql_command(settings, sql, "postgres", **variables), sudo=True, warn=True)
    if r.failed:
        raise OpsError(failure_line(r.stderr, r.stdout))
    return r.stdout


def live_database(host: Host, settings: Settings) -> str:
    """The database a restore replaces: the stack's POSTGRES_DB (never a manifest's word)."""
    database = read_env(host, settings).get("POSTGRES_DB", "")
    if not database:
        raise OpsError(f"cannot tell which database to replace: no POSTGRES_DB in "
                       f"{settings.env_file}")
    return database


def _restore_counted(host: Host, settings: Settings, entry: Entry, new: str) -> dict[str, int]:
    """Restore ``entry`` into the new database ``new`` and compare its row counts with
    the manifest's; ``new`` is dropped again unless they match. Its counts."""
    with step(f"restore {entry.name} into a new database {new}, count its rows"):
        got = restore_into(host, settings, entry, new)
    try:
        diff = count_differences(entry.manifest["tables"], got)
        if diff:
            raise OpsError(f"{entry.name} restored with different row counts: "
                           + "; ".join(diff) + "; the live database was not touched")
    except BaseException:
        drop_database(host, settings, new)
        raise
    return got


def _swap(host: Host, settings: Settings, database: str, new: str, old: str) -> None:
    """Rename ``new`` into place of ``database`` (which becomes ``old``) in one
    transaction. Whatever is named ``database`` afterwards accepts connections.

    When the swap fails, its error is the one reported (re-allowing connections
    is tried, and its own failure only mentioned), and ``new`` is dropped.
    """
    try:
        _psql(host, settings, SWAP_DATABASES_SQL, db=database, new=new, old=old)
    except BaseException as exc:
        also = ""
        try:
            _psql(host, settings, ALLOW_CONNECTIONS_SQL, db=database)
        except OpsError as allow:
            also = f"; allowing connections to {database} again failed too: {allow}"
        if not isinstance(exc, OpsError):
            raise
        drop_database(host, settings, new)
        raise OpsError(f"swapping in the restored database failed ({exc}); "
                       f"{database} is unchanged{also}") from exc
    _psql(host, settings, ALLOW_CONNECTIONS_SQL, db=database)


def restore_postgres(host: Host, settings: Settings, entry: Entry, *, safety_backup: bool = True,
                     keep_old: bool = False) -> dict:
    """Restore ``entry`` (already checked and confirmed) in place of the live database."""
    database = live_database(host, settings)
    stamp = clock.stamp().lower()  # a Postgres name: lower case, quoted or not
    new, old = f"{database}_restore_{stamp}", f"{database}_pre_restore_{stamp}"
    with stack_lock(host, settings, "restore.postgres"):  # no deploy, no backup meanwhile
        safety = _safety_backup(host, settings, "postgres") if safety_backup else None
        # The database renamed into place is the one counted here (one transaction).
        after = _restore_counted(host, settings, entry, new)
        with _stopped(host, settings, "backend"):
            _swap(host, settings, database, new, old)
        if keep_old:
            host.say(f"the previous database is kept as {old} (connections disabled); drop "
                     "it when you no longer need it")
        else:
            drop_database(host, settings, old)
    host.say(f"restored {entry.name} into {database}: {len(after)} tables, "
             f"{sum(after.values())} rows, counts match the backup" + _undo(safety, "postgres"))
    return {"database": database, "tables": after, "old": old if keep_old else None}


@ops_task(help={
    "backup": "backup name, file on the server, s3://bucket/key, or 'safety' (the last "
              "restore's safety copy; default: the latest regular backup)",
    "yes": "do not ask for confirmation (for automation)",
    "safety_backup": "back up the current database first (default: yes)",
    "keep_old": "keep the replaced database (renamed, connections disabled)",
})
def postgres(c, backup="", yes=False, safety_backup=True, keep_old=False):
    """Replace the live Postgres database with a backup, safely.

    Verifies the archive first (sha256 against its manifest, full read) and
    refuses before touching anything if it is not good. Asks you to type the
    database name (--yes to skip; without a terminal and without --yes it
    refuses). Takes a verified safety backup of the current database,
    restores into a new database, compares row counts with the manifest,
    then stops the backend, swaps the new database in place of the old one
    (one transaction) and starts the backend again. If anything fails, the
    original database is still there and serving.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    found = resolve(host, settings, backup, "postgres")
    check_found(host, settings, found)
    tables = found.manifest.get("tables", {})
    if isinstance(found, Entry):
        host.say(f"{found.name}: checksum and full read ok "
                 f"({len(tables)} tables, {sum(tables.values())} rows)")
    database = live_database(host, settings)
    confirm(f"replace database {database} on {host.name} with backup {found.name}",
            database, yes)
    entry = fetch(host, settings, found, "postgres")
    restore_postgres(host, settings, entry, safety_backup=safety_backup, keep_old=keep_old)


# --- redis ------------------------------------------------------------------------

def _wait_redis(host: Host, settings: Settings, timeout: int = 120) -> int:
    """Wait until redis answers and has loaded its data; its key count."""
    deadline = time.monotonic() + timeout
    while True:
        r = host.check(redis_wait_command(settings, timeout), sudo=True)
        if r.ok:
            for line in r.stdout.splitlines():
                if line.startswith("keys="):
                    return int(line[5:])
        if time.monotonic() > deadline:
            raise OpsError(f"redis did not come back: {failure_line(r.stderr, r.stdout)}")
        time.sleep(0.5)


def _expected_keys(m: dict, keys: int) -> None:
    """Refuse a key count outside what the backup holds (keys with a TTL may expire)."""
    high = int(m.get("keys", 0))
    low = high - int(m.get("expires", 0))
    if not low <= keys <= high:
        raise OpsError(f"redis loaded {keys} keys, the backup has {high}"
                       + (f" ({m.get('expires')} with a TTL)" if low != high else ""))


def _install(host: Host, settings: Settings, entry: Entry, aside: str) -> int:
    """Redis stopped: put the RDB in its volume (the current files moved into
    ``aside``), start it, check its key count. On any failure the previous files
    are put back and redis started on them. The key count."""
    try:
        r = host.run(rdb_install_command(settings, entry.data_path(settings), aside),
                     sudo=True, warn=True, timeout=600)
        if r.failed or "installed" not in r.stdout:
            raise OpsError(f"installing the RDB failed: {failure_line(r.stderr, r.stdout)}")
        _start(host, settings, "redis")
        with step("redis: load the restored data"):
            keys = _wait_redis(host, settings)
        _expected_keys(entry.manifest, keys)
    except BaseException as exc:
        host.say(f"restore failed ({exc}); putting the previous data back")
        host.run(compose(settings, "stop", "redis"), sudo=True, warn=True, timeout=180)
        host.run(rdb_rollback_command(settings, aside), sudo=True, warn=True, timeout=600)
        host.run(compose(settings, "start", "redis"), sudo=True, warn=True, timeout=180)
        raise
    return keys


def restore_redis(host: Host, settings: Settings, entry: Entry, *, safety_backup: bool = True,
                  keep_old: bool = False) -> int:
    """Put ``entry``'s RDB in place of Redis' data (already checked and confirmed)."""
    aside = f"maicivy-pre-restore-{clock.stamp()}"
    with stack_lock(host, settings, "restore.redis"):  # no deploy, no backup meanwhile
        safety = _safety_backup(host, settings, "redis") if safety_backup else None
        with _stopped(host, settings, "backend"):
            _stop(host, settings, "redis")
            keys = _install(host, settings, entry, aside)
            if keep_old:
                host.say(f"the previous data files are kept in {REDIS_DATA_DIR}/{aside} "
                         "inside the redis volume")
            else:
                host.run(rdb_discard_command(settings, aside), sudo=True, warn=True)
    host.say(f"restored {entry.name} into redis: {keys} keys, as recorded in the backup"
             + _undo(safety, "redis"))
    return keys


@ops_task(help={
    "backup": "backup name, file on the server, s3://bucket/key, or 'safety' (the last "
              "restore's safety copy; default: the latest regular backup)",
    "yes": "do not ask for confirmation (for automation)",
    "safety_backup": "back up the current data first (default: yes)",
    "keep_old": "keep the replaced data files in the redis volume",
})
def redis(c, backup="", yes=False, safety_backup=True, keep_old=False):
    """Replace Redis' data with a backup, safely.

    Verifies the archive first (sha256 against its manifest, redis-check-rdb,
    key count) and refuses before touching anything if it is not good. Asks
    you to type "redis" (--yes to skip; no terminal and no --yes refuses).
    Takes a safety backup, stops the backend and redis, puts the RDB in the
    volume (as dump.rdb and, since the stack runs with appendonly yes, as the
    base of a fresh AOF, because Redis loads the AOF and ignores the RDB when
    AOF is on), starts redis and checks its key count against the manifest.
    If redis does not come back right, the previous files are put back.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    found = resolve(host, settings, backup, "redis")
    check_found(host, settings, found)
    if isinstance(found, Entry):
        host.say(f"{found.name}: checksum and redis-check-rdb ok "
                 f"({found.manifest.get('keys', 0)} keys)")
    confirm(f"replace all redis data on {host.name} with backup {found.name}", "redis", yes)
    entry = fetch(host, settings, found, "redis")
    restore_redis(host, settings, entry, safety_backup=safety_backup, keep_old=keep_old)


ns = Collection("restore", postgres, redis)
