"""The one lock of the stack, held on the server, and the deploy journal.

Every task that changes the stack -- ``deploy``, ``deploy.rollback``,
``restore.*``, ``monitoring.push``, ``provision`` -- holds the **stack lock**
exclusively; backups hold it *shared* (several backups may run together, never
beside one of those tasks). A deploy that finds only backups holding it waits
for them (``deploy.lock_wait_seconds``); a backup that finds a deploy waits
``backup.lock_wait_seconds`` and then fails with one line naming the holder.
A second exclusive task is refused at once, naming the holder.

How it holds (files under ``{root}/.deploy``)::

    lock          flock(1) target
    lock.owner    who holds it exclusively: "<who> since <time> pid <bash> <cat>"
    lock.shared.<pid>   one line per backup holding it shared
    lock.token    random token of the exclusive holder
    lock.step     flock(1) target held (shared) by every step that changes the server
    journal       "started", "step", "step-end", "finished", "lost-lock" lines

* The lock is an flock held by a small command *on the server* for as long as
  the task runs (an SSH channel from a laptop, a subprocess with ``inv``). Its
  stdin is our end: when the task ends, or its connection dies, stdin closes
  and the kernel drops the lock -- a dead task never leaves a stale lock.
  Two processes hold it (the shell and the ``cat`` that waits on stdin):
  killing the one whose pid is recorded does not free it.
* Every command that changes the server is wrapped by :meth:`StackLock.wrap`:
  it takes ``lock.step`` shared for the time of the command, checks that the
  lock is still held and that ``lock.token`` is still ours, writes a ``step``
  line to the journal, runs, writes ``step-end``. If the check fails (the
  holder was killed, ``deploy.unlock`` broke the lock, another task took it),
  the command does not run and the task stops with :class:`LostLock` -- no
  rollback, nothing more changed. A new holder takes ``lock.step``
  exclusively before writing its token, so it waits for a step of the old
  holder that is still running: the two never overlap.
* The SSH connection of the lock is watched: once it is gone, the next command
  raises :class:`LostConnection` instead of letting fabric reconnect silently
  (the server released the lock with the connection).
* The journal has a ``started`` line per exclusive task; a task that ended
  writes ``finished``. When the lock is taken, a ``started`` without its end is
  reported as an interrupted task, with the last step it began.

:func:`lock_holder` reads who holds the lock, without taking it (for
``status``, ``doctor``).
"""

from __future__ import annotations

import functools
import getpass
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from .clock import iso
from .config import Settings
from .errors import OpsError
from .host import Host, Stream
from .shell import q, script, sections

BUSY = 75  # exit status of a holder that could not take the lock
LOST = 76  # exit status of a step whose lock check failed

_NOW = "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)"


class LockBusy(OpsError):
    exit_code = BUSY


class LockLost(OpsError):
    """This task no longer holds the stack lock; it stops without changing more."""


class LostLock(LockLost):
    pass


class LostConnection(LockLost):
    """The SSH connection holding the lock died mid-task."""

    exit_code = 3


def lock_dir(settings: Settings) -> str:
    return f"{settings.root}/.deploy"




def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def describe_holder(task: str) -> str:
    return f"{task} by {who()} since {iso()}"


# --- scripts: the .sh files beside this module, values as arguments ------------------

HOLD = script(__file__, "scripts/lock-hold.sh")
TAKE = script(__file__, "scripts/lock-take.sh")
STEP = script(__file__, "scripts/lock-step.sh")
BREAK = script(__file__, "scripts/lock-break.sh")
HOLDERS = script(__file__, "scripts/lock-who.sh")


def holder_script(path: str, wait: int, info: str, *, shared: bool = False) -> str:
    """Take the flock ``path`` (waiting ``wait`` s), say LOCKED, hold it until
    stdin closes. Used for the per-kind backup locks and the shared stack lock."""
    return HOLD.command(path, int(wait), info, "shared" if shared else "exclusive")


def stack_lock_script(d: str, token: str, info: str, task: str, wait: int,
                      report: str = "", by: str = "") -> str:
    """Take the stack lock exclusively (see the module doc), then run ``report``
    (shell, with ``$D`` and ``$T`` set); lock-take.sh says what it prints."""
    return TAKE.command(d, token, info, task, int(wait), by or info, report)


def guard_script(d: str, token: str, command: str, label: str) -> str:
    """Run ``command`` only while we hold the stack lock (see the module doc)."""
    return STEP.command(d, token, label, command)


def journal_line_cmd(d: str, token: str, event: str, detail: str = "") -> str:
    line = f"{token[:8]} {event}" + (f" {detail}" if detail else "")
    return f"printf '%s %s\\n' \"{_NOW}\" {q(line)} >> {q(d + '/journal')}"


def unlock_script(d: str, by: str) -> str:
    """Break the stack lock: kill its holders, drop the token (a resumed holder fails)."""
    return BREAK.command(d, by)


def holder_read_script(d: str) -> str:
    """Read-only: who holds the stack lock (exclusive owner, or backups sharing it)."""
    return HOLDERS.command(d)


# --- the journal (pure) -----------------------------------------------------------------


@dataclass
class JournalEntry:
    token: str
    started: str
    task: str = ""
    by: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)  # (time, label)
    step_ended: bool = True
    end: str = ""  # the finished/lost-lock/unlocked line's event and detail

    def describe(self) -> str:
        what = f"{self.task or 'a task'} by {self.by or 'unknown'} (started {self.started})"
        if not self.steps:
            return f"{what} stopped before it changed anything"
        when, label = self.steps[-1]
        state = "did not finish" if not self.step_ended else "had finished"
        return f"{what} stopped at step '{label}' (begun {when}, {state})"


_STARTED = re.compile(r"^(\S+) (\w{8}) started task=(\S+) by=(.*)$")


def parse_journal(lines) -> list[JournalEntry]:
    entries: dict[str, JournalEntry] = {}
    order: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        m = _STARTED.match(line)
        if m:
            e = JournalEntry(m.group(2), m.group(1), m.group(3), m.group(4))
            entries[e.token] = e
            order.append(e.token)
            continue
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in entries:
            continue
        e = entries[parts[1]]
        event = parts[2]
        rest = parts[3] if len(parts) > 3 else ""
        if event == "step":
            e.steps.append((parts[0], rest))
            e.step_ended = False
        elif event == "step-end":
            e.step_ended = True
        elif event in ("finished", "lost-lock", "unlocked"):
            e.end = f"{event} {rest}".strip()
    return [entries[t] for t in order]


def interrupted(lines, own_token: str = "") -> JournalEntry | None:
    """The last exclusive task that started and never wrote its end (None if all ended)."""
    entries = [e for e in parse_journal(lines) if e.token != own_token[:8]]
    if entries and not entries[-1].end:
        return entries[-1]
    if entries and entries[-1].end.startswith(("lost-lock", "unlocked")):
        return entries[-1]
    return None


# --- holding a lock ------------------------------------------------------------------


class _Holder:
    """A command on the server that holds a lock while our end of its stdin is open."""

    def __init__(self, host: Host, command: str, sudo: bool = True):
        self.host = host
        self.command = command
        self.sudo = sudo
        self.stream: Stream | None = None

    def start(self, until: tuple[str, ...], on_line=None):
        """Read lines until one starts with a marker in ``until`` or the holder exits.

        Returns (all text, exit status or None while it still holds).
        """
        self.stream = self.host.stream(self.command, sudo=self.sudo)
        buf = b""
        lines: list[str] = []
        while True:
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                lines.append(line)
                if on_line:
                    on_line(line)
                if line.startswith(until):
                    return "\n".join(lines) + "\n", None
            data = self.stream.read(65536)
            if not data:
                text = "\n".join(lines) + ("\n" + buf.decode(errors="replace") if buf else "")
                return text, self.stream.wait()
            buf += data

    def alive(self) -> bool:
        """False once the SSH connection that holds the lock is gone.

        Whether the lock itself is still ours is for the server to say (the
        guard of each step): its holder may be killed while the link lives.
        """
        return self.stream is not None and self.stream.alive()

    def release(self) -> None:
        if self.stream is None:
            return
        try:
            self.stream.close_stdin()
            self.stream.wait(30)
        except Exception:  # the connection may be gone: the lock went with it
            pass
        finally:
            self.stream.close()
            self.stream = None


# Locks this process holds: (host name, lock file) -> holder. A nested request for a
# lock we already hold (the pre-deploy backup inside a deploy) takes nothing.
_HELD: dict[tuple[str, str], object] = {}


@contextmanager
def server_lock(host: Host, path: str, *, wait: int, task: str, sudo: bool = True,
                shared: bool = False) -> Iterator[None]:
    """Hold the flock ``path`` on the server for the ``with`` block (waiting ``wait`` s).

    For the per-kind backup locks; the stack lock is :func:`stack_lock`.
    """
    if host.dry_run:
        host.say(f"[dry-run] would lock {path}")
        yield
        return
    holder = _Holder(host, holder_script(path, wait, describe_holder(task), shared=shared),
                     sudo=sudo)
    text, status = holder.start(("LOCKED", "BUSY"))
    line = text.strip().splitlines()[-1] if text.strip() else ""
    if status is not None or not line.startswith("LOCKED"):
        holder.release()
        if line.startswith("BUSY"):
            who_ = line[4:].strip() or "another run"
            raise LockBusy(f"{path} is held by {who_}; waited {wait}s. Try again when it "
                           "has finished")
        raise OpsError(f"cannot take the lock {path} on {host.name} (is flock installed "
                       "and the directory writable?)")
    try:
        yield
    finally:
        holder.release()


class StackLock:
    """The stack lock held exclusively by one task (see the module doc)."""

    def __init__(self, host: Host, settings: Settings, task: str, *, report: str = "",
                 wait: int | None = None, owner: str | None = None):
        self.host = host
        self.settings = settings
        self.task = task
        self.dir = lock_dir(settings)
        self.token = secrets.token_hex(16)
        self.owner = owner or describe_holder(task)
        self.wait = int(settings.deploy.lock_wait_seconds) if wait is None else wait
        self.report = report
        self.label = ""
        self.holder: _Holder | None = None
        self.journal: list[str] = []
        self.previous: JournalEntry | None = None
        self.lost: LockLost | None = None
        self.report_text = ""
        self.finished = False

    # -- taking and giving back ---------------------------------------------------------

    def acquire(self) -> str:
        """Take the lock; returns what ``report`` printed (with the ``== `` markers)."""
        script = stack_lock_script(self.dir, self.token, self.owner, self.task, self.wait,
                                   self.report, by=who())
        self.holder = _Holder(self.host, script)

        def on_line(line: str) -> None:
            if line == "== waiting":
                self.host.say(f"{self.host.name}: a backup is running; waiting up to "
                              f"{self.wait}s for it to finish (deploy.lock_wait_seconds)")
            elif line == "== waiting-step":
                self.host.say(f"{self.host.name}: waiting for a step of the former lock "
                              "holder that still runs")

        text, status = self.holder.start(("== ready",), on_line)
        sec = sections(text)
        if status is not None:
            self.holder.release()
            if "busy" in sec or status == BUSY:
                holder = " ".join(sec.get("busy", [])).strip()
                holder = re.sub(r" pid \d+ \d+$", "", holder) or "owner unknown"
                if "waiting" in sec:
                    raise LockBusy(f"{self.host.name}: a backup still holds the stack lock "
                                   f"after {self.wait}s ({holder}); try again when it has "
                                   "finished")
                raise LockBusy(f"{self.host.name}: another task holds the stack lock: "
                               f"{holder}. Wait for it, or run deploy.unlock if it is stale")
            last = text.strip().splitlines()[-1:] or ["no output"]
            raise OpsError(f"{self.host.name}: could not take the stack lock "
                           f"(exit {status}): {last[0]}")
        self.journal = sec.get("journal", [])
        self.previous = interrupted(self.journal, self.token)
        if self.previous is not None:
            self.host.say(f"{self.host.name}: warning: the previous {self.previous.describe()}; "
                          "it was interrupted" + (f" ({self.previous.end})"
                                                  if self.previous.end else ""))
        _HELD[(self.host.name, self.dir + "/lock")] = self
        self.report_text = text[text.find("== locked"):]
        return self.report_text

    def release(self) -> None:
        _HELD.pop((self.host.name, self.dir + "/lock"), None)
        if self.holder is not None:
            self.holder.release()
            self.holder = None

    # -- checking before every step ---------------------------------------------------

    def step(self, label: str) -> None:
        """Name the steps that follow (in the journal and in a lost-lock message)."""
        self.label = label

    def wrap(self, command: str) -> str:
        first = command.strip().splitlines()[0][:60] if command.strip() else "-"
        label = self.label or first
        return guard_script(self.dir, self.token, command, label)

    def check_alive(self) -> None:
        """Raise LostConnection when the connection holding the lock is gone."""
        if self.lost is not None:
            raise self.lost
        if self.holder is not None and not self.holder.alive():
            self.lost = LostConnection(
                f"{self.host.name}: lost the connection during {self.task}"
                + (f" (step: {self.label})" if self.label else "")
                + "; the server released the lock with it. Stopped here, nothing rolled "
                "back (never without the lock): run it again, it reports what was left")
            raise self.lost

    def after(self, exited: int, stdout: str) -> None:
        """Raise LostLock when the step refused to run; LostConnection when the link died."""
        if exited == LOST and "== lost-lock" in stdout:
            holder = sections(stdout).get("lost-lock", [""])
            held = re.sub(r" pid \d+ \d+$", "", " ".join(holder).strip())
            self.lost = LostLock(
                f"{self.host.name}: lost the stack lock before "
                + (f"step '{self.label}'" if self.label else "the next step")
                + f" of {self.task} ({'now held by ' + held if held else 'released'}); "
                "stopped without changing anything more and without rolling back. Run "
                "deploy again when the other task has finished")
            self._journal_lost()
            raise self.lost
        self.check_alive()

    def verify(self, label: str) -> None:
        """Raise LostLock/LostConnection unless the lock is still ours (one round trip).

        For decisions made from read-only checks (a failed health gate): they mean
        nothing if another task took over meanwhile.
        """
        previous, self.label = self.label, label
        try:
            self.host.run("true", sudo=True)
        finally:
            self.label = previous

    def _journal_lost(self) -> None:
        try:
            self.host._invoke(journal_line_cmd(self.dir, self.token, "lost-lock",
                                               f"step={self.label or '-'}"),
                              sudo=True, warn=True, hide=True, timeout=30, unguarded=True)
        except Exception:  # best effort: the journal line is informational
            pass

    def finish(self, result: str, extra: str = "") -> None:
        """Write the journal's end line (and ``extra`` commands) as a guarded step."""
        label, self.label = self.label, "finish"
        cmd = journal_line_cmd(self.dir, self.token, "finished", f"result={result}")
        self.host.run(f"{extra}\n{cmd}" if extra else cmd, sudo=True)
        self.label = label
        self.finished = True


@contextmanager
def stack_lock(host: Host, settings: Settings, task: str, *, report: str = "",
               owner: str | None = None, shared: bool = False,
               context=None) -> Iterator[StackLock | None]:
    """Hold the stack lock for the ``with`` block.

    Exclusive (the default) yields the :class:`StackLock`; while it is held,
    ``host`` (and every Host made by ``host_for`` for ``context``) runs each
    changing command through its guard. ``shared`` is for backups: it waits
    ``backup.lock_wait_seconds`` for an exclusive holder. Nested requests for a
    lock this process holds take nothing. Dry runs take nothing.
    """
    path = lock_dir(settings) + "/lock"
    if host.dry_run or (host.name, path) in _HELD:
        yield None
        return
    if shared:
        with server_lock(host, path, wait=int(settings.backup.lock_wait_seconds),
                         task=task, shared=True):
            _HELD[(host.name, path)] = "shared"
            try:
                yield None
            finally:
                _HELD.pop((host.name, path), None)
        return
    lock = StackLock(host, settings, task, report=report, owner=owner)
    lock.acquire()
    host.guard = lock
    if context is not None:
        object.__setattr__(context, "_maicivy_guard", lock)
    try:
        yield lock
        if not lock.finished and lock.lost is None:
            lock.finish("ok")
    except LockLost:
        raise
    except BaseException:
        if not lock.finished and lock.lost is None:
            try:  # the task failed but ended: the journal says so
                lock.finish("failed")
            except Exception:  # keep the task's own error
                pass
        raise
    finally:
        host.guard = None
        if context is not None:
            object.__setattr__(context, "_maicivy_guard", None)
        lock.release()


def locked(task: str, before=None):
    """Decorator for a task that changes the stack: hold the stack lock around it.

    Skipped for ``--dry-run``. Put it under ``@ops_task``. ``before(host,
    settings)``, if given, runs first, without the lock (a read-only preflight
    that may refuse before the lock directory is even created).
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(c, *args, **kwargs):
            if kwargs.get("dry_run"):
                return fn(c, *args, **kwargs)
            from .core import host_for, settings_for

            settings = settings_for(c)
            host = host_for(c, settings)
            if before is not None:
                before(host, settings)
            with stack_lock(host, settings, task, context=c):
                return fn(c, *args, **kwargs)

        return wrapper

    return decorate


def backup_locks(host: Host, settings: Settings, path: str, task: str):
    """What a backup holds: the stack lock shared, then its own kind's lock."""
    @contextmanager
    def both():
        with stack_lock(host, settings, task, shared=True), \
                server_lock(host, path, wait=int(settings.backup.lock_wait_seconds), task=task):
            yield

    return both()


# --- reading and breaking -----------------------------------------------------------


@dataclass
class Holder:
    """Who holds the stack lock: ``mode`` is "exclusive" or "shared" (backups)."""

    mode: str
    holders: list[str]

    def __str__(self) -> str:
        return "; ".join(self.holders) or "unknown"


def parse_holder(text: str) -> Holder | None:
    sec = sections(text)
    if "exclusive" in sec:
        owner = re.sub(r" pid \d+ \d+$", "", " ".join(sec["exclusive"]).strip())
        return Holder("exclusive", [owner or "unknown"])
    if "shared" in sec:
        return Holder("shared", sec["shared"])
    return None


def lock_holder(host: Host, settings: Settings) -> Holder | None:
    """Who holds the stack lock now (None when it is free). Read-only, takes nothing."""
    r = host.check(holder_read_script(lock_dir(settings)), sudo=True, timeout=30)
    return parse_holder(r.stdout)


def break_lock(host: Host, settings: Settings) -> str | None:
    """Kill the holder of a stale stack lock; returns who held it (None if it was free)."""
    r = host.run(unlock_script(lock_dir(settings), describe_holder("deploy.unlock")),
                 sudo=True, warn=True, timeout=60)
    sec = sections(r.stdout)
    if "free" in sec:
        return None
    owner = re.sub(r" pid \d+ \d+$", "", " ".join(sec.get("owner", [])).strip())
    if "unknown" in sec:
        raise OpsError(f"{host.name}: the lock is held but its owner is unknown; find the "
                       f"process with: fuser -v {lock_dir(settings)}/lock")
    if r.failed or "broken" not in sec:
        raise OpsError(f"{host.name}: could not break the lock held by {owner or 'unknown'}")
    return owner or "unknown"


__all__ = ["BUSY", "LOST", "Holder", "LockBusy", "LockLost", "LostConnection", "LostLock",
           "StackLock", "backup_locks", "break_lock", "holder_script", "interrupted",
           "lock_dir", "lock_holder", "locked", "nullcontext", "parse_journal",
           "server_lock", "stack_lock"]
