"""Helpers of the backup/restore rig tests: a small stack, the CLIs, data probes, moto."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import yaml
from conftest import free_port, wait_port
from stack_rig import StackRig

from fabfile.backup.metrics import parse_metrics

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("postgres", "redis", "backend")


class BackupRig:
    """postgres + redis + backend of one compose project, driven over real SSH."""

    def __init__(self, ssh_host, tmp: Path, project: str, **extra):
        backup = {"min_size_bytes": 1, "lock_wait_seconds": 5, **extra.pop("backup", {})}
        self.ssh_host = ssh_host
        self.tmp = tmp
        self.stack = StackRig(ssh_host, tmp, project, backup=backup, **extra)
        self.settings = self.stack.settings
        self.host = self.stack.host
        self.base = dict(self.stack.overrides)
        self.backup_dir = Path(self.settings.backup.dir)
        self.n = 0

    # -- stack ------------------------------------------------------------------------

    def up(self) -> None:
        self.stack.prepare()
        self.compose("up", "-d", "--wait", "--wait-timeout", "180", *SERVICES, timeout=240)

    def down(self) -> None:
        self.stack.down()

    def compose(self, *args: str, timeout: float = 180, warn: bool = False):
        return self.host.run(self.stack.compose(*args), timeout=timeout, warn=warn)

    def wait_healthy(self, *services: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.stack.service_health()
            if all(health.get(s) == "healthy" for s in services):
                return
            time.sleep(0.5)
        raise AssertionError(f"not healthy after {timeout}s: {self.stack.service_health()}")

    # -- CLIs ---------------------------------------------------------------------------

    def config(self, **changes) -> Path:
        """A settings file: the rig's overrides plus ``changes`` (nested dicts merged)."""
        data = json.loads(json.dumps(self.base))
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                for k2, v2 in value.items():
                    if isinstance(v2, dict) and isinstance(data[key].get(k2), dict):
                        data[key][k2] = {**data[key][k2], **v2}
                    else:
                        data[key][k2] = v2
            else:
                data[key] = value
        data["known_hosts"] = [str(self.ssh_host.known_hosts)]
        self.n += 1
        path = self.tmp / f"maicivy-{self.n}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=True))
        return path

    def _env(self, config: Path | None, env: dict | None) -> dict:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MAICIVY_")}
        environ["MAICIVY_CONFIG"] = str(config or self.config())
        environ.update(env or {})
        return environ

    def fab(self, *args: str, config: Path | None = None, env: dict | None = None,
            stdin=subprocess.DEVNULL, timeout: float = 600) -> subprocess.CompletedProcess:
        """The real ``fab`` CLI over SSH (from a "laptop"), no terminal."""
        argv = [*self.ssh_host.fab_argv(), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                               env=self._env(config, env), stdin=stdin)

    def inv_argv(self, *args: str) -> list[str]:
        return ["inv", "-r", str(ROOT), *args]

    def inv(self, *args: str, config: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """The real ``inv`` CLI on the server itself (as cron runs it): cwd /, no stdin."""
        return subprocess.run(self.inv_argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd="/", env=self._env(config, env),
                              stdin=subprocess.DEVNULL)

    # -- data probes ----------------------------------------------------------------------

    def psql(self, sql: str, db: str = "maicivy") -> str:
        inner = 'exec psql -XtAq -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$1" -c "$2"'
        return self.host.run(self.stack.compose("exec", "-T", "postgres", "sh", "-c", inner,
                                                "sh", db, sql)).stdout.strip()

    def databases(self) -> set[str]:
        return set(self.psql("SELECT datname FROM pg_database", "postgres").split())

    def counts(self, db: str = "maicivy") -> dict[str, int]:
        out = self.psql(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables", db)
        counts = {}
        for table in out.split("\n"):
            if table:
                counts[table] = int(self.psql(f"SELECT count(*) FROM ONLY {table}", db))
        return counts

    def table_digest(self, table: str, db: str = "maicivy") -> str:
        """sha256 of the table's data as pg_dump writes it."""
        inner = ('pg_dump -U "$POSTGRES_USER" -d "$1" --data-only -t "$2" | '
                 # pg_dump >= 15.14 adds a random \\restrict key: not data.
                 "grep -v -e '^--' -e '^.restrict ' -e '^.unrestrict ' | sha256sum")
        return self.host.run(self.stack.compose("exec", "-T", "postgres", "sh", "-c", inner,
                                                "sh", db, table)).stdout.split()[0]

    def redis(self, *args: str) -> str:
        inner = 'REDISCLI_AUTH="$REDIS_PASSWORD" exec redis-cli --no-raw "$@"'
        return self.host.run(self.stack.compose("exec", "-T", "redis", "sh", "-c", inner,
                                                "sh", *args)).stdout.strip()

    def redis_sh(self, script: str) -> str:
        """Run a shell script in the redis container with REDISCLI_AUTH set."""
        inner = 'export REDISCLI_AUTH="$REDIS_PASSWORD"; ' + script
        return self.host.run(self.stack.compose("exec", "-T", "redis", "sh", "-c", inner)
                             ).stdout

    def redis_snapshot(self) -> dict[str, tuple]:
        """{key: (type, normalized content, has a TTL)} of every key."""
        out = self.redis_sh(r"""
redis-cli --scan | sort | while read -r k; do
  t=$(redis-cli TYPE "$k"); ttl=$(redis-cli TTL "$k")
  case "$t" in
    string) v=$(redis-cli --no-raw GET "$k") ;;
    hash) v=$(redis-cli --no-raw HGETALL "$k") ;;
    list) v=$(redis-cli --no-raw LRANGE "$k" 0 -1) ;;
    set) v=$(redis-cli --no-raw SMEMBERS "$k") ;;
    zset) v=$(redis-cli --no-raw ZRANGE "$k" 0 -1 WITHSCORES) ;;
    *) v="?" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$k" "$t" "$ttl" "$(printf '%s' "$v" | tr '\n' '\037')"
done""")
        snap: dict[str, tuple] = {}
        for line in out.splitlines():
            key, kind, ttl, raw = line.split("\t", 3)
            items = [i.split(") ", 1)[-1] for i in raw.split("\x1f")]
            if kind == "set":
                items = sorted(items)
            elif kind == "hash":
                items = sorted(zip(items[::2], items[1::2], strict=True))
            snap[key] = (kind, tuple(items), int(ttl) > 0)
        return snap

    # -- files ------------------------------------------------------------------------------

    def kind_dir(self, kind: str) -> Path:
        return self.backup_dir / kind

    def files(self, kind: str) -> list[str]:
        d = self.kind_dir(kind)
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def manifests(self, kind: str) -> list[dict]:
        d = self.kind_dir(kind)
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]

    def latest(self, kind: str) -> dict:
        return self.manifests(kind)[-1]

    def metrics(self, kind: str) -> dict[str, float]:
        path = Path(self.settings.backup.textfile_dir) / f"maicivy_backup_{kind}.prom"
        return parse_metrics(path.read_text())


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


class Moto:
    """moto's S3 API server on 127.0.0.1 (started by the test itself)."""

    def __init__(self, tmp: Path):
        import shutil

        exe = shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]' "
                               "(tests/install-deps.sh does)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=30)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def add_env(rig: BackupRig, **values: str) -> None:
    """Append entries to the stack's .env on the server."""
    lines = "".join(f"{k}={v}\n" for k, v in values.items())
    rig.host.run(f"printf %s {shlex.quote(lines)} >> {shlex.quote(rig.settings.env_file)}")


SEED_SQL = r"""
CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, name text, balance numeric, note text);
INSERT INTO accounts
  SELECT g, md5(g::text), g * 1.5, CASE WHEN g % 7 = 0 THEN E'line\nbreak\ttab \\ slash' END
  FROM generate_series(1, 5000) g;
CREATE TABLE IF NOT EXISTS "odd name" (id serial PRIMARY KEY, data bytea);
INSERT INTO "odd name" (data) SELECT decode(md5(g::text) || md5((g * 3)::text), 'hex')
  FROM generate_series(1, 300) g;
CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY, at timestamptz, payload jsonb);
INSERT INTO events (at, payload)
  SELECT now() - g * interval '1 minute', jsonb_build_object('n', g, 'k', md5(g::text))
  FROM generate_series(1, 2000) g;
CREATE TABLE IF NOT EXISTS empty_table (id int);
"""


SEEDED_TABLES = "accounts,empty_table,events,odd name"
SEEDED_ROWS = "5000|2000|300"
SEEDED_KEYS = 57

# Every table of the public schema dropped (the schema itself stays as created,
# so that a dump restores into a database made from template0).
DROP_TABLES_SQL = r"""
DO $$ DECLARE t text; BEGIN
  FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
    EXECUTE format('DROP TABLE %I CASCADE', t);
  END LOOP;
END $$;
"""


def seed_postgres(rig: BackupRig) -> None:
    rig.psql(SEED_SQL)


def empty_data(rig: BackupRig) -> None:
    """The stack as on a fresh server: no table, no key."""
    rig.psql(DROP_TABLES_SQL)
    rig.redis("FLUSHALL")


def seeded(rig: BackupRig) -> bool:
    tables = rig.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
                      "WHERE schemaname = 'public'")
    if tables != SEEDED_TABLES:
        return False
    rows = rig.psql('SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM events), '
                    '(SELECT count(*) FROM "odd name")')
    return rows == SEEDED_ROWS and int(rig.redis("DBSIZE").split()[-1]) == SEEDED_KEYS


def ensure_seeded(rig: BackupRig) -> BackupRig:
    """The application data every test of a module starts from (put back if a test
    before it left something else)."""
    if not seeded(rig):
        empty_data(rig)
        seed_postgres(rig)
        seed_redis(rig)
    return rig


SEED_REDIS = r"""
{
  echo 'SET greeting "hello world"'
  echo 'SET binary "\x01\x02 caf\xc3\xa9"'
  echo 'HSET user:1 name Ada visits 42'
  echo 'RPUSH queue a b c'
  echo 'SADD tags x y'
  echo 'ZADD board 1 one 2 two'
  echo 'SET session temp EX 86400'
  i=0; while [ $i -lt 50 ]; do echo "SET k:$i $((i * i))"; i=$((i + 1)); done
} | redis-cli > /dev/null
"""


def seed_redis(rig: BackupRig) -> None:
    rig.redis_sh(SEED_REDIS)
