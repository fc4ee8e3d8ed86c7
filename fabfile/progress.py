"""Progress of long steps: one line per step with its elapsed time.

Pulls, backups, restores and health waits call :func:`step`::

    with step("pull images") as p:
        ...
        p.update("3 of 8 layers")      # live line, only on a terminal

When the step ends it prints one line -- ``pull images: done in 12.3s`` (or
``failed after ...`` when an exception leaves the block). On a terminal a
live line (``\\r``-rewritten, cleared at the end) shows the updates in the
meantime; when the output is not a terminal (cron, CI, a pipe) nothing but the
step lines is printed.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

_ACTIVE: list[Step] = []


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Step:
    """A running step; :meth:`update` shows a live detail on a terminal."""

    def __init__(self, what: str, out=None):
        self.what = what
        self.out = out or sys.stdout
        self.live = _is_tty(self.out)
        self.start = time.monotonic()
        self.detail = ""
        self.note = ""  # shown in parentheses on the final line
        self.failed = False  # set it when the step failed without raising
        self._shown = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, detail: str) -> None:
        """Show ``detail`` on the live line (a no-op when not on a terminal)."""
        self.detail = detail
        if not self.live:
            return
        line = f"{self.what}: {detail} ({self.elapsed:.0f}s)"
        self.out.write("\r\033[K" + line[:200])
        self.out.flush()
        self._shown = True

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            if _ACTIVE and _ACTIVE[-1] is self:  # nested steps: only the innermost ticks
                self.update(self.detail)

    def start_ticker(self) -> None:
        """On a terminal, refresh the live line (elapsed seconds) every second."""
        self._stop = threading.Event()
        if self.live:
            self._ticker = threading.Thread(target=self._tick, args=(self._stop,), daemon=True)
            self._ticker.start()

    def finish(self, outcome: str, note: str = "") -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            ticker = getattr(self, "_ticker", None)
            if ticker is not None:
                ticker.join(timeout=2)
        if self._shown:
            self.out.write("\r\033[K")
        line = f"{self.what}: {outcome} {self.elapsed:.1f}s"
        if note:
            line += f" ({note})"
        self.out.write(line + "\n")
        self.out.flush()


@contextmanager
def step(what: str, out=None):
    """Time a step; print ``WHAT: done in Ns`` or ``WHAT: failed after Ns``."""
    s = Step(what, out)
    s.update("...")
    s.start_ticker()
    _ACTIVE.append(s)
    try:
        yield s
    except BaseException:
        s.finish("failed after")
        raise
    finally:
        _ACTIVE.remove(s)
    s.finish("failed after" if s.failed else "done in", s.note)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
