#!/usr/bin/env python3
"""Benchmark: backup.postgres and restore.postgres against the plain shell pipelines.

    PYTHONPATH=tests .venv/bin/python bench/bench_backup.py [--scales 13,68] [--rounds 2] [--keep]

On the rig (dockerd, the local registry with the test images), in one run,
for each pgbench scale (default ~200 MB and ~1 GB databases):

* the floor: ``pg_dump -Fc -Z0 > /dev/null`` (pg_dump alone);
* ``pg_dump | gzip > file`` (a backup with no check at all);
* backup.postgres with gzip and with zstd (each with its full verification:
  the dump read whole by pg_restore with row counts, fsync, the file read back
  once for sha256 + decompression, manifest);
* ``gunzip < file | psql`` into a new database (a restore with no check);
* restore.postgres --no-safety-backup (checksum + decompression before,
  restore into a new database, row counts compared, swap).

It prints each time, the ratios and the data's compression ratio (uncompressed
dump / gzip file), so runs on other data can be compared. Goals (issue 9):
backup gzip <= 1.5x ``pg_dump | gzip`` on ~200 MB and <= 1.1x on ~1 GB; backup
zstd <= 1.2x pg_dump alone; restore <= 1.5x ``gunzip | psql``; Python peak RSS
under 80 MB. Each task runs in a fresh Python process (``--child``), so start-up
is included as a user sees it and ru_maxrss is its own. Best of ``--rounds``.
Not a test: it prints figures and says which goals were met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = "maicivybench"


def images() -> dict[str, str]:
    try:
        from rig.images import TEST_IMAGES
    except ImportError:  # the rig's module not there: its documented names
        r = "127.0.0.1:5000/maicivy/"
        return {"postgres": r + "postgres:test", "redis": r + "redis:test",
                "backend": r + "backend:v1", "frontend": r + "frontend:test",
                "nginx": r + "nginx:test", "prometheus": r + "prometheus:test",
                "grafana": r + "grafana:test", "node_exporter": r + "node-exporter:test"}
    return dict(TEST_IMAGES)


def overrides(work: Path) -> dict:
    return {
        "domain": "maicivy.test", "grafana_domain": "grafana.maicivy.test",
        "root": str(work / "srv"), "compose_project": PROJECT, "images": images(),
        "publish": {"bind": "127.0.0.1", "http": 18081, "https": 18444},
        "healthcheck": {"interval": "1s", "timeout": "3s", "retries": 30, "start_period": "2s"},
        "backup": {"dir": str(work / "backups"), "textfile_dir": str(work / "textfile"),
                   "min_size_bytes": 1},
        "tls": {"webroot": str(work / "webroot")},
    }


def child(config: Path, what: str) -> None:
    """Run one backup.postgres or restore.postgres in this process; print figures as JSON."""
    import yaml
    from invoke import Context

    from fabfile.backup.restore import check_found, fetch, resolve, restore_postgres
    from fabfile.backup.tasks import run_backup
    from fabfile.config import load_settings
    from fabfile.host import Host

    settings = load_settings(invoke_section=yaml.safe_load(config.read_text()),
                             environ={}, files=[])
    host = Host(Context(), out=open(os.devnull, "w"))  # noqa: SIM115
    t0 = time.perf_counter()
    if what == "backup":
        m = run_backup(host, settings, "postgres", offsite=False, prune=False)
        out = {"size": m["size"], "rows": m["rows"], "file": m["file"]}
    else:  # what restore.postgres --yes --no-safety-backup does
        found = resolve(host, settings, "", "postgres")
        check_found(host, settings, found)
        entry = fetch(host, settings, found, "postgres")
        r = restore_postgres(host, settings, entry, safety_backup=False)
        out = {"rows": sum(r["tables"].values())}
    out["seconds"] = time.perf_counter() - t0
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], check=True, text=True, capture_output=True, **kw)


def task_child(config: Path, what: str) -> dict:
    out = run(f"{sys.executable} {Path(__file__)} --child {config} --what {what}").stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--what", default="backup", help=argparse.SUPPRESS)
    ap.add_argument("--scales", default="13,68",
                    help="pgbench scales, comma-separated (13: ~200 MB, 68: ~1 GB)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each variant (best taken)")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.what)
        return 0

    import yaml
    from invoke import Context

    from fabfile.config import load_settings
    from fabfile.host import Host, upload_if_changed
    from fabfile.stack import compose, fill_env, remote_files

    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    os.chmod(work, 0o755)
    ov = overrides(work)
    settings = load_settings(invoke_section=ov, environ={}, files=[])
    host = Host(Context())
    cfg_gzip = work / "gzip.yaml"
    cfg_gzip.write_text(yaml.safe_dump(ov))
    ov_z = json.loads(json.dumps(ov))
    ov_z["backup"]["compression"] = "zstd"
    cfg_zstd = work / "zstd.yaml"
    cfg_zstd.write_text(yaml.safe_dump(ov_z))

    def c(*a: str) -> str:
        return compose(settings, *a)

    def pg(sql_or_cmd: str) -> str:
        return run(c("exec", "-T", "postgres", "sh", "-c", sql_or_cmd)).stdout.strip()

    def psql(sql: str, db: str = "postgres") -> str:
        return pg(f'psql -XtAq -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d {db} -c "{sql}"')

    def db_size() -> str:
        return pg("psql -XtA -U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\" -c "
                  "\"SELECT pg_size_pretty(pg_database_size(current_database()))\"")

    def pgbench(scale: int) -> None:
        t = time.perf_counter()
        pg(f'pgbench -i -q -s {scale} -U "$POSTGRES_USER" "$POSTGRES_DB" 2>&1 | tail -1')
        print(f"  pgbench -i -s {scale}: {db_size()} in {time.perf_counter() - t:.0f}s",
              flush=True)

    def timed(cmd: str) -> float:
        t = time.perf_counter()
        run(cmd, timeout=3600)
        return time.perf_counter() - t

    backups = work / "backups" / "postgres"
    met: list[tuple[str, bool]] = []
    rss: list[float] = []
    try:
        print(f"stack {PROJECT} in {work}", flush=True)
        for d in ("srv", "backups", "textfile", "webroot"):
            (work / d).mkdir(exist_ok=True)
        upload_if_changed(host, remote_files(settings))
        example = remote_files(settings)[f"{settings.root}/.env.production.example"].decode()
        text, _ = fill_env(example, "POSTGRES_USER=maicivy\nPOSTGRES_DB=maicivy\n",
                           token=lambda n: secrets.token_hex(16))
        host.write_file(settings.env_file, text, mode=0o600)
        run(c("up", "-d", "--wait", "postgres", "redis"), timeout=300)

        sizes = [int(x) for x in args.scales.split(",") if x.strip()]
        for scale in sizes:
            print(f"\nscale {scale}", flush=True)
            pgbench(scale)
            size = db_size()
            plain = work / "plain.sql.gz"
            t: dict[str, list[float]] = {k: [] for k in
                                         ("raw", "shell", "gzip", "zstd", "psql", "restore")}
            raw_bytes = 0
            res: dict[str, dict] = {}
            for _round in range(args.rounds):
                t["raw"].append(timed(
                    c("exec", "-T", "postgres", "sh", "-c",
                      'pg_dump -Fc -Z0 -U "$POSTGRES_USER" "$POSTGRES_DB"')
                    + f" | wc -c > {work / 'raw.bytes'}"))
                raw_bytes = int((work / "raw.bytes").read_text())
                t["shell"].append(timed(
                    c("exec", "-T", "postgres", "sh", "-c",
                      'pg_dump -U "$POSTGRES_USER" "$POSTGRES_DB"') + f" | gzip > {plain}"))
                for name, cfg in (("zstd", cfg_zstd), ("gzip", cfg_gzip)):
                    shutil.rmtree(backups, ignore_errors=True)
                    res[name] = task_child(cfg, "backup")
                    t[name].append(res[name]["seconds"])
                    rss.append(res[name]["rss_mb"])
                # Restores: the gzip backup just taken; the plain dump into a new database.
                psql("DROP DATABASE IF EXISTS bench_plain")
                psql("CREATE DATABASE bench_plain")
                t["psql"].append(timed(
                    f"gunzip -c {plain} | "
                    + c("exec", "-T", "postgres", "sh", "-c",
                        'psql -Xq -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d bench_plain'
                        " > /dev/null")))
                psql("DROP DATABASE bench_plain")
                res["restore"] = task_child(cfg_gzip, "restore")
                t["restore"].append(res["restore"]["seconds"])
                rss.append(res["restore"]["rss_mb"])
            best = {k: min(v) for k, v in t.items()}
            ratio = raw_bytes / plain.stat().st_size if plain.stat().st_size else 0
            print(f"  database {size}; uncompressed dump {raw_bytes / 1e6:.0f} MB, gzip "
                  f"{plain.stat().st_size / 1e6:.1f} MB: compression ratio {ratio:.1f}:1")
            print(f"  {'variant':<48}{'best s':>8}  ratio")
            lines = [
                ("pg_dump -Fc -Z0 > /dev/null (the floor)", best["raw"], ""),
                ("pg_dump | gzip > file (no check)", best["shell"], ""),
                ("backup.postgres gzip", best["gzip"],
                 f"{best['gzip'] / best['shell']:.2f}x pg_dump|gzip"),
                ("backup.postgres zstd", best["zstd"],
                 f"{best['zstd'] / best['raw']:.2f}x pg_dump alone"),
                ("gunzip | psql into a new database (no check)", best["psql"], ""),
                ("restore.postgres --no-safety-backup", best["restore"],
                 f"{best['restore'] / best['psql']:.2f}x gunzip|psql"),
            ]
            for what, secs, r in lines:
                print(f"  {what:<48}{secs:>8.1f}  {r}")
            print("  (all runs: " + ", ".join(f"{k} " + " ".join(f"{x:.1f}" for x in v)
                                              for k, v in t.items()) + ")", flush=True)
            limit = 1.1 if scale >= 50 else 1.5  # issue 9: 1.1x on ~1 GB, 1.5x on ~200 MB
            met.append((f"scale {scale}: backup gzip <= {limit}x pg_dump | gzip",
                        best["gzip"] <= best["shell"] * limit))
            met.append((f"scale {scale}: backup zstd <= 1.2x pg_dump alone",
                        best["zstd"] <= best["raw"] * 1.2))
            met.append((f"scale {scale}: restore <= 1.5x gunzip | psql",
                        best["restore"] <= best["psql"] * 1.5))
        met.append(("Python peak RSS under 80 MB", max(rss) < 80))
        print()
        for what, good in met:
            print(f"  {'met   ' if good else 'MISSED'} {what}")
        return 0
    finally:
        if not args.keep:
            subprocess.run(["bash", "-c", compose(settings, "down", "-v", "-t", "5")],
                           capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
