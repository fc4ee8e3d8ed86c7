"""Restores on the real rig: data comes back exactly, and bad archives change nothing.

One stack (postgres, redis, backend) for the module, driven with the real
``fab`` CLI over SSH and no terminal. No test depends on another having run:
each starts from the application data (put back by the ``rig`` fixture if a
test before it changed it), takes the backups it restores, and leaves the
stack healthy.
"""

from __future__ import annotations

import json
import os

import pytest
from backup_support import BackupRig, ensure_seeded, errors, sha256_file

pytestmark = pytest.mark.rig

TABLES = ("public.accounts", 'public."odd name"', "public.events", "public.empty_table")


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    r = BackupRig(ssh_host, tmp_path_factory.mktemp("restore"), f"maicivyrestore{os.getpid()}")
    try:
        r.up()
        yield r
    finally:
        r.down()


@pytest.fixture
def rig(stack):
    """The stack with the application data."""
    return ensure_seeded(stack)


def pg_state(rig: BackupRig) -> dict:
    return {"counts": rig.counts(), "accounts": rig.table_digest("accounts"),
            "odd": rig.table_digest('"odd name"'), "dbs": rig.databases()}


def backup(rig: BackupRig, kind: str) -> dict:
    proc = rig.fab(f"backup.{kind}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return rig.latest(kind)


def test_postgres_backup_change_restore_gives_back_the_same_data(rig):
    before = pg_state(rig)
    assert set(TABLES) <= set(before["counts"]) and before["counts"]["public.accounts"] == 5000
    m = backup(rig, "postgres")
    assert m["tables"] == before["counts"]

    rig.psql("UPDATE accounts SET balance = 0 WHERE id <= 100; DELETE FROM accounts "
             "WHERE id > 4000; DELETE FROM events; DROP TABLE \"odd name\"; "
             "CREATE TABLE intruder (x int); INSERT INTO accounts VALUES (99999, 'new', 1, '')")
    changed = rig.counts()
    assert changed["public.accounts"] == 4001 and "public.intruder" in changed

    proc = rig.fab("restore.postgres", "--backup", m["name"], "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = pg_state(rig)
    assert after == before  # counts, pg_dump digests, no leftover databases
    assert "public.intruder" not in after["counts"]
    # The safety backup holds the changed data, and is itself a verified backup.
    safety = rig.latest("postgres")
    assert safety["reason"] == "pre-restore" and safety["tables"] == changed
    # The backend was stopped around the swap and is serving again.
    rig.wait_healthy("backend", "postgres")


def test_restoring_twice_does_not_undo_the_first_and_says_how_to_go_back(rig):
    # The safety copy a restore takes is labelled, and never "the latest" backup:
    # a second restore without --backup restores the same backup again.
    m = backup(rig, "postgres")
    wanted = pg_state(rig)
    rig.psql("DELETE FROM accounts WHERE id > 100")
    changed = rig.counts()
    first = rig.fab("restore.postgres", "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    safety = rig.latest("postgres")
    assert safety["label"] == "safety" and safety["name"].endswith("-safety")
    assert safety["tables"] == changed and safety["name"] != m["name"]
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith(f"restored {m['name']} into maicivy")
    assert last.endswith(f"to go back: restore.postgres --backup {safety['name']}")
    second = rig.fab("restore.postgres", "--yes")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"restored {m['name']} " in second.stdout
    assert pg_state(rig) == wanted  # still the backup's data, not the safety copy's
    assert rig.fab("backup.verify").stdout.count(m["name"]) == 1
    listing = rig.fab("backup.list", "--quick", "--kind", "postgres").stdout
    row = [ln for ln in listing.splitlines() if safety["name"] in ln][0]
    assert row.rstrip().endswith("safety (pre-restore)")
    # Going back on purpose: --backup safety picks the newest safety copy.
    newest_safety = [x for x in rig.manifests("postgres") if x.get("label") == "safety"][-1]
    back = rig.fab("restore.postgres", "--backup", "safety", "--yes", "--no-safety-backup")
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"restored {newest_safety['name']} " in back.stdout
    assert rig.counts() == newest_safety["tables"]


def test_redis_backup_change_restore_gives_back_the_same_keys_and_values(rig):
    before = rig.redis_snapshot()
    assert len(before) == 57 and before["session"] == ("string", ('"temp"',), True)
    m = backup(rig, "redis")
    assert m["keys"] == 57 and m["aof"] == "yes"

    rig.redis_sh("redis-cli DEL greeting user:1 > /dev/null; redis-cli SET k:1 changed "
                 "> /dev/null; redis-cli SET extra 1 > /dev/null; redis-cli RPUSH queue d")
    assert rig.redis_snapshot() != before

    proc = rig.fab("restore.redis", "--backup", m["name"], "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rig.redis_snapshot() == before
    # What Redis loads at start (its AOF, appendonly yes) is the restored data.
    rig.compose("restart", "redis")
    rig.wait_healthy("redis")
    assert rig.redis_snapshot() == before
    assert rig.latest("redis")["reason"] == "pre-restore"
    rig.wait_healthy("backend")


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate+manifest"])
def test_a_damaged_postgres_archive_is_refused_before_anything_changes(rig, damage, tmp_path):
    m = backup(rig, "postgres")
    state = pg_state(rig)
    names = rig.files("postgres")
    data = rig.kind_dir("postgres") / m["file"]
    original = data.read_bytes()
    try:
        if damage == "flip":
            raw = bytearray(original)
            raw[len(raw) // 2] ^= 0xFF
            data.write_bytes(bytes(raw))
        else:
            data.write_bytes(original[: len(original) * 2 // 3])
        if damage == "truncate+manifest":
            # Even with a manifest that agrees with the damaged file, the full read
            # (decompress + pg_restore) refuses it.
            path = rig.kind_dir("postgres") / f"{m['name']}.json"
            fake = dict(m, sha256=sha256_file(data), size=data.stat().st_size)
            path.write_text(json.dumps(fake))
        proc = rig.fab("restore.postgres", "--backup", m["name"], "--yes")
        assert proc.returncode != 0
        assert len(errors(proc)) == 1, proc.stderr
        message = errors(proc)[0]
        assert "refusing" in message
        if damage == "truncate+manifest":
            assert "does not decompress" in message or "pg_restore" in message
        else:
            assert "checksum mismatch" in message
        assert pg_state(rig) == state
        assert rig.files("postgres") == names  # no safety backup: nothing was touched
    finally:
        data.write_bytes(original)
        (rig.kind_dir("postgres") / f"{m['name']}.json").write_text(
            json.dumps(m, indent=2, sort_keys=True) + "\n")


def test_a_damaged_redis_archive_is_refused_and_the_data_untouched(rig):
    m = backup(rig, "redis")
    before = rig.redis_snapshot()
    data = rig.kind_dir("redis") / m["file"]
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-10])
        proc = rig.fab("restore.redis", "--yes")
        assert proc.returncode != 0 and "checksum mismatch" in proc.stderr
        assert rig.redis_snapshot() == before
    finally:
        data.write_bytes(original)


def test_without_yes_and_without_a_terminal_restore_refuses(rig):
    for kind in ("postgres", "redis"):  # a backup each could restore: only the answer lacks
        backup(rig, kind)
    state = pg_state(rig)
    names = rig.files("postgres")
    for task in ("restore.postgres", "restore.redis"):
        proc = rig.fab(task)  # stdin is /dev/null: no terminal
        assert proc.returncode != 0
        assert errors(proc) and "no terminal" in errors(proc)[0] and "--yes" in errors(proc)[0]
    assert pg_state(rig) == state and rig.files("postgres") == names


def test_a_restore_that_fails_half_way_leaves_the_original_database_serving(rig):
    # A table owned by a role that no longer exists when we restore: pg_restore
    # fails in the new database, after the archive passed every check.
    rig.psql("CREATE ROLE ghost; CREATE TABLE haunted (id int); INSERT INTO haunted "
             "VALUES (1); ALTER TABLE haunted OWNER TO ghost")
    m = backup(rig, "postgres")
    rig.psql("DROP TABLE haunted; DROP ROLE ghost")
    state = pg_state(rig)
    proc = rig.fab("restore.postgres", "--backup", m["name"], "--yes", "--no-safety-backup")
    assert proc.returncode != 0
    assert "ghost" in proc.stderr and "restoring" in errors(proc)[0]
    assert pg_state(rig) == state  # same data, no leftover database
    rig.wait_healthy("backend", "postgres")
