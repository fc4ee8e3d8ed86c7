"""Stream a long-running command's output as it comes, and stop it when we stop.

``run()`` keeps all output in memory until the command ends: useless for
``docker compose logs --follow``. :func:`stream` runs the command through
:meth:`Host.stream` (an SSH channel with ``fab``, a local subprocess with
``inv`` on the server) and copies its stdout and stderr to ours chunk by chunk.

Stopping (Ctrl-C) must end the command on the server too. Closing an SSH
channel does not signal a command that has no terminal: it lives on until it
next writes. So the command runs under a small watchdog (stream-watch.sh):
in its own process group, while a ``cat`` reads our stdin; when we close
that stdin (Ctrl-C, or the connection dies), ``cat`` ends and the whole
process group is terminated.
"""

from __future__ import annotations

import sys
import time

from .host import Host
from .shell import script

INTERRUPTED = 130

WATCH = script(__file__, "scripts/stream-watch.sh")


def watched(command: str) -> str:
    """``command`` in its own process group, killed when our stdin reaches EOF."""
    return WATCH.command(command)


def _write(stream, data: bytes) -> None:
    if data:
        stream.write(data)
        stream.flush()


def stream(host: Host, command: str, *, sudo: bool = True, out=None, err=None) -> int:
    """Run ``command`` on the target, copying its output as it comes; its exit code.

    On Ctrl-C (KeyboardInterrupt) the command is stopped on the target and
    130 is returned.
    """
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    running = host.stream(watched(command), sudo=sudo)
    try:
        while not running.done():
            stdout, stderr = running.poll(0.2)
            _write(out, stdout)
            _write(err, stderr)
        return running.wait()
    except KeyboardInterrupt:
        try:
            running.close_stdin()  # EOF to the watchdog: it stops the command
            deadline = time.monotonic() + 10
            while running.wait(0.05) is None and time.monotonic() < deadline:
                pass
        except Exception:  # the connection may be gone: the command went with it
            pass
        return INTERRUPTED
    finally:
        running.close()
