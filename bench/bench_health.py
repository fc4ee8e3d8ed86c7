#!/usr/bin/env python3
"""Benchmark: health.check's parallel run against the same checks one by one.

Brings up a throw-away stack on the Docker rig (tests/rig/setup-docker.sh must
have run), then, in the same run and for ROUNDS rounds (medians reported):

* each check alone (``run_probes([probe])``: one script, one check);
* all checks one after another in one script (the sequential baseline);
* all checks as health.check runs them (in parallel).

Target: health.check's total at most 1.3x the slowest single check.
The checks run "on the server" through ``inv``'s local context (as cron runs
them); from a laptop one SSH round trip is added to each measurement alike.

    PYTHONPATH=tests .venv/bin/python bench/bench_health.py [--rounds 5] [--keep]

Exit status 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from invoke import Config, Context

from fabfile import health
from fabfile.host import Host

TARGET = 1.3


class _LocalContext(Context):
    def close(self) -> None:  # StackRig.down() closes its connection
        pass


class LocalTarget:
    """Stands in for the SSH host: StackRig drives this machine directly."""

    def connection(self, settings: dict):
        return _LocalContext(config=Config(overrides={"maicivy": dict(settings)}))


def timed(host, settings, probes, parallel=True) -> tuple[float, dict[str, int]]:
    """Wall-clock seconds of one run, and each probe's own milliseconds in it."""
    import time

    command = health.probe_command(probes, float(settings.health.timeout_seconds), parallel)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    r = host.check(command, timeout=120)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall, {k: ms for k, (_, ms, _) in health.parse_probe_output(r.stdout).items()}


CPU: list[float] = []


BEST: dict[str, float] = {}


def median_wall(host, settings, probes, parallel=True, rounds=5, name="") -> tuple[float, dict]:
    """Median wall-clock of ``rounds`` runs (the best one is kept in BEST[name])."""
    walls, inside = [], {}
    CPU.clear()
    for _ in range(rounds):
        wall, ms = timed(host, settings, probes, parallel)
        walls.append(wall)
        for k, v in ms.items():
            inside.setdefault(k, []).append(v)
    BEST[name] = min(walls)
    return statistics.median(walls), {k: statistics.median(v) / 1000 for k, v in inside.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()

    from stack_rig import StackRig

    tmp = Path(tempfile.mkdtemp(prefix="maicivy-bench-health-"))
    rig = StackRig(LocalTarget(), tmp, "maicivybenchhealth",
                   health={"disk_warn_percent": 98, "disk_critical_percent": 99},
                   # fewer background health-check execs while measuring
                   healthcheck={"interval": "5s"})
    print(f"bringing up a test stack under {tmp} ...", flush=True)
    try:
        rig.up()
        host = Host(_LocalContext())
        settings = rig.settings
        probes = health.probes(settings)
        rows, _ = health.run_probes(host, settings, probes)  # warm-up
        bad = [f"{r.check}: {r.detail}" for r in rows if r.status != health.OK]
        if bad:
            print("the stack is not healthy; figures would be meaningless:\n  "
                  + "\n  ".join(bad))
            return 2
        # each check alone: the HTTP checks (one curl in health.check) one by one too
        singles = [(label, health.http_probe(settings, [key], id=f"http_{key}"))
                   for key, label, _, _ in health.http_endpoints(settings)]
        singles += [(f"certificate {name}", health.http_probe(settings, [key], id=f"http_{key}"))
                    for key, name in health.cert_endpoints(settings)]
        singles += [(part, health.docker_probe(settings, (part,), id=f"docker_{part}"))
                    for part in health.DOCKER_PARTS]
        alone = {}
        for label, p in singles:
            alone[label], _ = median_wall(host, settings, [p], rounds=args.rounds, name=label)
        # the baseline: every check on its own, one after another, in one script
        sequential, _ = median_wall(host, settings, [p for _, p in singles], parallel=False,
                                    rounds=args.rounds, name="sequential")
        parallel, inside = median_wall(host, settings, probes, parallel=True, rounds=args.rounds,
                                       name="parallel")
        cpu = statistics.median(CPU)
        load = os.getloadavg()[0]
    finally:
        if not args.keep:
            rig.down()

    slowest_name = max(alone, key=alone.get)
    slowest = alone[slowest_name]
    ratio = parallel / slowest
    cores = os.cpu_count()
    print(f"\nhealth.check benchmark: {len(alone)} checks ({len(rows)} rows), {cores} cores, "
          f"median of {args.rounds} rounds, wall-clock of the whole script")
    print(f"  (1-minute load average at the end: {load:.1f})")
    print(f"  {'check':<43} {'alone':>7}")
    for label, seconds in alone.items():
        print(f"  {label:<43} {seconds:6.3f}s")
    print("  within the parallel run: " + ", ".join(
        f"{p.label} {inside.get(p.id, 0):.3f}s" for p in probes))
    print(f"  sum of the checks alone                     {sum(alone.values()):6.3f}s")
    print(f"  baseline: all checks one after another      {sequential:6.3f}s")
    print(f"  health.check (parallel)                     {parallel:6.3f}s")
    print(f"  slowest single check ({slowest_name})"
          f"{'':<{max(0, 21 - len(slowest_name))}}{slowest:6.3f}s")
    print(f"  CPU time of one health.check (this side's processes, not dockerd): {cpu:.3f}s "
          f"-> at least {cpu / cores:.3f}s on {cores} idle cores")
    print(f"  parallel / slowest single: {ratio:.2f}  (target <= {TARGET})  "
          f"{'PASS' if ratio <= TARGET else 'MISS'}")
    print(f"  speed-up over one after another: {sequential / parallel:.1f}x")
    best_single = max(BEST[label] for label in alone)
    print(f"  best runs (least disturbed): parallel {BEST['parallel']:.3f}s, one after another "
          f"{BEST['sequential']:.3f}s, slowest single {best_single:.3f}s -> ratio "
          f"{BEST['parallel'] / best_single:.2f}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
