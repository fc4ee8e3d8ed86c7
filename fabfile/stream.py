"""Stream a long-running command's output as it comes, and stop it when we stop.

``run()`` keeps all output in memory until the command ends: useless for
``docker compose logs --follow``. :func:`stream` runs the command on a raw SSH
channel (``fab``) or a local subprocess (``inv`` on the server) and copies
its stdout and stderr to ours chunk by chunk.

Stopping (Ctrl-C) must end the command on the server too. Closing an SSH
channel does not signal a command that has no terminal: it lives on until it
next writes. So the command runs under a small watchdog (:func:`watched`):
in its own process group, while a ``cat`` reads our stdin; when we close
that stdin (Ctrl-C, or the connection dies), ``cat`` ends and the whole
process group is terminated.
"""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import sys
import time

from .host import Host, sudo_wrap

INTERRUPTED = 130


def watched(command: str) -> str:
    """``command`` in its own process group, killed when our stdin reaches EOF."""
    return "\n".join([
        "exec 3<&0",
        f"setsid bash -c {shlex.quote(command)} </dev/null & p=$!",
        # The watcher reads fd 3 (our stdin): a background job's own stdin is /dev/null.
        # (its output goes nowhere: it must never hold our stdout/stderr open)
        "setsid bash -c 'cat >/dev/null; kill -TERM -- -\"$1\" 2>/dev/null || "
        "kill -TERM \"$1\"' _ \"$p\" <&3 >/dev/null 2>&1 & w=$!",
        "exec 3<&-",
        'wait "$p"; rc=$?',
        # (before its setsid the watcher has no process group of its own yet)
        'kill -TERM -- -"$w" 2>/dev/null || kill -TERM "$w" 2>/dev/null',
        'exit "$rc"',
    ])


def _write(stream, data: bytes) -> None:
    stream.write(data)
    stream.flush()


def stream(host: Host, command: str, *, sudo: bool = True, out=None, err=None) -> int:
    """Run ``command`` on the target, copying its output as it comes; its exit code.

    On Ctrl-C (KeyboardInterrupt) the command is stopped on the target and
    130 is returned.
    """
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    script = watched(command)
    if sudo and host.use_sudo:
        script = sudo_wrap(script)
    if host.is_remote:
        return _stream_channel(host, script, out, err)
    return _stream_local(script, out, err)


def _stream_channel(host: Host, script: str, out, err) -> int:
    chan = host.open_channel(f"bash -c {shlex.quote(script)}")
    try:
        while True:
            select.select([chan], [], [], 0.2)
            busy = False
            while chan.recv_ready():
                _write(out, chan.recv(65536))
                busy = True
            while chan.recv_stderr_ready():
                _write(err, chan.recv_stderr(65536))
                busy = True
            if not busy and chan.exit_status_ready():
                return chan.recv_exit_status()
    except KeyboardInterrupt:
        try:
            chan.shutdown_write()  # EOF to the watchdog: it stops the command
            deadline = time.monotonic() + 10
            while not chan.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # the connection may be gone: the command went with it
            pass
        return INTERRUPTED
    finally:
        chan.close()


def _stream_local(script: str, out, err) -> int:
    proc = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        while sinks:
            ready, _, _ = select.select(list(sinks), [], [], 0.5)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    _write(sinks[fd], data)
                else:
                    del sinks[fd]
        return proc.wait()
    except KeyboardInterrupt:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
        return INTERRUPTED
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
