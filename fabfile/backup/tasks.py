"""Backups of Postgres and Redis that are verified before they count.

Every backup is dumped inside its container, streamed on the server straight
into ``backup.dir`` (never through this process or over SSH), written under a
temporary name, fsynced, read back whole (decompressed and parsed by
pg_restore / redis-check-rdb), renamed into place, and completed by a JSON
manifest written last. Old backups are pruned only after a successful one.
One run per kind at a time (a lock on the server). After every run the
node-exporter textfile metrics ``maicivy_backup_*{kind=...}`` are updated.
"""

from __future__ import annotations

import shlex
import time
from contextlib import nullcontext
from datetime import UTC, datetime

from invoke import Collection

from ..config import Settings
from ..core import host_for, ops_task, settings_for
from ..errors import OpsError
from ..host import Host
from ..lock import backup_locks, server_lock
from ..progress import step
from ..stack import read_env
from . import s3 as s3mod
from .manifest import (
    MANIFEST_FORMAT,
    Entry,
    check_problems,
    find_entry,
    iso,
    list_backups,
    manifest_json,
    utc_now,
    write_metrics,
)
from .retention import format_plan, plan
from .scripts import (
    KINDS,
    bash,
    count_rows_script,
    drop_database_script,
    failure_line,
    kind_dir,
    lock_path,
    parse_output,
    pg_backup_script,
    pg_check_archive_script,
    pg_restore_into_script,
    q,
    redis_backup_script,
    redis_check_archive_script,
)

TOOL = "maicivy-ops 0.1.0"


class BackupFailed(OpsError):
    """A backup run failed; nothing partial was left and older backups are untouched."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _epoch_iso(value: str) -> str:
    return iso(datetime.fromtimestamp(float(value), UTC))


def _compression_of(filename: str) -> str:
    return "zstd" if filename.endswith(".zst") else "gzip"


def _run_script(host: Host, script: str, what: str):
    r = host.run(bash(script), sudo=True, warn=True)
    if r.failed:
        raise BackupFailed(f"{what}: {failure_line(r.stderr, r.stdout)}")
    for line in r.stderr.splitlines():
        if line.startswith("warning: "):
            host.say(line)
    return parse_output(r.stdout)


def manifest_path(settings: Settings, kind: str, name: str) -> str:
    return f"{kind_dir(settings, kind)}/{name}.json"


# --- the two kinds ----------------------------------------------------------------


def _manifest_base(kind: str, facts: dict, reason: str, label: str = "") -> dict:
    """What every manifest records: name, label, times, file, size, checksum, compression."""
    return {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "name": facts["name"],
        "label": label,
        "reason": reason,
        "created_at": _epoch_iso(facts["started"]),
        "finished_at": _epoch_iso(facts["finished"]),
        "started_epoch": float(facts["started"]),
        "finished_epoch": float(facts["finished"]),
        "file": facts["file"],
        "size": int(facts["size"]),
        "sha256": facts["sha256"],
        "compression": _compression_of(facts["file"]),
        "compressor": facts.get("compressor", ""),
    }


def _postgres_manifest(facts: dict, counts: dict, reason: str, label: str = "") -> dict:
    return {
        **_manifest_base("postgres", facts, reason, label),
        "dump_format": "pg_dump custom format (-Fc -Z0), compressed on the server",
        "raw_sha256": facts.get("raw_sha256", ""),
        "globals": {
            "file": facts["globals_file"],
            "size": int(facts["globals_size"]),
            "sha256": facts["globals_sha256"],
        },
        "database": facts.get("database", ""),
        "server_version": facts.get("server_version", ""),
        "pg_dump_version": facts.get("pg_dump_version", ""),
        "tables": counts,
        "rows": sum(counts.values()),
        "tool": TOOL,
    }


def _redis_manifest(facts: dict, reason: str, label: str = "") -> dict:
    return {
        **_manifest_base("redis", facts, reason, label),
        "lastsave": int(facts.get("lastsave") or 0),
        "keys": int(facts.get("keys") or 0),
        "expires": int(facts.get("expires") or 0),
        "keys_live_at_save": int(facts.get("keys_live") or 0),
        "redis_version": facts.get("redis_version", ""),
        "aof": facts.get("aof", ""),
        "appenddirname": facts.get("appenddirname", ""),
        "rdb_path": facts.get("rdb", ""),
        "tool": TOOL,
    }


def _make_backup(host: Host, settings: Settings, kind: str, reason: str,
                 label: str = "") -> dict:
    """Run the server-side script of ``kind`` and write the manifest (under the lock)."""
    if kind == "postgres":
        facts, counts = _run_script(host, pg_backup_script(settings, label=label),
                                    "postgres backup failed")
        manifest = _postgres_manifest(facts, counts, reason, label)
        checks = ["sha256", "decompress", "pg_restore -f - (whole archive)",
                  "decompressed sha256 = the stream pg_restore read", "globals decompress"]
    else:
        facts, _ = _run_script(host, redis_backup_script(settings, label=label),
                               "redis backup failed")
        manifest = _redis_manifest(facts, reason, label)
        checks = ["sha256", "decompress", "redis-check-rdb"]
    manifest["verification"] = {"ok": True, "checks": checks, "verified_at": iso(utc_now())}
    path = manifest_path(settings, kind, manifest["name"])
    try:
        host.write_file(path, manifest_json(manifest), mode=0o600, sudo=True)
    except OpsError as exc:
        # Without its manifest the backup does not exist: take its data files away.
        d = kind_dir(settings, kind)
        data = [f"{d}/{f}" for f in _data_files(manifest)]
        host.run("rm -f -- " + " ".join(shlex.quote(p) for p in data), sudo=True, warn=True)
        raise BackupFailed(f"{kind} backup failed: {exc} (its data files were removed; "
                           "older backups are untouched)") from exc
    host.run(f"sync -- {shlex.quote(kind_dir(settings, kind))}", sudo=True, warn=True)
    return manifest


def _data_files(manifest: dict) -> list[str]:
    """The data file names a manifest lists (archive, then globals)."""
    files = [manifest["file"]]
    if manifest.get("globals"):
        files.append(manifest["globals"]["file"])
    return files


def _remove_incomplete(host: Host, settings: Settings, kind: str) -> list[str]:
    """Delete files of backups that never completed (no manifest); under the lock."""
    entries = list_backups(host, settings).get(kind, [])
    stale = [p for e in entries if not e.complete for p in e.paths(settings)]
    if stale:
        host.run("rm -f -- " + " ".join(shlex.quote(p) for p in stale), sudo=True)
        for p in stale:
            host.say(f"removed incomplete {p}")
    return stale


def _offsite(host: Host, settings: Settings, manifest: dict) -> dict:
    """Upload data (+ globals) then the manifest; returns the off-site record."""
    env = read_env(host, settings)
    s3 = s3mod.client(settings, env)
    bucket = settings.backup.s3.bucket
    kind = manifest["kind"]
    d = kind_dir(settings, kind)
    files = [(manifest["file"], manifest["sha256"], manifest["size"])]
    if manifest.get("globals"):
        g = manifest["globals"]
        files.append((g["file"], g["sha256"], g["size"]))
    done = []
    for fname, sha, size in files:
        reader = s3mod.ServerReader(host, f"{d}/{fname}")
        try:
            up = s3mod.upload(s3, bucket, s3mod.object_key(settings, kind, fname), reader,
                              sha256=sha, size=size, sse=settings.backup.s3.sse)
        finally:
            try:
                reader.close()
            except OpsError:
                pass
        done.append(up.as_dict(settings))
    record = {"objects": done, "uploaded_at": iso(utc_now()), "verified": True}
    manifest = {**manifest, "offsite": record}
    # The manifest goes up last: in the bucket too, it marks a complete copy.
    s3mod.put_small(s3, bucket, s3mod.object_key(settings, kind, manifest["name"] + ".json"),
                    manifest_json(manifest).encode(), sse=settings.backup.s3.sse)
    path = manifest_path(settings, kind, manifest["name"])
    host.write_file(path, manifest_json(manifest), mode=0o600, sudo=True)
    return record


def apply_retention(host: Host, settings: Settings, kind: str, *, dry_run: bool = False,
                    quiet: bool = False) -> list:
    """Delete what the retention plan says may go (only verified backups count).

    Before anything is deleted, the backups that min_keep and the keep tiers
    count on are re-checked (size and sha256 against their manifests, in one
    round trip): a bad one does not count, is reported and kept aside, and the
    plan is made again, so the last good backup is never deleted.
    """
    from dataclasses import replace

    entries = list_backups(host, settings).get(kind, [])
    by_name = {e.name: e for e in entries}
    bad: dict[str, str] = {}
    checked: set[str] = set()
    while True:
        decisions = plan(
            [replace(e.as_backup(), bad=bad.get(e.name, "")) for e in entries],
            now=utc_now(),
            retention_days=settings.backup.retention_days[kind],
            min_keep=settings.backup.min_keep,
            keep=settings.backup.keep,
        )
        if not any(not d.keep for d in decisions):
            break  # nothing goes: nothing depends on what is counted
        unchecked = [by_name[d.backup.name] for d in decisions
                     if d.counted and d.backup.name not in checked]
        if not unchecked:
            break
        checked.update(e.name for e in unchecked)
        found = bad_backups(host, settings, unchecked)
        for name, why in found.items():
            host.say(f"warning: {kind} backup {name} is BAD ({why}): it does not count "
                     "towards retention and is kept aside; see backup.list")
        bad.update(found)
    doomed = [p for d in decisions if not d.keep for p in by_name[d.backup.name].paths(settings)]
    for line in format_plan(decisions):
        if not quiet or line.startswith("delete"):
            host.say(("[dry-run] " if dry_run else "") + line)
    if doomed and not dry_run:
        host.run("rm -f -- " + " ".join(shlex.quote(p) for p in doomed), sudo=True)
    return decisions


def bad_backups(host: Host, settings: Settings, entries: list[Entry]) -> dict[str, str]:
    """``{name: why}`` of the complete backups whose files differ from their manifest
    (size from the listing, sha256 read back: one round trip for all of them)."""
    wanted: dict[str, tuple[str, str, int, str]] = {}
    for e in entries:
        m = e.manifest or {}
        files = [(m.get("file"), m.get("sha256"), m.get("size"))]
        if m.get("globals"):
            g = m["globals"]
            files.append((g.get("file"), g.get("sha256"), g.get("size")))
        for fname, sha, size in files:
            wanted[f"{e.dir(settings)}/{fname}"] = (e.name, sha, size, fname)
    sums = host.hashes(wanted, sudo=True)
    bad: dict[str, str] = {}
    by_name = {e.name: e for e in entries}
    for path, (name, sha, size, fname) in wanted.items():
        if name in bad:
            continue
        if by_name[name].files.get(fname) != size:
            bad[name] = f"{fname} is {by_name[name].files.get(fname, 'missing')} bytes, " \
                        f"its manifest says {size}"
        elif sums.get(path) != sha:
            bad[name] = f"sha256 of {fname} differs from its manifest"
    return bad


def run_backup(
    host: Host,
    settings: Settings,
    kind: str,
    *,
    reason: str = "manual",
    offsite: bool = True,
    prune: bool = True,
    task: str | None = None,
    lock: bool = True,
    label: str = "",
) -> dict:
    """One complete, verified backup of ``kind``: lock, dump, check, manifest, metrics,
    off-site copy (if configured), retention. Returns the manifest; raises OpsError.

    ``label="safety"`` marks the copy a restore takes of what it replaces (in
    its name and manifest): it is never "the latest" for restore or verify."""
    if kind not in KINDS:
        raise OpsError(f"unknown backup kind {kind!r}; use one of {', '.join(KINDS)}")
    start = time.time()
    offsite_error = None
    offsite_ok = None
    # The stack lock shared (never beside a deploy or restore), then this kind's lock.
    held = (backup_locks(host, settings, lock_path(settings, kind), task or f"backup.{kind}")
            if lock else nullcontext())
    with held:
        try:
            host.run(f"install -d -m 700 -- {shlex.quote(settings.backup.dir)} "
                     f"{shlex.quote(kind_dir(settings, kind))}", sudo=True)
            _remove_incomplete(host, settings, kind)
            with step(f"{kind} backup: dump, verify, manifest"):
                manifest = _make_backup(host, settings, kind, reason, label)
        except BaseException as exc:
            try:
                write_metrics(host, settings, kind, ok=False, ended=time.time(),
                              duration=time.time() - start, size=None)
            except Exception as mexc:  # keep the real error; mention the metrics one
                host.say(f"warning: could not write the failure metric: {mexc}")
            if isinstance(exc, OpsError) and not isinstance(exc, BackupFailed):
                raise BackupFailed(f"{kind} backup failed: {exc}") from exc
            raise
        if offsite and s3mod.configured(settings):
            try:
                manifest["offsite"] = _offsite(host, settings, manifest)
                offsite_ok = True
            except OpsError as exc:
                offsite_ok, offsite_error = False, str(exc)
        duration = time.time() - start
        write_metrics(host, settings, kind, ok=True, ended=time.time(), duration=duration,
                      size=manifest["size"], offsite_ok=offsite_ok)
        host.say(_summary(manifest, duration))
        if prune:
            apply_retention(host, settings, kind, quiet=True)
    if offsite_error:
        raise OpsError(f"{kind} backup {manifest['name']} is good on the server, but the "
                       f"off-site copy failed: {offsite_error}")
    return manifest


def _summary(m: dict, duration: float) -> str:
    if m["kind"] == "postgres":
        content = f"{len(m['tables'])} tables, {m['rows']} rows"
    else:
        content = f"{m['keys']} keys"
    where = " + off-site" if m.get("offsite") else ""
    what = f"{m['label']} backup" if m.get("label") else "backup"
    return (f"{m['kind']} {what} {m['name']}: {m['file']} {_human(m['size'])}, {content}, "
            f"sha256 {m['sha256'][:12]}, verified{where}, {duration:.1f}s")


def backup_postgres(host: Host, settings: Settings, *, reason: str = "manual",
                    offsite: bool = True, prune: bool = True) -> dict:
    """A verified Postgres backup (for other tasks, e.g. before a deploy); its manifest."""
    return run_backup(host, settings, "postgres", reason=reason, offsite=offsite, prune=prune)


def backup_redis(host: Host, settings: Settings, *, reason: str = "manual",
                 offsite: bool = True, prune: bool = True) -> dict:
    """A verified Redis backup; its manifest."""
    return run_backup(host, settings, "redis", reason=reason, offsite=offsite, prune=prune)


# --- verification of existing archives --------------------------------------------


def check_archive(host: Host, settings: Settings, entry: Entry) -> dict:
    """Checksum and fully read an archive; raise OpsError if it is not the good one.

    Postgres: one read of the file (sha256 and decompression together); its
    contents are read whole by pg_restore when restored (row counts compared
    there). Redis: sha256, decompression and redis-check-rdb."""
    m = entry.manifest or {}
    path = entry.data_path(settings)
    if entry.kind == "postgres":
        script = pg_check_archive_script(settings, path)
    else:
        script = redis_check_archive_script(settings, path)
    r = host.check(bash(script), sudo=True)
    facts, _ = parse_output(r.stdout)
    if facts.get("sha256") and facts["sha256"] != m.get("sha256"):
        raise OpsError(f"{entry.name}: checksum mismatch ({m.get('file')} is corrupted or "
                       "was changed after the backup); refusing to use it")
    if r.failed:
        raise OpsError(f"{entry.name}: {failure_line(r.stderr, r.stdout)}; refusing to use it")
    if entry.kind == "postgres" and m.get("raw_sha256") and \
            facts.get("raw_sha256") != m["raw_sha256"]:
        raise OpsError(f"{entry.name}: the archive does not decompress to the dump that was "
                       "verified at backup time; refusing to use it")
    if entry.kind == "redis" and int(facts.get("keys") or -1) != int(m.get("keys", -2)):
        raise OpsError(f"{entry.name}: the RDB holds {facts.get('keys')} keys, its manifest "
                       f"says {m.get('keys')}; refusing to use it")
    return facts


def restore_into(host: Host, settings: Settings, entry: Entry, database: str) -> dict[str, int]:
    """Restore a Postgres backup into a NEW database (dropped again on failure) and
    count its rows, in one round trip; the row count of every table."""
    path = entry.data_path(settings)
    script = (pg_restore_into_script(settings, path, database)
              + "set -o pipefail\n" + count_rows_script(settings, database)
              + f" || fail {q('counting the rows of ' + database + ' failed')}\n")
    r = host.run(bash(script), sudo=True, warn=True)
    if r.failed:
        if "restored=1" in r.stdout:  # restored, then the count failed: drop it too
            drop_database(host, settings, database)
        raise OpsError(f"restoring {entry.name} into {database} failed: "
                       f"{failure_line(r.stderr, r.stdout)}")
    return parse_output(r.stdout)[1]


def table_counts(host: Host, settings: Settings, database: str) -> dict[str, int]:
    r = host.check(bash("set -o pipefail; " + count_rows_script(settings, database)),
                   sudo=True)
    if r.failed:
        raise OpsError(f"counting the rows of {database} failed: "
                       f"{failure_line(r.stderr, r.stdout)}")
    return parse_output(r.stdout)[1]


def count_differences(expected: dict[str, int], got: dict[str, int]) -> list[str]:
    """Tables whose row count differs (tables absent from the backup are ignored)."""
    out = []
    for table, rows in sorted(expected.items()):
        if table not in got:
            out.append(f"{table}: missing (backup has {rows} rows)")
        elif got[table] != rows:
            out.append(f"{table}: {got[table]} rows, backup has {rows}")
    return out


def drop_database(host: Host, settings: Settings, database: str) -> None:
    host.run(drop_database_script(settings, database), sudo=True, warn=True)


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
            found += _offsite_problems(settings, s3, newest)
        problems += found
        if not found and newest is not None:
            age = (now - newest.created).total_seconds() / 3600
            host.say(f"ok {k}: {newest.name}, {_human(newest.size)}, {age:.1f} h old")
    for p in problems:
        host.say(f"PROBLEM {p}")
    if problems:
        raise OpsError(f"{len(problems)} backup problem(s): " + "; ".join(problems))


def _offsite_problems(settings: Settings, s3, entry: Entry) -> list[str]:
    m = entry.manifest
    record = m.get("offsite") or {}
    objects = {o["url"]: o for o in record.get("objects", [])}
    key = s3mod.object_key(settings, entry.kind, m["file"])
    want = objects.get(s3mod.url(settings, key))
    if want is None:
        return [f"{entry.kind}: newest backup {entry.name} was never copied off-site"]
    try:
        s3mod.verify_object(s3, settings.backup.s3.bucket, key, size=want["size"],
                            etag=want["etag"])
    except OpsError as exc:
        return [f"{entry.kind}: {exc}"]
    return []


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
            host.say(f"{e.kind:<9}{e.name:<36}{when:<18}{_human(e.size):>11}  incomplete")
            continue
        path = f"{kind_dir(settings, e.kind)}/{e.manifest['file']}"
        status = "-" if quick else ("ok" if sums.get(path) == e.manifest["sha256"] else "BAD")
        off = "yes" if e.manifest.get("offsite") else "no"
        label = f"{e.label} ({e.manifest.get('reason', '')})" if e.label else ""
        host.say(f"{e.kind:<9}{e.name:<36}{when:<18}{_human(e.size):>11}  {status:<9}"
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
                host.say(f"{k:<9}{name:<36}{when:<18}{_human(o['Size']):>11}  {complete}")


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
                _drill(host, settings, entry)
            else:
                host.say(f"ok redis {entry.name}: sha256 and redis-check-rdb ok, "
                         f"{entry.manifest['keys']} keys as recorded")
        except OpsError as exc:
            failures.append(str(exc))
    if failures:
        raise OpsError("verification failed: " + "; ".join(failures))


def _drill(host: Host, settings: Settings, entry: Entry) -> None:
    scratch = "maicivy_verify_" + datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    try:
        got = restore_into(host, settings, entry, scratch)
    finally:
        drop_database(host, settings, scratch)
    diff = count_differences(entry.manifest["tables"], got)
    if diff:
        raise OpsError(f"{entry.name}: restored row counts differ: " + "; ".join(diff))
    host.say(f"ok postgres {entry.name}: restored into a scratch database, "
             f"{len(got)} tables, {sum(got.values())} rows, counts match the manifest")


ns = Collection("backup", postgres, redis, all_, prune, check, list_, verify)
