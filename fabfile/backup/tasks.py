"""The ``backup`` namespace: verified backups of Postgres and Redis, their
retention, checks, listing and the restore drill.

The tasks are thin: what runs on the server is in :mod:`.runner` (one verified
backup, retention, checks), the command lines in :mod:`.scripts`.
"""

from __future__ import annotations

from invoke import Collection

from ..clock import utc_now
from ..core import host_for, ops_task, settings_for
from ..errors import OpsError
from ..lock import server_lock
from ..stack import read_env
from . import s3 as s3mod
from .manifest import check_problems, find_entry, list_backups
from .runner import (
    apply_retention,
    check_archive,
    drill,
    human,
    offsite_problems,
    run_backup,
)
from .scripts import KINDS, kind_dir, lock_path

# --- tasks --------------------------------------------------------------------------


def _kinds(kind: str) -> tuple[str, ...]:
    if kind in ("", "all"):
        return KINDS
    if kind not in KINDS:
        raise OpsError(f"--kind must be postgres, redis or all (got {kind!r})")
    return (kind,)


@ops_task(help={
    "offsite": "also copy it to S3 when backup.s3.bucket is set (default: yes)",
    "prune": "apply the retention policy after a successful backup (default: yes)",
})
def postgres(c, offsite=True, prune=True):
    """Back up the Postgres database: dump, verify, keep, prune.

    pg_dump runs inside the postgres container; the dump is compressed on the
    server (backup.compression: gzip, or zstd on every core) straight into
    backup.dir, fsynced, read back whole (decompress + pg_restore), renamed into
    place and completed by a JSON manifest (sha256, size, versions, row counts
    per table). Roles and other globals are saved alongside. On any failure
    nothing partial is left, older backups are untouched and the task exits
    non-zero. Old backups are pruned only after a good one.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    run_backup(host, settings, "postgres", reason="manual", offsite=offsite, prune=prune,
               task="backup.postgres")


@ops_task(help={
    "offsite": "also copy it to S3 when backup.s3.bucket is set (default: yes)",
    "prune": "apply the retention policy after a successful backup (default: yes)",
})
def redis(c, offsite=True, prune=True):
    """Back up Redis: BGSAVE, copy the RDB out, verify, keep, prune.

    Waits until LASTSAVE moves (backup.bgsave_timeout_seconds), copies the fresh
    RDB out of the container, compresses it on the server, checks it with
    redis-check-rdb and records its key count in the manifest. The snapshot is
    the whole dataset, i.e. what Redis would load from its AOF too.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    run_backup(host, settings, "redis", reason="manual", offsite=offsite, prune=prune,
               task="backup.redis")


@ops_task(name="all", help={
    "offsite": "also copy them to S3 when backup.s3.bucket is set (default: yes)",
    "prune": "apply the retention policy after each successful backup (default: yes)",
})
def all_(c, offsite=True, prune=True):
    """Back up Postgres, then Redis (for cron); exits non-zero if either failed.

    A failed Postgres backup does not prevent the Redis one.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    errors = []
    for kind in KINDS:
        try:
            run_backup(host, settings, kind, reason="scheduled", offsite=offsite, prune=prune,
                       task="backup.all")
        except OpsError as exc:
            errors.append(str(exc))
    if errors:
        raise OpsError("; ".join(errors))


@ops_task(help={
    "dry_run": "only show what would be deleted and why",
    "kind": "postgres, redis or all (default)",
})
def prune(c, dry_run=False, kind="all"):
    """Apply the retention policy now: show what goes, and why.

    Postgres backups are kept backup.retention_days.postgres days (30), Redis
    ones backup.retention_days.redis (7); the newest backup.min_keep verified
    backups are always kept, plus the backup.keep tiers (last/daily/weekly/
    monthly, restic's meaning). Files of backups that never completed are
    removed. --dry-run prints the plan and deletes nothing.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    for k in _kinds(kind):
        with server_lock(host, lock_path(settings, k), wait=settings.backup.lock_wait_seconds,
                         task="backup.prune"):
            apply_retention(host, settings, k, dry_run=dry_run)


@ops_task(help={"kind": "postgres, redis or all (default)"})
def check(c, kind="all"):
    """Exit non-zero if a backup is stale, suspiciously small or missing off-site.

    For each kind, the newest verified backup must be younger than
    backup.max_age_hours, at least backup.min_size_bytes, not more than
    backup.max_shrink_percent smaller than the previous one, and, when
    backup.s3.bucket is set, present in S3 with the same size and ETag.
    Prints one line per problem (or one "ok" line per kind): for cron and
    monitoring.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    entries = list_backups(host, settings)
    now = utc_now()
    problems = []
    s3 = None
    for k in _kinds(kind):
        found = check_problems(
            k, entries.get(k, []), now=now,
            max_age_hours=settings.backup.max_age_hours,
            min_size_bytes=settings.backup.min_size_bytes,
            max_shrink_percent=settings.backup.max_shrink_percent,
        )
        newest = next((e for e in entries.get(k, []) if e.complete), None)
        if newest is not None and s3mod.configured(settings):
            if s3 is None:
                s3 = s3mod.client(settings, read_env(host, settings))
            found += offsite_problems(settings, s3, newest)
        problems += found
        if not found and newest is not None:
            age = (now - newest.created).total_seconds() / 3600
            host.say(f"ok {k}: {newest.name}, {human(newest.size)}, {age:.1f} h old")
    for p in problems:
        host.say(f"PROBLEM {p}")
    if problems:
        raise OpsError(f"{len(problems)} backup problem(s): " + "; ".join(problems))


@ops_task(name="list", help={
    "quick": "do not re-read the files to check their sha256",
    "kind": "postgres, redis or all (default)",
})
def list_(c, quick=False, kind="all"):
    """Table of the backups on the server (and in S3 when configured).

    Columns: kind, name, time (UTC), size, checksum (ok / BAD / - with --quick),
    off-site copy, label ("safety": the copy a restore took of what it replaced).
    Incomplete files (no manifest) are listed as such.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    entries = list_backups(host, settings)
    kinds = _kinds(kind)
    rows = [e for k in kinds for e in entries.get(k, [])]
    sums = {}
    if not quick:
        sums = host.hashes([f"{kind_dir(settings, e.kind)}/{e.manifest['file']}"
                            for e in rows if e.complete], sudo=True)
    host.say(f"{'KIND':<9}{'NAME':<36}{'TIME (UTC)':<18}{'SIZE':>11}  {'CHECKSUM':<9}"
             f"{'OFF-SITE':<9}LABEL")
    for e in rows:
        when = e.created.strftime("%Y-%m-%d %H:%M")
        if not e.complete:
            host.say(f"{e.kind:<9}{e.name:<36}{when:<18}{human(e.size):>11}  incomplete")
            continue
        path = f"{kind_dir(settings, e.kind)}/{e.manifest['file']}"
        status = "-" if quick else ("ok" if sums.get(path) == e.manifest["sha256"] else "BAD")
        off = "yes" if e.manifest.get("offsite") else "no"
        label = f"{e.label} ({e.manifest.get('reason', '')})" if e.label else ""
        host.say(f"{e.kind:<9}{e.name:<36}{when:<18}{human(e.size):>11}  {status:<9}"
                 f"{off:<9}{label}".rstrip())
    if s3mod.configured(settings):
        s3 = s3mod.client(settings, read_env(host, settings))
        bucket = settings.backup.s3.bucket
        host.say(f"\nin s3://{bucket}/{settings.backup.s3.prefix}:")
        for k in kinds:
            objs = s3mod.list_objects(s3, bucket, s3mod.object_key(settings, k, ""))
            names = {o["Key"].rsplit("/", 1)[-1] for o in objs}
            for o in sorted(objs, key=lambda o: o["Key"], reverse=True):
                fname = o["Key"].rsplit("/", 1)[-1]
                if fname.endswith(".json") or ".globals." in fname:
                    continue
                name = fname.split(".", 1)[0]
                complete = "complete" if f"{name}.json" in names else "no manifest"
                when = o["LastModified"].strftime("%Y-%m-%d %H:%M")
                host.say(f"{k:<9}{name:<36}{when:<18}{human(o['Size']):>11}  {complete}")


@ops_task(help={
    "backup": "backup name or file, or 'safety' (default: the latest verified one, "
              "never a restore's safety copy)",
    "kind": "postgres (default: full restore drill), redis (RDB check) or all",
})
def verify(c, backup="", kind="postgres"):
    """Restore drill: restore a backup into a scratch database and compare row counts.

    Checks the archive's sha256 against its manifest, restores it into a
    temporary database next to the real one, counts the rows of every table,
    compares them with the counts recorded at backup time and drops the
    scratch database again. For Redis, checks the RDB with redis-check-rdb and
    its key count. Exits non-zero on any mismatch. Suitable for a weekly cron.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    entries = list_backups(host, settings)
    failures = []
    for k in _kinds(kind):
        entry = find_entry(entries, backup, k)
        try:
            check_archive(host, settings, entry)
            if k == "postgres":
                drill(host, settings, entry)
            else:
                host.say(f"ok redis {entry.name}: sha256 and redis-check-rdb ok, "
                         f"{entry.manifest['keys']} keys as recorded")
        except OpsError as exc:
            failures.append(str(exc))
    if failures:
        raise OpsError("verification failed: " + "; ".join(failures))


ns = Collection("backup", postgres, redis, all_, prune, check, list_, verify)
