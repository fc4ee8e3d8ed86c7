#!/usr/bin/env python3
"""An operator's first day, timed: from a fresh server to serving HTTPS, and
from a reboot to a healthy stack.

The server is the first-day story's (tests/story_support.py): Debian 13
booting systemd in a container (fabfile.sandbox), apt and pip served from the
local repository and wheelhouse of tests/rig/fresh-server/build.sh, images
from a registry with a password, certificates from pebble. Printed, each next
to the baseline measured in the same run:

* fresh server -> HTTPS with a real certificate: ``fab provision``, ``fab
  deploy``, ``fab ssl.obtain`` (the real CLI), against the bare boot of the
  server (container start to systemd "running");
* reboot -> healthy: ``docker restart`` of the server until /health answers
  over HTTPS and the 8 services are healthy (the systemd unit alone brings
  the stack up), against the same bare boot.

Needs the rig (tests/install-deps.sh). Everything runs on 127.0.0.1 and is
removed at the end.

    PYTHONPATH=tests .venv/bin/python bench/bench_first_day.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from story_support import World, image_ready

from fabfile import sandbox

os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


def timed(label: str, fn):
    t0 = time.monotonic()
    result = fn()
    took = time.monotonic() - t0
    print(f"  {label:<44} {took:7.1f} s", flush=True)
    return took, result


def fab_ok(world: World, *args: str):
    proc = world.fab(*args)
    if proc.returncode:
        sys.exit(f"fab {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def main() -> int:
    missing = image_ready()
    if missing:
        sys.exit(f"{missing}: run tests/install-deps.sh first")
    with tempfile.TemporaryDirectory(prefix="bench-first-day-") as tmp:
        work = Path(tmp)
        key = work / "client_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        world = World(work=work, client_key=key, name=f"maicivy-bench-{os.getpid()}")
        try:
            print("first day, fresh Debian 13 server -> HTTPS:")
            world.up()
            # Baseline: the bare server's boot, from container start to systemd running.
            boot, world.box = timed("baseline: bare boot (restart -> running, sshd up)",
                                    lambda: sandbox.reboot(world.box.name))
            prov, _ = timed("fab provision", lambda: fab_ok(world, "provision"))
            world.sh(f"sed -i -e 's|^DOCKER_REGISTRY=.*|DOCKER_REGISTRY=registry.test:5000|' "
                     f"-e 's|^REGISTRY_USERNAME=.*|REGISTRY_USERNAME={world.registry_user}|' "
                     f"-e 's|^REGISTRY_PASSWORD=.*|REGISTRY_PASSWORD={world.registry_password}|'"
                     " /opt/maicivy/.env")
            dep, _ = timed("fab deploy (first, images pulled)", lambda: fab_ok(world, "deploy"))
            cert, _ = timed("fab ssl.obtain (pebble)", lambda: fab_ok(world, "ssl.obtain"))
            total = prov + dep + cert
            print(f"  {'fresh server -> HTTPS, total':<44} {total:7.1f} s"
                  f"  ({total / boot:.0f}x the bare boot)")
            print("reboot -> healthy:")
            t0 = time.monotonic()
            world.reboot()
            up = time.monotonic() - t0
            healthy = up + world.wait_healthy(timeout=300)
            print(f"  {'restart -> systemd running, sshd up':<44} {up:7.1f} s")
            print(f"  {'restart -> stack healthy over HTTPS':<44} {healthy:7.1f} s"
                  f"  (bare boot {boot:.1f} s)")
        finally:
            world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
