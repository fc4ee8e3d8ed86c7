"""Backups on the real rig: verified files, metrics, faults that lose nothing, cron, S3.

One stack (postgres, redis, backend) for the module; ``fab`` runs over SSH
like from a laptop, ``inv -r`` runs from / without stdin like cron on the
server. No test depends on another having run: each one asks for the state it
needs (``fresh``: no table and no key; ``rig``: the application data, put back
if a test before it changed it; a backup of its own when it needs one) and
leaves the stack healthy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from backup_support import (
    ROOT,
    BackupRig,
    Moto,
    add_env,
    empty_data,
    ensure_seeded,
    errors,
    sha256_file,
)

from fabfile.backup import s3 as backup_s3
from fabfile.errors import OpsError
from fabfile.lock import server_lock

pytestmark = pytest.mark.rig

BUCKET = "maicivy-offsite"


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    """The module's stack (postgres, redis, backend), up for every test."""
    r = BackupRig(ssh_host, tmp_path_factory.mktemp("backup"), f"maicivybackup{os.getpid()}",
                  provision={"log_dir": str(tmp_path_factory.mktemp("log"))})
    try:
        r.up()
        yield r
    finally:
        r.down()


@pytest.fixture
def fresh(stack):
    """The stack as on a fresh server: an empty database, an empty Redis."""
    empty_data(stack)
    return stack


@pytest.fixture
def rig(stack):
    """The stack with the application data."""
    return ensure_seeded(stack)


def backup(rig, kind: str, *args: str) -> dict:
    """A new verified backup of ``kind`` (for a test that needs one); its manifest."""
    ok(rig.fab(f"backup.{kind}", "--no-prune", *args))
    return rig.latest(kind)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_first_backup_on_a_fresh_server_with_no_table_and_no_key_succeeds(fresh, tmp_path):
    # The first pre-deploy backup runs before the application ever created a
    # table: it must not block the deploy. (Its own backup directory: the first
    # backups there, as on a fresh server.)
    assert fresh.counts() == {}
    config = fresh.config(backup={"dir": str(tmp_path / "first")})
    proc = ok(fresh.fab("backup.all", "--no-offsite", config=config))
    pg, rd = ([json.loads(p.read_text()) for p in sorted((tmp_path / "first" / k).glob("*.json"))]
              for k in ("postgres", "redis"))
    assert len(pg) == len(rd) == 1
    pg, rd = pg[0], rd[0]
    assert f"postgres backup {pg['name']}" in proc.stdout
    assert pg["tables"] == {} and pg["rows"] == 0 and pg["verification"]["ok"]
    assert rd["verification"]["ok"] and rd["keys"] == 0
    ok(fresh.fab("backup.check", config=config))


def test_backup_postgres_writes_a_verified_backup_its_manifest_and_metrics(rig):
    t0 = time.time()
    proc = ok(rig.fab("backup.postgres"))
    m = rig.latest("postgres")
    assert f"postgres backup {m['name']}" in proc.stdout
    data = rig.kind_dir("postgres") / m["file"]
    assert m["file"].endswith(".dump.gz") and m["compression"] == "gzip"
    assert sha256_file(data) == m["sha256"] and data.stat().st_size == m["size"]
    assert m["tables"] == rig.counts() and m["rows"] == sum(m["tables"].values())
    assert m["verification"]["ok"] and "pg_restore -f - (whole archive)" in \
        m["verification"]["checks"]
    assert m["server_version"].startswith("15") and "pg_dump" in m["pg_dump_version"]
    glob = rig.kind_dir("postgres") / m["globals"]["file"]
    assert sha256_file(glob) == m["globals"]["sha256"]
    assert b"CREATE ROLE maicivy" in subprocess.run(["gzip", "-dc", str(glob)],
                                                    capture_output=True).stdout
    # Private files, nothing left over, and the dump is a real pg_dump archive.
    assert (rig.backup_dir.stat().st_mode & 0o777) == 0o700
    assert (data.stat().st_mode & 0o777) == 0o600
    assert not [f for f in rig.files("postgres") if f.endswith(".partial")]
    raw = subprocess.run(["gzip", "-dc", str(data)], capture_output=True, check=True).stdout
    listing = subprocess.run(["pg_restore", "--list"], input=raw, capture_output=True)
    assert b"TABLE DATA public accounts" in listing.stdout
    metrics = rig.metrics("postgres")
    assert metrics["maicivy_backup_last_result"] == 1
    assert metrics["maicivy_backup_last_success_timestamp_seconds"] >= int(t0)
    assert metrics["maicivy_backup_last_size_bytes"] == m["size"]


def test_backup_redis_captures_every_key(rig):
    ok(rig.fab("backup.redis"))
    m = rig.latest("redis")
    assert m["keys"] == int(rig.redis("DBSIZE").split()[-1]) == 57
    assert m["file"].endswith(".rdb.gz") and m["aof"] == "yes"
    assert sha256_file(rig.kind_dir("redis") / m["file"]) == m["sha256"]
    assert rig.metrics("redis")["maicivy_backup_last_result"] == 1


def test_zstd_compression_when_configured(rig):
    if not shutil.which("zstd"):
        pytest.fail("zstd missing on the server: apt-get install zstd (.ci/run does)")
    ok(rig.fab("backup.postgres", "--no-prune", config=rig.config(backup={"compression": "zstd"})))
    m = rig.latest("postgres")
    assert m["file"].endswith(".dump.zst") and "Zstandard" in m["compressor"]
    assert m["tables"] == rig.counts()


def test_cron_lines_installed_by_provision_run_as_written(rig):
    from fabfile.provision import cron_lines

    settings = rig.stack.settings
    config = rig.config()
    inv = str(Path(sys.executable).parent / "inv")
    root = settings.root.rstrip("/")
    lines = [ln for ln in cron_lines(settings) if " backup." in ln]
    tasks = {re.search(r" (backup\.[a-z]+)", ln).group(1) for ln in lines}
    assert tasks >= {"backup.postgres", "backup.redis", "backup.verify"}
    before = {k: len(rig.manifests(k)) for k in ("postgres", "redis")}
    for line in lines:
        command = " ".join(line.split()[5:])  # drop the schedule
        command = command.replace(f"{root}/ops/.venv/bin/inv", inv)
        command = command.replace(f"-r {root}/ops", f"-r {ROOT}")
        # What cron gives a job: sh, a minimal environment, no terminal, no stdin.
        env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "SHELL": "/bin/sh",
               "LOGNAME": "root", "MAICIVY_CONFIG": str(config)}
        proc = subprocess.run(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600, cwd="/tmp")
        assert proc.returncode == 0, (command, _log(rig))
    assert len(rig.manifests("postgres")) == before["postgres"] + 1
    assert len(rig.manifests("redis")) == before["redis"] + 1
    log = _log(rig)
    assert "postgres backup postgres-" in log and "counts match the manifest" in log


def _log(rig) -> str:
    d = Path(rig.stack.settings.provision.log_dir)
    return "\n".join(p.read_text() for p in sorted(d.glob("*.log")))


def test_two_backups_at_once_do_not_interleave(rig):
    config = rig.config(backup={"lock_wait_seconds": 300})
    procs = [subprocess.Popen(rig.inv_argv("backup.postgres", "--no-prune"), cwd="/",
                              env=rig._env(config, None), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = rig.manifests("postgres")[-2:]
    assert a["name"] != b["name"]
    first, second = sorted((a, b), key=lambda m: m["started_epoch"])
    assert first["finished_epoch"] <= second["started_epoch"]


def test_a_second_run_waits_then_says_who_holds_the_lock(rig):
    names = rig.files("postgres")
    lock = str(rig.backup_dir / ".lock-postgres")
    with server_lock(rig.host, lock, wait=5, task="test-holder"):
        proc = rig.fab("backup.postgres", config=rig.config(backup={"lock_wait_seconds": 1}))
    assert proc.returncode == 75
    assert len(errors(proc)) == 1 and "held by test-holder" in errors(proc)[0]
    assert rig.files("postgres") == names


def test_postgres_down_fails_with_one_clear_line_and_a_failure_metric(rig):
    ok(rig.fab("backup.postgres", "--no-prune"))
    good = rig.metrics("postgres")
    files = rig.files("postgres")
    rig.compose("stop", "postgres")
    try:
        proc = rig.fab("backup.postgres")
        assert proc.returncode != 0
        assert len(errors(proc)) == 1, proc.stderr
        assert "postgres" in errors(proc)[0] and "not running" in errors(proc)[0]
        assert "Traceback" not in proc.stderr
        bad = rig.metrics("postgres")
        assert bad["maicivy_backup_last_result"] == 0
        assert bad["maicivy_backup_last_success_timestamp_seconds"] == \
            good["maicivy_backup_last_success_timestamp_seconds"]
        assert bad["maicivy_backup_last_run_timestamp_seconds"] >= \
            good["maicivy_backup_last_run_timestamp_seconds"]
        assert rig.files("postgres") == files
        # backup.all still backs Redis up, and reports the failure.
        proc = rig.fab("backup.all", "--no-prune")
        assert proc.returncode != 0 and "postgres" in errors(proc)[0]
        assert rig.metrics("redis")["maicivy_backup_last_result"] == 1
    finally:
        rig.compose("start", "postgres")
        rig.wait_healthy("postgres")


def test_disk_full_leaves_no_partial_file_and_the_older_backups_intact(rig, tmp_path):
    full = tmp_path / "small"
    full.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=700", "tmpfs",
                            str(full)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the rig runs as root): {mount.stderr}")
    try:
        config = rig.config(backup={"dir": str(full)})
        ok(rig.fab("backup.postgres", config=config))
        older = {p.name: sha256_file(p) for p in (full / "postgres").iterdir()}
        used = sum(p.stat().st_size for p in (full / "postgres").iterdir())
        subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", str(full)],
                       check=True)
        rig.psql("CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g + 1)::text) AS v "
                 "FROM generate_series(1, 40000) g")
        proc = rig.fab("backup.postgres", config=config)
        assert proc.returncode != 0
        assert len(errors(proc)) == 1 and "disk full" in errors(proc)[0], proc.stderr
        after = {p.name: sha256_file(p) for p in (full / "postgres").iterdir()}
        assert after == older  # no partial file, the older backup byte-for-byte intact
        assert rig.metrics("postgres")["maicivy_backup_last_result"] == 0
    finally:
        rig.psql("DROP TABLE IF EXISTS bulk")
        subprocess.run(["umount", str(full)], check=False)


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_a_disk_that_fills_exactly_at_the_manifest_fails_cleanly_via_fab_and_inv(rig, tmp_path):
    # The data files fit, the manifest does not: the run must fail with one line
    # naming the manifest and the cause, and take its data files away (a backup
    # without a manifest does not exist), through SSH (fab) and on the server (inv).
    full = tmp_path / "exact"
    full.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=700", "tmpfs",
                            str(full)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the rig runs as root): {mount.stderr}")
    try:
        config = rig.config(backup={"dir": str(full)})
        ok(rig.fab("backup.postgres", config=config))
        m = json.loads(next((full / "postgres").glob("*.json")).read_text())
        pages = sum(-(-n // 4096) for n in (m["size"], m["globals"]["size"]))
        older = {p.name: sha256_file(p) for p in (full / "postgres").iterdir()}
        good = rig.metrics("postgres")["maicivy_backup_last_success_timestamp_seconds"]
        # Room for one more dump and its globals (same database, same size), not a byte more.
        subprocess.run(["mount", "-o", f"remount,size={_used_bytes(full) + pages * 4096}",
                        str(full)], check=True)
        for cli in (rig.fab, rig.inv):
            proc = cli("backup.postgres", config=config)
            assert proc.returncode != 0, proc.stdout
            assert "Traceback" not in proc.stderr, proc.stderr
            assert len(errors(proc)) == 1, proc.stderr
            line = errors(proc)[0]
            assert re.search(r"cannot write \S+/postgres/postgres-\S+\.json"
                             r"( on \S+)?: No space left on device", line), line
            assert "verified" not in proc.stdout
            after = {p.name: sha256_file(p) for p in (full / "postgres").iterdir()}
            assert after == older  # no data file of the failed run, the older one intact
            metrics = rig.metrics("postgres")
            assert metrics["maicivy_backup_last_result"] == 0
            assert metrics["maicivy_backup_last_success_timestamp_seconds"] == good
        listing = ok(rig.fab("backup.list", "--kind", "postgres", config=config))
        assert "incomplete" not in listing.stdout and m["name"] in listing.stdout
    finally:
        subprocess.run(["umount", str(full)], check=False)


def _wait_group_gone(pgid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "the interrupted run did not end"
        time.sleep(0.05)


def test_an_interrupted_backup_leaves_nothing_and_no_stale_lock(rig):
    rig.psql("CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 8) AS v "
             "FROM generate_series(1, 150000) g")
    files = rig.files("postgres")
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = subprocess.Popen(rig.inv_argv("backup.postgres"), cwd="/",
                                    env=rig._env(None, None), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            deadline = time.monotonic() + 60
            while not [f for f in rig.files("postgres") if f.endswith(".partial")]:
                assert time.monotonic() < deadline and proc.poll() is None, "no dump started"
                time.sleep(0.02)
            os.killpg(proc.pid, sig)  # Ctrl-C in a terminal / cron or systemd stopping it
            proc.communicate(timeout=60)
            assert proc.returncode != 0
            _wait_group_gone(proc.pid)  # the server-side script cleans up as it exits
            assert rig.files("postgres") == files
    finally:
        rig.psql("DROP TABLE IF EXISTS bulk")
    # The lock died with the run: the next one does not wait.
    ok(rig.fab("backup.postgres", "--no-prune",
               config=rig.config(backup={"lock_wait_seconds": 0})))


def test_check_list_and_the_restore_drill(rig):
    ok(rig.fab("backup.all", "--no-prune"))
    done = time.time()
    proc = ok(rig.fab("backup.check"))
    assert "ok postgres" in proc.stdout and "ok redis" in proc.stdout
    small = rig.fab("backup.check", config=rig.config(backup={"min_size_bytes": 10**9}))
    assert small.returncode != 0 and "bytes" in errors(small)[0]

    drill = ok(rig.fab("backup.verify", "--kind", "all"))
    assert "counts match the manifest" in drill.stdout and "ok redis" in drill.stdout
    assert not [d for d in rig.databases() if d.startswith("maicivy_verify_")]

    # The smallest max_age_hours the settings accept is 0.01 h (36 s).
    time.sleep(max(0.0, done + 37 - time.time()))
    stale = rig.fab("backup.check", config=rig.config(backup={"max_age_hours": 0.01}))
    assert stale.returncode != 0 and "h old" in stale.stdout

    m = rig.latest("postgres")
    listing = ok(rig.fab("backup.list"))
    row = [ln for ln in listing.stdout.splitlines() if m["name"] in ln]
    assert row and " ok " in row[0]
    data = rig.kind_dir("postgres") / m["file"]
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        listing = ok(rig.fab("backup.list"))
        assert " BAD " in [ln for ln in listing.stdout.splitlines() if m["name"] in ln][0]
        drill = rig.fab("backup.verify", "--backup", m["name"])
        assert drill.returncode != 0 and "checksum mismatch" in errors(drill)[0]
    finally:
        data.write_bytes(original)


def _fake_old_copy(rig, m: dict, days: int, d: Path | None = None) -> str:
    """A copy of backup ``m`` that looks ``days`` old (new name, manifest, files)."""
    t = datetime.now(UTC) - timedelta(days=days)
    name = f"postgres-{t:%Y%m%dT%H%M%SZ}"
    d = d or rig.kind_dir("postgres")
    fake = dict(m, name=name, created_at=f"{t:%Y-%m-%dT%H:%M:%SZ}",
                file=m["file"].replace(m["name"], name),
                globals=dict(m["globals"], file=m["globals"]["file"].replace(m["name"], name)))
    shutil.copy(d / m["file"], d / fake["file"])
    shutil.copy(d / m["globals"]["file"], d / fake["globals"]["file"])
    (d / f"{name}.json").write_text(json.dumps(fake))
    return name


def test_prune_dry_run_shows_what_would_go_and_why_then_prune_removes_it(rig):
    m = backup(rig, "postgres")
    # Only m is among the newest min_keep, however many backups earlier tests took.
    config = rig.config(backup={"min_keep": 1})
    old = [_fake_old_copy(rig, m, days) for days in (45, 40)]
    orphan = rig.kind_dir("postgres") / "postgres-20200101T000000Z.dump.gz"
    orphan.write_bytes(b"half a dump")
    files = rig.files("postgres")

    dry = ok(rig.fab("backup.prune", "--dry-run", "--kind", "postgres", config=config))
    for name in old:
        line = [ln for ln in dry.stdout.splitlines() if name in ln][0]
        assert "delete" in line and "older than 30 days" in line
    assert "incomplete" in [ln for ln in dry.stdout.splitlines()
                            if "postgres-20200101T000000Z" in ln][0]
    assert rig.files("postgres") == files

    ok(rig.fab("backup.prune", "--kind", "postgres", config=config))
    left = rig.files("postgres")
    assert not [f for f in left if any(n in f for n in old)] and orphan.name not in left
    assert f"{m['name']}.json" in left and m["file"] in left



def test_retention_never_counts_a_bad_newest_backup_nor_deletes_the_only_good_one(rig, tmp_path):
    # min_keep 1, one good backup 45 days old, and the newest with one flipped byte:
    # the bad one must not count as "the newest 1", the good one must stay.
    config = rig.config(backup={"dir": str(tmp_path / "b"), "min_keep": 1})
    ok(rig.fab("backup.postgres", "--no-prune", config=config))
    d = tmp_path / "b" / "postgres"
    m = json.loads(next(d.glob("*.json")).read_text())
    old = _fake_old_copy(rig, m, 45, d)
    data = d / m["file"]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    files = sorted(p.name for p in d.iterdir())

    proc = ok(rig.fab("backup.prune", "--kind", "postgres", config=config))
    assert sorted(p.name for p in d.iterdir()) == files  # nothing deleted
    warning = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and m["name"] in warning[0] and "BAD" in warning[0]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("keep") and old in ln][0]
    assert "min_keep" in line
    # The good one is still there and restorable-checkable; the bad one is refused.
    ok(rig.fab("backup.verify", "--backup", old, config=config))
    bad = rig.fab("backup.verify", "--backup", m["name"], config=config)
    assert bad.returncode != 0 and "checksum mismatch" in errors(bad)[0]


# --- off-site copies (moto's S3 server on 127.0.0.1) ---------------------------------


@pytest.fixture(scope="module")
def moto(stack, tmp_path_factory):
    server = Moto(tmp_path_factory.mktemp("moto"))
    server.client().create_bucket(Bucket=BUCKET)
    add_env(stack, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    try:
        yield server
    finally:
        server.stop()


def s3_config(rig, moto):
    return rig.config(backup={"s3": {"bucket": BUCKET, "endpoint": moto.endpoint,
                                     "prefix": "prod/"}})


def test_offsite_copy_is_streamed_verified_checked_and_restorable(rig, moto):
    config = s3_config(rig, moto)
    ok(rig.fab("backup.postgres", config=config))
    m = rig.latest("postgres")
    s3 = moto.client()
    key = f"prod/postgres/{m['file']}"
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert __import__("hashlib").sha256(body).hexdigest() == m["sha256"]
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=f"prod/postgres/{m['name']}.json")
                      ["Body"].read())["sha256"] == m["sha256"]
    assert m["offsite"]["verified"]
    for k in (key, f"prod/postgres/{m['name']}.json"):  # encrypted at rest (backup.s3.sse)
        assert s3.head_object(Bucket=BUCKET, Key=k)["ServerSideEncryption"] == "AES256"
    assert rig.metrics("postgres")["maicivy_backup_offsite_last_success_timestamp_seconds"] > 0
    ok(rig.fab("backup.redis", config=config))

    ok(rig.fab("backup.check", config=config))
    listing = ok(rig.fab("backup.list", config=config))
    assert "in s3://" in listing.stdout and m["name"] in listing.stdout.split("in s3://")[1]

    s3.delete_object(Bucket=BUCKET, Key=key)
    missing = rig.fab("backup.check", config=config)
    assert missing.returncode != 0 and "missing off-site" in errors(missing)[0]

    # Restore straight from the bucket after the local copy is gone.
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    for f in rig.files("postgres"):
        if f.startswith(m["name"]):
            (rig.kind_dir("postgres") / f).unlink()
    counts = rig.counts()
    rig.psql("DELETE FROM accounts WHERE id > 10")
    proc = ok(rig.fab("restore.postgres", "--backup", f"s3://{BUCKET}/{key}", "--yes",
                      "--no-safety-backup", config=config))
    assert "fetched" in proc.stdout and rig.counts() == counts
    assert sha256_file(rig.kind_dir("postgres") / m["file"]) == m["sha256"]


def test_offsite_upload_is_multipart_streamed_and_refuses_a_changed_file(rig, moto, tmp_path):
    # 20 MiB of random data on the server, read over SSH in 8 MiB parts.
    path = rig.tmp / "big.bin"
    subprocess.run(["head", "-c", str(20 * 1024 * 1024), "/dev/urandom"],
                   stdout=open(path, "wb"), check=True)
    sha = sha256_file(path)
    s3 = moto.client()
    reader = backup_s3.ServerReader(rig.host, str(path))
    up = backup_s3.upload(s3, BUCKET, "big.bin", reader, sha256=sha, size=path.stat().st_size)
    reader.close()
    assert up.parts == 3 and up.etag.endswith("-3")
    body = s3.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read()
    assert __import__("hashlib").sha256(body).hexdigest() == sha
    reader = backup_s3.ServerReader(rig.host, str(path))
    with pytest.raises(OpsError, match="changed since it was verified"):
        backup_s3.upload(s3, BUCKET, "changed.bin", reader, sha256="0" * 64,
                         size=path.stat().st_size)
    reader.close()
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert "changed.bin" not in names
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_a_malicious_s3_manifest_writes_nothing_and_fails_with_one_line(rig, moto):
    import secrets

    config = s3_config(rig, moto)
    s3 = moto.client()
    name = "postgres-20260101T000000Z"
    target = Path(f"/tmp/pwned-{secrets.token_hex(4)}")
    evil_file = "/" + "../" * 12 + target.name.join(["tmp/", ""])
    body = b"* * * * * root touch /tmp/owned\n"
    sha = __import__("hashlib").sha256(body).hexdigest()
    manifest = {"name": name, "kind": "postgres", "file": evil_file, "sha256": sha,
                "size": len(body), "tables": {}, "rows": 0, "database": "postgres; DROP",
                "globals": {"file": evil_file, "sha256": sha, "size": len(body)},
                "verification": {"ok": True}, "created_at": "2026-01-01T00:00:00Z"}
    s3.put_object(Bucket=BUCKET, Key=f"prod/postgres/{name}.json",
                  Body=json.dumps(manifest).encode())
    for key in (f"prod/postgres/{name}.dump.gz", f"prod/postgres/{evil_file}"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    before = {p: sha256_file(p) for p in rig.backup_dir.rglob("*") if p.is_file()}
    counts = rig.counts()
    proc = rig.fab("restore.postgres", "--backup", f"s3://{BUCKET}/prod/postgres/{name}.dump.gz",
                   "--yes", config=config)
    assert proc.returncode != 0
    assert len(errors(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is not trusted" in errors(proc)[0] and "not a file name" in errors(proc)[0]
    assert not list(target.parent.glob(target.name + "*"))
    after = {p: sha256_file(p) for p in rig.backup_dir.rglob("*") if p.is_file()
             if not p.name.startswith(".lock-")}
    assert after == {p: h for p, h in before.items() if not p.name.startswith(".lock-")}
    assert rig.counts() == counts


def test_an_s3_backup_is_downloaded_only_after_the_confirmation(rig, moto):
    config = s3_config(rig, moto)
    ok(rig.fab("backup.postgres", "--no-prune", config=config))
    m = rig.latest("postgres")
    local = [p for p in rig.kind_dir("postgres").iterdir() if p.name.startswith(m["name"])]
    saved = {p: p.read_bytes() for p in local}
    for p in local:
        p.unlink()
    try:
        proc = rig.fab("restore.postgres", "--backup",
                       f"s3://{BUCKET}/prod/postgres/{m['file']}", config=config)
        assert proc.returncode != 0 and "no terminal" in errors(proc)[0]
        # Refused before a byte was fetched: no file of it, no temporary directory.
        assert not [p for p in rig.kind_dir("postgres").iterdir()
                    if p.name.startswith(m["name"])]
        assert not list(rig.backup_dir.glob(".fetch-*"))
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
