"""Pure parts of backup/restore: retention, manifests, metrics, checks, scripts."""

from __future__ import annotations

import io
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import fabfile.backup
from fabfile.backup import s3 as backup_s3
from fabfile.backup.manifest import (
    Entry,
    check_problems,
    find_entry,
    name_of,
    parse_listing,
)
from fabfile.backup.metrics import metrics_text, next_metrics, parse_metrics
from fabfile.backup.restore import confirm
from fabfile.backup.retention import Backup, format_plan, plan
from fabfile.backup.scripts import (
    PG_BACKUP,
    PG_DUMP,
    REDIS_INSTALL,
    REDIS_SAVE,
    SWAP_DATABASES_SQL,
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
from fabfile.errors import ConfigError, OpsError
from fabfile.lock import holder_script

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
SCRIPTS = Path(fabfile.backup.__file__).parent
RDB_INSTALL_TEXT = (SCRIPTS / "rdb-install.sh").read_text()


def settings(**backup):
    return load_settings(invoke_section={"backup": backup} if backup else None,
                         environ={}, files=[])


def b(name_days: float, verified=True, kind="postgres", hours=0.0) -> Backup:
    t = NOW - timedelta(days=name_days, hours=hours)
    return Backup(f"{kind}-{t:%Y%m%dT%H%M%SZ}", kind, t, verified)


def kept(decisions) -> list[str]:
    return [d.backup.name for d in decisions if d.keep]


# --- retention ---------------------------------------------------------------------


def test_retention_keeps_the_window_and_deletes_older_with_a_reason():
    backups = [b(d) for d in (0, 1, 10, 29, 31, 45)]
    decisions = plan(backups, now=NOW, retention_days=30, min_keep=1)
    assert kept(decisions) == [x.name for x in backups[:4]]
    gone = [d for d in decisions if not d.keep]
    assert all("older than 30 days" in d.reason for d in gone)


def test_retention_never_deletes_the_newest_good_backups_even_when_old():
    # Backups stopped 100 days ago: the newest min_keep are still kept.
    backups = [b(d) for d in (100, 101, 102, 103)]
    decisions = plan(backups, now=NOW, retention_days=30, min_keep=2)
    assert kept(decisions) == [backups[0].name, backups[1].name]
    assert "min_keep" in decisions[0].reason


def test_unverified_backups_do_not_count_and_are_removed():
    # A newer failed (unverified) one must not push out the last good one.
    backups = [b(0, verified=False), b(40), b(50)]
    decisions = plan(backups, now=NOW, retention_days=30, min_keep=1)
    assert kept(decisions) == [backups[1].name]
    assert "incomplete" in decisions[0].reason and not decisions[0].keep


def test_a_bad_backup_never_counts_and_is_kept_aside():
    from dataclasses import replace

    newest_bad, older_good = b(0), b(45)
    decisions = plan([replace(newest_bad, bad="sha256 differs"), older_good], now=NOW,
                     retention_days=30, min_keep=1)
    assert kept(decisions) == [newest_bad.name, older_good.name]
    bad, good = decisions
    assert "BAD: sha256 differs; kept aside" in bad.reason and not bad.counted
    assert "min_keep" in good.reason and good.counted


def test_restic_tiers_keep_the_newest_of_each_of_the_last_n_periods_with_a_backup():
    # Two backups a day for 20 days, then a 30-day gap, then 3 more days.
    backups = []
    for day in list(range(0, 3)) + list(range(33, 53)):
        backups += [b(day, hours=1), b(day, hours=2)]  # 02:00 and 01:00
    decisions = plan(backups, now=NOW, retention_days=1, min_keep=1,
                     keep={"daily": 5, "weekly": 0, "monthly": 0, "last": 0})
    kept_days = sorted({(NOW - d.backup.created).days for d in decisions
                        if d.keep and "daily" in d.reason})
    # The last 5 days *that have a backup* span the gap (restic's meaning).
    assert kept_days == [0, 1, 2, 33, 34]
    for d in decisions:
        if "daily" in d.reason:  # the newest of its day
            assert (NOW - d.backup.created).seconds // 3600 == 1


def test_weekly_monthly_and_last_tiers():
    backups = [b(d) for d in range(0, 120, 3)]
    decisions = plan(backups, now=NOW, retention_days=1, min_keep=1,
                     keep={"last": 2, "daily": 0, "weekly": 3, "monthly": 4})
    reasons = {d.backup.name: d.reason for d in decisions if d.keep}
    assert sum("weekly" in r for r in reasons.values()) == 3
    assert sum("monthly" in r for r in reasons.values()) == 4
    assert sum("last 2" in r for r in reasons.values()) == 2
    months = {d.backup.created.strftime("%Y-%m") for d in decisions if "monthly" in d.reason}
    assert len(months) == 4


def test_format_plan_shows_verb_name_and_reason():
    lines = format_plan(plan([b(0), b(40)], now=NOW, retention_days=30, min_keep=1))
    assert lines[0].startswith("keep") and "younger than 30 days" in lines[0]
    assert lines[1].startswith("delete") and "older than 30 days" in lines[1]


# --- listing, manifests --------------------------------------------------------------


def test_name_of_files_and_partials():
    assert name_of("postgres-20261125T030000Z.dump.gz") == "postgres-20261125T030000Z"
    assert name_of(".postgres-20261125T030000Z-2.dump.zst.partial") == \
        "postgres-20261125T030000Z-2"
    assert name_of("redis-20261125T030000Z.json") == "redis-20261125T030000Z"
    assert name_of("notes.txt") is None


def _manifest(name, file, created="2026-11-25T03:00:00Z", ok=True, size=5000, **extra):
    m = {"name": name, "file": file, "created_at": created, "size": size,
         "sha256": "ab" * 32, "verification": {"ok": ok}}
    if name.startswith("postgres-"):
        m["globals"] = {"file": f"{name}.globals.sql.gz", "size": 10, "sha256": "cd" * 32}
    return json.dumps({**m, **extra}, indent=2)


@pytest.mark.parametrize("change, problem", [
    ({"file": "/../../../../tmp/pwned"}, "file '/../../../../tmp/pwned' is not a file name"),
    ({"file": "postgres-20261125T030000Z.dump.gz/../x"}, "is not a file name"),
    ({"file": "postgres-20261125T030000Z.sh"}, "is not a file name"),
    ({"file": "postgres-20261126T030000Z.dump.gz"}, "is not a file name"),
    ({"globals": {"file": "../g.sql.gz", "size": 1, "sha256": "cd" * 32}}, "globals.file"),
    ({"globals": None}, "globals entry is missing"),
    ({"sha256": "x; rm -rf /"}, "sha256 of"),
    ({"size": "12"}, "size of"),
    ({"name": "postgres-20200101T000000Z"}, "describes"),
    # Never a Python repr in the one-line error, whatever JSON the manifest holds.
    ({"file": ["postgres-20261125T030000Z.dump.gz"]}, "its file (a JSON array) is not"),
    ({"file": None}, "its file (missing) is not a file name"),
    ({"name": ["x"], "kind": {"a": 1}}, "describes (a JSON object) backup (a JSON array)"),
    ({}, None),
])
def test_every_name_in_a_manifest_must_be_one_we_write(change, problem):
    from fabfile.backup.manifest import check_manifest, manifest_problem

    name = "postgres-20261125T030000Z"
    m = {**json.loads(_manifest(name, f"{name}.dump.gz")), **change}
    got = manifest_problem("postgres", name, m)
    if problem is None:
        assert got is None
        return
    assert problem in got
    with pytest.raises(OpsError, match="^the manifest s3://b/k is not trusted: .*; nothing"):
        check_manifest("postgres", name, m, "s3://b/k")
    listing = parse_listing("\n".join([f"file\tpostgres\t{name}.dump.gz\t5000",
                                       f"manifest\tpostgres\t{name}.json\t" + json.dumps(m)]))
    assert not listing["postgres"][0].complete  # not a backup, whatever it says


def test_parse_listing_tells_complete_from_incomplete():
    good = "postgres-20261125T030000Z"
    text = "\n".join([
        f"file\tpostgres\t{good}.dump.gz\t5000",
        f"file\tpostgres\t{good}.json\t300",
        f"manifest\tpostgres\t{good}.json\t" + _manifest(good, f"{good}.dump.gz")
        .replace("\n", ""),
        "file\tpostgres\tpostgres-20261126T030000Z.dump.gz\t10",  # no manifest
        "file\tpostgres\t.postgres-20261126T040000Z.dump.gz.partial\t7",
        "file\tpostgres\tREADME\t7",
        "file\tredis\tredis-20261125T030000Z.rdb.gz\t9",
    ])
    listing = parse_listing(text)
    pg = {e.name: e for e in listing["postgres"]}
    assert pg[good].complete and pg[good].size == 5000
    assert not pg["postgres-20261126T030000Z"].complete
    assert not pg["postgres-20261126T040000Z"].complete
    assert "README" not in str(pg)
    assert not listing["redis"][0].complete
    # Newest first, and "latest" is the newest *complete* one.
    assert find_entry(listing, "", "postgres").name == good
    with pytest.raises(OpsError, match="not a complete, verified backup"):
        find_entry(listing, "postgres-20261126T030000Z", "postgres")
    with pytest.raises(OpsError, match="no postgres backup named"):
        find_entry(listing, "postgres-20200101T000000Z", "postgres")
    with pytest.raises(OpsError, match="no verified redis backup"):
        find_entry(listing, "", "redis")


def test_a_manifest_whose_verification_failed_or_file_is_missing_is_not_a_backup():
    name = "postgres-20261125T030000Z"
    e = Entry("postgres", name, json.loads(_manifest(name, f"{name}.dump.gz", ok=False)),
              {f"{name}.dump.gz": 5})
    assert not e.complete
    e = Entry("postgres", name, json.loads(_manifest(name, f"{name}.dump.gz")), {})
    assert not e.complete


# --- checks ------------------------------------------------------------------------


def _entries(*specs):
    out = []
    for hours, size in specs:
        t = NOW - timedelta(hours=hours)
        name = f"postgres-{t:%Y%m%dT%H%M%SZ}"
        m = json.loads(_manifest(name, f"{name}.dump.gz", created=f"{t:%Y-%m-%dT%H:%M:%SZ}",
                                 size=size))
        out.append(Entry("postgres", name, m, {f"{name}.dump.gz": size}))
    return out


@pytest.mark.parametrize("specs, problem", [
    ([(1, 5000), (25, 5000)], None),
    ([(30, 5000)], "h old"),
    ([(1, 100)], "only 100 bytes"),
    ([(1, 2000), (25, 5000)], "smaller than the one before"),
    ([], "no verified backup"),
])
def test_check_problems(specs, problem):
    found = check_problems("postgres", _entries(*specs), now=NOW, max_age_hours=26,
                           min_size_bytes=1024, max_shrink_percent=50)
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0]


# --- metrics -----------------------------------------------------------------------


def test_metrics_after_a_failure_keep_the_last_success():
    first = next_metrics({}, ok=True, ended=1000.4, duration=2.5, size=1234)
    text = metrics_text("postgres", first)
    assert 'maicivy_backup_last_success_timestamp_seconds{kind="postgres"} 1000' in text
    assert 'maicivy_backup_last_result{kind="postgres"} 1' in text
    assert "# TYPE maicivy_backup_last_size_bytes gauge" in text
    failed = next_metrics(parse_metrics(text), ok=False, ended=2000, duration=1, size=None)
    assert failed["maicivy_backup_last_success_timestamp_seconds"] == 1000
    assert failed["maicivy_backup_last_size_bytes"] == 1234
    assert failed["maicivy_backup_last_run_timestamp_seconds"] == 2000
    assert failed["maicivy_backup_last_result"] == 0
    never = next_metrics({}, ok=False, ended=5, duration=1, size=None)
    assert never["maicivy_backup_last_success_timestamp_seconds"] == 0
    offsite_failed = next_metrics({}, ok=True, ended=5, duration=1, size=1, offsite_ok=False)
    assert offsite_failed["maicivy_backup_last_result"] == 0
    assert offsite_failed["maicivy_backup_last_success_timestamp_seconds"] == 5


def test_metrics_text_is_valid_for_promtool(tmp_path):
    import shutil

    promtool = shutil.which("promtool") or str(
        __import__("pathlib").Path(__file__).parent / "promtool")
    text = metrics_text("redis", next_metrics({}, ok=True, ended=1, duration=0.25, size=9))
    path = tmp_path / "m.prom"
    path.write_text(text)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True)
    if proc.returncode == 127 or "No such file" in proc.stderr:  # pragma: no cover
        pytest.fail("promtool missing: run tests/install-deps.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- scripts -----------------------------------------------------------------------


def test_every_command_line_and_script_is_valid_bash_and_sh():
    s = settings()
    commands = [
        pg_backup_command(s), pg_backup_command(s, "zstd"), redis_backup_command(s),
        check_archive_command(s, "postgres", "/x/postgres-1.dump.gz"),
        check_archive_command(s, "redis", "/x/redis-1.rdb.zst"),
        restore_into_command(s, "/x/a.dump.gz", "db_restore_1"),
        holder_script("/var/backups/maicivy/.lock-postgres", 10, "it's me"),
        psql_command(s, SWAP_DATABASES_SQL, "postgres", db="a", new="b", old="c"),
        rdb_install_command(s, "/x/redis-1.rdb.gz", "aside"), rdb_rollback_command(s, "aside"),
        redis_wait_command(s, 120), listing_command(s),
    ]
    for command in commands:
        proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + command
    for path in sorted(SCRIPTS.glob("*.sh")):
        shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
        proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, path.name + proc.stderr


def test_secrets_are_expanded_inside_the_containers_only():
    s = settings()
    for command in (pg_backup_command(s), redis_backup_command(s)):
        # The variable names appear, quoted for the container's shell, never a value.
        assert "$POSTGRES_PASSWORD" in command or "$REDIS_PASSWORD" in command
        assert " -a " not in command and "--pass" not in command
    assert 'REDISCLI_AUTH="$REDIS_PASSWORD"' in REDIS_SAVE.text


def test_backups_stream_on_the_server_and_are_renamed_only_after_the_check():
    # pg_restore reads the whole dump stream as it is written (rows counted)...
    assert PG_DUMP.text.index('pg_restore -f - < "$st/r"') < PG_DUMP.text.index("pg_dump -Fc")
    script = PG_BACKUP.text
    script = script[script.index("new_name postgres"):]  # after common.sh's functions
    dump = script.index('sh -c "$pg_dump_sh"')
    fsync = script.index('finish_file "$tmp"')
    # ...then the file is read back once from the disk: its sha256 and the sha256 of
    # what it decompresses to, which must be the stream pg_restore read.
    read_back = script.index('read_back "$tmp"')
    compare = script.index("not decompress to the dump pg_restore read")
    rename = script.index('mv -f -- "$tmp" "$data"')
    assert dump < fsync < read_back < compare < rename
    assert '> "$tmp"' in script and ".partial" in script


def test_parse_output_and_failure_line():
    facts, counts = parse_output("name=postgres-1\nsha256=abc\ncount\t12\tpublic.\"a b\"\n"
                                 "noise\n")
    assert facts == {"name": "postgres-1", "sha256": "abc"}
    assert counts == {'public."a b"': 12}
    stderr = ("service \"postgres\" is not running\n"
              "FAILED: pg_dump failed in the postgres container (exit 1)\n")
    assert failure_line(stderr) == ('pg_dump failed in the postgres container (exit 1): '
                                    'service "postgres" is not running')
    assert failure_line("boom\n") == "boom"


def test_install_rdb_writes_a_fresh_aof_when_aof_is_on():
    command = rdb_install_command(settings(), "/b/redis/redis-20261125T030000Z.rdb.gz", "aside")
    assert "/b/redis/redis-20261125T030000Z.rdb.gz" in command
    assert " /data aside dump.rdb yes appendonlydir -- docker compose " in command
    assert "run --rm --no-deps -T --entrypoint sh redis" in RDB_INSTALL_TEXT
    assert "appendonly.aof.1.base.rdb seq 1 type b" in REDIS_INSTALL.text


# --- confirmation ------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_confirmation_without_terminal_refuses_and_with_terminal_needs_the_name():
    with pytest.raises(OpsError, match="no terminal.*--yes"):
        confirm("replace database maicivy", "maicivy", False, stdin=io.StringIO("maicivy\n"))
    confirm("replace database maicivy", "maicivy", True, stdin=io.StringIO(""))
    out = io.StringIO()
    confirm("replace database maicivy", "maicivy", False, stdin=FakeTTY("maicivy\n"), out=out)
    assert "Type 'maicivy'" in out.getvalue()
    with pytest.raises(OpsError, match="did not match"):
        confirm("x", "maicivy", False, stdin=FakeTTY("yes\n"), out=io.StringIO())


# --- s3, config --------------------------------------------------------------------


def test_expected_etag_matches_s3s_rule():
    import hashlib

    one = hashlib.md5(b"a").digest()  # noqa: S324
    assert backup_s3.expected_etag([one]) == one.hex()
    two = [hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]  # noqa: S324
    assert backup_s3.expected_etag(two) == hashlib.md5(two[0] + two[1]).hexdigest() + "-2"  # noqa: S324
    assert backup_s3.parse_url("s3://bkt/a/b.json") == ("bkt", "a/b.json")
    with pytest.raises(OpsError):
        backup_s3.parse_url("s3://bkt")


@pytest.mark.parametrize("backup, message", [
    ({"max_shrink_percent": 101}, "maicivy.backup.max_shrink_percent"),
    ({"lock_wait_seconds": -1}, "maicivy.backup.lock_wait_seconds"),
    ({"s3": {"bucket": "Bad_Bucket"}}, "maicivy.backup.s3.bucket"),
    ({"s3": {"endpoint": "ftp://x"}}, "maicivy.backup.s3.endpoint"),
    ({"s3": {"prefix": "/abs"}}, "maicivy.backup.s3.prefix"),
])
def test_bad_backup_settings_are_refused_with_the_key(backup, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        settings(**backup)


@pytest.mark.parametrize("endpoint, ok", [
    ("", True), ("https://s3.example.com", True), ("http://127.0.0.1:9000", True),
    ("http://[::1]:9000", True), ("http://localhost:9000", True),
    ("http://s3.example.com", False), ("http://10.0.0.5:9000", False),
    ("ftp://127.0.0.1", False), ("s3.example.com", False),
])
def test_s3_endpoints_must_be_https_unless_loopback(endpoint, ok):
    if ok:
        backup_s3.check_endpoint(endpoint)
    else:
        with pytest.raises(OpsError, match="must be an https:// URL"):
            backup_s3.check_endpoint(endpoint)


# --- restore: the swap ---------------------------------------------------------------


class SwapHost:
    """Answers the swap's psql commands: ``fail`` maps a SQL fragment to its error."""

    def __init__(self, **fail: str):
        self.fail = fail
        self.sql: list[str] = []

    def run(self, command, **_):
        from fabfile.host import Result

        what = next((k for k in ("RENAME TO", "ALLOW_CONNECTIONS true", "DROP DATABASE")
                     if k in command), command)
        self.sql.append(what)
        error = self.fail.get(what.split()[0])
        return Result(command, 1 if error else 0, "", f"FAILED: {error}\n" if error else "")


def test_a_failed_swap_is_the_error_reported_even_when_reallowing_connections_fails():
    from fabfile.backup.restore import _swap

    host = SwapHost(RENAME="3 sessions still connected to maicivy",
                    ALLOW_CONNECTIONS="connection to server lost")
    with pytest.raises(OpsError) as exc:
        _swap(host, settings(), "maicivy", "maicivy_restore_1", "maicivy_pre_restore_1")
    assert str(exc.value) == (
        "swapping in the restored database failed (3 sessions still connected to maicivy); "
        "maicivy is unchanged; allowing connections to maicivy again failed too: "
        "connection to server lost")
    # Connections re-allowed on the database that kept its name, the new one dropped.
    assert host.sql == ["RENAME TO", "ALLOW_CONNECTIONS true", "DROP DATABASE"]


def test_a_swap_that_works_allows_connections_to_the_new_database():
    from fabfile.backup.restore import _swap

    host = SwapHost()
    _swap(host, settings(), "maicivy", "maicivy_restore_1", "maicivy_pre_restore_1")
    assert host.sql == ["RENAME TO", "ALLOW_CONNECTIONS true"]
    failing = SwapHost(RENAME="boom")
    with pytest.raises(OpsError, match=r"^swapping in the restored database failed \(boom\); "
                                       r"maicivy is unchanged$"):
        _swap(failing, settings(), "maicivy", "n", "o")
