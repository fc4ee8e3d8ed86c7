"""What the backup and restore tasks run on the server: one verified backup, the
check of an existing archive, a restore into a new database, retention, the
off-site copy. Both task modules (``tasks.py``, ``restore.py``) call into this.

Every backup is dumped inside its container, streamed on the server straight
into ``backup.dir`` (never through this process or over SSH), written under a
temporary name, fsynced, read back whole (decompressed and parsed by
pg_restore / redis-check-rdb), renamed into place, and completed by a JSON
manifest written last. Old backups are pruned only after a successful one.
One run per kind at a time (a lock on the server). After every run the
node-exporter textfile metrics ``maicivy_backup_*{kind=...}`` are updated.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import UTC, datetime

from ..clock import iso, utc_now
from ..config import Settings
from ..errors import OpsError
from ..host import Host
from ..lock import backup_locks
from ..progress import step
from ..shell import words
from ..stack import read_env
from . import s3 as s3mod
from .manifest import MANIFEST_FORMAT, Entry, list_backups, manifest_json
from .metrics import write_metrics
from .retention import format_plan, plan
from .scripts import (
    KINDS,
    check_archive_command,
    drop_database_command,
    failure_line,
    kind_dir,
    lock_path,
    parse_output,
    pg_backup_command,
    redis_backup_command,
    restore_into_command,
)

TOOL = "maicivy-ops 0.1.0"

PG_CHECKS = ["sha256", "decompress", "pg_restore -f - (whole archive)",
             "decompressed sha256 = the stream pg_restore read", "globals decompress"]
REDIS_CHECKS = ["sha256", "decompress", "redis-check-rdb"]


class BackupFailed(OpsError):
    """A backup run failed; nothing partial was left and older backups are untouched."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _epoch_iso(value: str) -> str:
    return iso(datetime.fromtimestamp(float(value), UTC))


def _compression_of(filename: str) -> str:
    return "zstd" if filename.endswith(".zst") else "gzip"


def _run_script(host: Host, command: str, what: str):
    r = host.run(command, sudo=True, warn=True)
    if r.failed:
        raise BackupFailed(f"{what}: {failure_line(r.stderr, r.stdout)}")
    for line in r.stderr.splitlines():
        if line.startswith("warning: "):
            host.say(line)
    return parse_output(r.stdout)


def manifest_path(settings: Settings, kind: str, name: str) -> str:
    return f"{kind_dir(settings, kind)}/{name}.json"


def _remove(host: Host, paths: list[str], **kw) -> None:
    host.run("rm -f -- " + words(*paths), sudo=True, **kw)


# --- manifests ----------------------------------------------------------------------


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


def _data_files(manifest: dict) -> list[str]:
    """The data file names a manifest lists (archive, then globals)."""
    files = [manifest["file"]]
    if manifest.get("globals"):
        files.append(manifest["globals"]["file"])
    return files


# --- one backup ---------------------------------------------------------------------


def _dump(host: Host, settings: Settings, kind: str, reason: str, label: str) -> dict:
    """Run the server-side script of ``kind``: the verified data files; their manifest."""
    if kind == "postgres":
        facts, counts = _run_script(host, pg_backup_command(settings, label=label),
                                    "postgres backup failed")
        manifest, checks = _postgres_manifest(facts, counts, reason, label), PG_CHECKS
    else:
        facts, _ = _run_script(host, redis_backup_command(settings, label=label),
                               "redis backup failed")
        manifest, checks = _redis_manifest(facts, reason, label), REDIS_CHECKS
    manifest["verification"] = {"ok": True, "checks": checks, "verified_at": iso(utc_now())}
    return manifest


def _write_manifest(host: Host, settings: Settings, manifest: dict) -> None:
    """Write the manifest last: without it the backup does not exist, so when it
    cannot be written its data files are taken away."""
    kind = manifest["kind"]
    d = kind_dir(settings, kind)
    try:
        host.write_file(manifest_path(settings, kind, manifest["name"]),
                        manifest_json(manifest), mode=0o600, sudo=True)
    except OpsError as exc:
        _remove(host, [f"{d}/{f}" for f in _data_files(manifest)], warn=True)
        raise BackupFailed(f"{kind} backup failed: {exc} (its data files were removed; "
                           "older backups are untouched)") from exc
    host.run(f"sync -- {words(d)}", sudo=True, warn=True)


def _remove_incomplete(host: Host, settings: Settings, kind: str) -> list[str]:
    """Delete files of backups that never completed (no manifest); under the lock."""
    entries = list_backups(host, settings).get(kind, [])
    stale = [p for e in entries if not e.complete for p in e.paths(settings)]
    if stale:
        _remove(host, stale)
        for p in stale:
            host.say(f"removed incomplete {p}")
    return stale


def _verified_backup(host: Host, settings: Settings, kind: str, reason: str, label: str,
                     start: float) -> dict:
    """Dump, verify and record one backup; on any failure, the failure metric."""
    try:
        host.run(f"install -d -m 700 -- {words(settings.backup.dir, kind_dir(settings, kind))}",
                 sudo=True)
        _remove_incomplete(host, settings, kind)
        with step(f"{kind} backup: dump, verify, manifest"):
            manifest = _dump(host, settings, kind, reason, label)
            _write_manifest(host, settings, manifest)
            return manifest
    except BaseException as exc:
        try:
            write_metrics(host, settings, kind, ok=False, ended=time.time(),
                          duration=time.time() - start, size=None)
        except Exception as mexc:  # keep the real error; mention the metrics one
            host.say(f"warning: could not write the failure metric: {mexc}")
        if isinstance(exc, OpsError) and not isinstance(exc, BackupFailed):
            raise BackupFailed(f"{kind} backup failed: {exc}") from exc
        raise


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


def _copy_offsite(host: Host, settings: Settings, manifest: dict) -> str | None:
    """The off-site copy, recorded in ``manifest``; why it failed (None: it did not)."""
    try:
        manifest["offsite"] = _offsite(host, settings, manifest)
    except OpsError as exc:
        return str(exc)
    return None


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
    offsite_ok = None  # None: no off-site copy was asked for
    # The stack lock shared (never beside a deploy or restore), then this kind's lock.
    held = (backup_locks(host, settings, lock_path(settings, kind), task or f"backup.{kind}")
            if lock else nullcontext())
    with held:
        manifest = _verified_backup(host, settings, kind, reason, label, start)
        if offsite and s3mod.configured(settings):
            offsite_error = _copy_offsite(host, settings, manifest)
            offsite_ok = offsite_error is None
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
    return (f"{m['kind']} {what} {m['name']}: {m['file']} {human(m['size'])}, {content}, "
            f"verified{where}, {duration:.1f}s")


def backup_postgres(host: Host, settings: Settings, *, reason: str = "manual",
                    offsite: bool = True, prune: bool = True) -> dict:
    """A verified Postgres backup (for other tasks, e.g. before a deploy); its manifest."""
    return run_backup(host, settings, "postgres", reason=reason, offsite=offsite, prune=prune)


# --- retention ----------------------------------------------------------------------


def apply_retention(host: Host, settings: Settings, kind: str, *, dry_run: bool = False,
                    quiet: bool = False) -> list:
    """Delete what the retention plan says may go (only verified backups count).

    Before anything is deleted, the backups that min_keep and the keep tiers
    count on are re-checked (size and sha256 against their manifests, in one
    round trip): a bad one does not count, is reported and kept aside, and the
    plan is made again, so the last good backup is never deleted.
    """
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
        _remove(host, doomed)
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


def offsite_problems(settings: Settings, s3, entry: Entry) -> list[str]:
    """What is wrong with the off-site copy of ``entry`` (empty: it is there, intact)."""
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


# --- existing archives --------------------------------------------------------------


def check_archive(host: Host, settings: Settings, entry: Entry) -> dict:
    """Checksum and fully read an archive; raise OpsError if it is not the good one.

    Postgres: one read of the file (sha256 and decompression together); its
    contents are read whole by pg_restore when restored (row counts compared
    there). Redis: sha256, decompression and redis-check-rdb."""
    m = entry.manifest or {}
    r = host.check(check_archive_command(settings, entry.kind, entry.data_path(settings)),
                   sudo=True)
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
    r = host.run(restore_into_command(settings, entry.data_path(settings), database),
                 sudo=True, warn=True)
    if r.failed:
        if "restored=1" in r.stdout:  # restored, then the count failed: drop it too
            drop_database(host, settings, database)
        raise OpsError(f"restoring {entry.name} into {database} failed: "
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
    host.run(drop_database_command(settings, database), sudo=True, warn=True)


def drill(host: Host, settings: Settings, entry: Entry) -> None:
    """backup.verify for Postgres: restore into a scratch database, compare row counts."""
    scratch = "maicivy_verify_" + utc_now().strftime("%Y%m%d%H%M%S")
    try:
        got = restore_into(host, settings, entry, scratch)
    finally:
        drop_database(host, settings, scratch)
    diff = count_differences(entry.manifest["tables"], got)
    if diff:
        raise OpsError(f"{entry.name}: restored row counts differ: " + "; ".join(diff))
    host.say(f"ok postgres {entry.name}: restored into a scratch database, "
             f"{len(got)} tables, {sum(got.values())} rows, counts match the manifest")
