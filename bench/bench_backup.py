#!/usr/bin/env python3
"""Benchmark: backup.postgres against the seed's shell pipeline, and Python's memory.

    python3 bench/bench_backup.py [--scale-small 7] [--scale-large 68] [--keep]

On the rig (dockerd, the local registry with the test images), in one run:

1. brings up postgres (+ redis) of a throw-away compose project;
2. ``pgbench -i`` at a small scale (~100 MB), one backup.postgres: peak RSS of
   the Python process that ran it;
3. ``pgbench -i`` at a large scale (~1 GB), then times, on the same data,
   the seed's pipeline ``docker compose exec -T postgres pg_dump | gzip > file``
   and backup.postgres with gzip and with zstd (each includes its verification:
   fsync, full read-back through pg_restore, manifest), printing both times and
   the ratio, and the peak RSS again.

Targets: gzip no slower than the shell pipeline (ratio <= 1.0), zstd at least
2x faster (ratio <= 0.5), peak RSS under 80 MB and flat across sizes. Each
backup runs in a fresh Python process (``--child``) so its ru_maxrss is its own.
Not a test: it prints figures and says which targets were met.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

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


def child(config: Path) -> None:
    """Run one backup.postgres in this process; print its figures as JSON."""
    import yaml
    from invoke import Context

    from fabfile.backup import run_backup
    from fabfile.config import load_settings
    from fabfile.host import Host

    settings = load_settings(invoke_section=yaml.safe_load(config.read_text()),
                             environ={}, files=[])
    host = Host(Context(), out=open(os.devnull, "w"))  # noqa: SIM115
    t0 = time.perf_counter()
    m = run_backup(host, settings, "postgres", offsite=False, prune=False)
    elapsed = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "rss_mb": rss_kb / 1024, "size": m["size"],
                      "rows": m["rows"], "file": m["file"]}))


def run(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], check=True, text=True, capture_output=True, **kw)


def backup_child(config: Path) -> dict:
    out = run(f"{sys.executable} {Path(__file__)} --child {config}").stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--scale-small", type=int, default=7, help="pgbench scale for ~100 MB")
    ap.add_argument("--scale-large", type=int, default=68, help="pgbench scale for ~1 GB")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args()
    if args.child:
        child(args.child)
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

    def db_size() -> str:
        return pg("psql -XtA -U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\" -c "
                  "\"SELECT pg_size_pretty(pg_database_size(current_database()))\"")

    def pgbench(scale: int) -> None:
        t = time.perf_counter()
        pg(f'pgbench -i -q -s {scale} -U "$POSTGRES_USER" "$POSTGRES_DB" 2>&1 | tail -1')
        print(f"  pgbench -i -s {scale}: {db_size()} in {time.perf_counter() - t:.0f}s",
              flush=True)

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

        print(f"\n~100 MB (scale {args.scale_small})", flush=True)
        pgbench(args.scale_small)
        small = backup_child(cfg_gzip)
        print(f"  backup.postgres gzip: {small['seconds']:.1f}s, {small['size'] / 1e6:.1f} MB, "
              f"Python peak RSS {small['rss_mb']:.1f} MB", flush=True)

        print(f"\n~1 GB (scale {args.scale_large})", flush=True)
        pgbench(args.scale_large)
        shell_file = work / "seed-style.sql.gz"
        timings: dict[str, list[float]] = {"shell": [], "gzip": [], "zstd": [], "raw": []}
        results = {}
        for _round in range(2):
            # The floor of every variant: pg_dump alone (postgres has cpus: 1.0).
            t = time.perf_counter()
            run(c("exec", "-T", "postgres", "sh", "-c",
                  'pg_dump -Fc -Z0 -U "$POSTGRES_USER" "$POSTGRES_DB"') + " > /dev/null")
            timings["raw"].append(time.perf_counter() - t)
            t = time.perf_counter()
            run(c("exec", "-T", "postgres", "sh", "-c",
                  'pg_dump -U "$POSTGRES_USER" "$POSTGRES_DB"') + f" | gzip > {shell_file}")
            timings["shell"].append(time.perf_counter() - t)
            for name, cfg in (("gzip", cfg_gzip), ("zstd", cfg_zstd)):
                results[name] = backup_child(cfg)
                timings[name].append(results[name]["seconds"])
            shutil.rmtree(work / "backups" / "postgres", ignore_errors=True)
        best = {k: min(v) for k, v in timings.items()}
        print(f"  pg_dump -Fc -Z0 > /dev/null alone (the floor): {best['raw']:.1f}s")
        print(f"  seed pipeline (pg_dump | gzip, no check): {best['shell']:.1f}s, "
              f"{shell_file.stat().st_size / 1e6:.1f} MB", flush=True)
        for name in ("gzip", "zstd"):
            r = results[name]
            print(f"  backup.postgres {name} (dump + fsync + full read-back + manifest): "
                  f"{best[name]:.1f}s, {r['size'] / 1e6:.1f} MB, ratio to the seed pipeline "
                  f"{best[name] / best['shell']:.2f}, Python peak RSS {r['rss_mb']:.1f} MB")
        print("  (best of 2 runs each; all runs: "
              + ", ".join(f"{k} " + " ".join(f"{x:.1f}" for x in v)
                          for k, v in timings.items()) + ")")

        rss = [small["rss_mb"], results["gzip"]["rss_mb"], results["zstd"]["rss_mb"]]
        checks = [
            ("gzip no slower than the seed pipeline", best["gzip"] <= best["shell"]),
            ("zstd at least 2x faster than the seed pipeline",
             best["zstd"] <= best["shell"] / 2),
            ("Python peak RSS under 80 MB", max(rss) < 80),
            ("Python peak RSS flat across sizes (within 10%)",
             max(rss) <= min(rss) * 1.10),
        ]
        print()
        for label, good in checks:
            print(f"  {'met   ' if good else 'MISSED'} {label}")
        return 0
    finally:
        if not args.keep:
            subprocess.run(["bash", "-c", compose(settings, "down", "-v", "-t", "5")],
                           capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
