"""The shell toolkit: the few dynamic pieces between Python and the server scripts.

A server script is a ``.sh`` file beside the module that runs it (shellcheck
clean, run for real in the fast tier with fake tools on ``PATH``). Python never
edits its text: it passes the values as positional arguments or environment,
and builds only the one command line that starts it::

    from ..shell import script
    PG_BACKUP = script(__file__, "pg-backup.sh")        # read once, at import
    host.run(PG_BACKUP.command(backup_dir, compression), sudo=True)

Output comes back framed in sections (``== NAME [first line]``, see
:func:`sections`) or as ``key=value`` lines; a failed script's message is its
last ``FAILED:`` line (:func:`last_lines` for any other command).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path


def q(value) -> str:
    """``value`` as one inert shell word."""
    return shlex.quote(str(value))


def words(*args) -> str:
    """The arguments as shell words, each quoted, joined by spaces."""
    return " ".join(q(a) for a in args)


def bash_c(text: str, *args, name: str = "bash") -> str:
    """``bash -c TEXT NAME ARGS...``: run ``text`` with bash (whatever the login
    shell), with ``$0`` = ``name`` and ``$1``... = ``args``."""
    return f"bash -c {q(text)} {words(name, *args)}"


def sh_c(text: str, *args, name: str = "sh") -> str:
    """``sh -c TEXT NAME ARGS...``: the same with ``sh``, for inside containers."""
    return f"sh -c {q(text)} {words(name, *args)}"


@dataclass(frozen=True)
class Script:
    """A ``.sh`` file read once; :meth:`command` is the line that runs it."""

    name: str
    text: str

    def command(self, *args, shell: str = "bash") -> str:
        """The command line running this script with ``args`` as ``$1``...
        (``shell="sh"`` for a POSIX script run inside a container)."""
        run = sh_c if shell == "sh" else bash_c
        return run(self.text, *args, name=self.name)

    def argv(self, *args, shell: str = "sh") -> list[str]:
        """The same as an argv list (for ``docker compose exec -T svc ...``)."""
        return [shell, "-c", self.text, self.name, *[str(a) for a in args]]


def script(anchor: str, name: str) -> Script:
    """The script ``name`` from the directory of the module file ``anchor``
    (pass ``__file__``); ``name`` may be in a subfolder (``scripts/x.sh``)."""
    path = Path(anchor).resolve().parent / name
    return Script(path.name, path.read_text())


# --- output ---------------------------------------------------------------------

SECTION = re.compile(r"^== (\S+)(?: (.*))?$")


def section(name: str) -> str:
    """The shell line that starts the output section ``name``."""
    return f"echo {q('== ' + name)}"


def sections(text: str) -> dict[str, list[str]]:
    """Split ``== NAME [first line]`` framed output into {NAME: non-empty lines}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = SECTION.match(line)
        if m:
            current = m.group(1)
            out.setdefault(current, [])
            if m.group(2):
                out[current].append(m.group(2))
            continue
        if current is not None and line.strip():
            out[current].append(line.rstrip("\n"))
    return out


def last_lines(stderr: str, stdout: str = "", n: int = 3, width: int = 300) -> str:
    """The last ``n`` non-empty lines of a failed command's output, on one line.

    stderr first (where errors go); stdout when stderr is empty. Never just
    "exit 1": says "no output" when there was none.
    """
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in (stdout or "").splitlines() if ln.strip()]
    if not lines:
        return "no output"
    text = " | ".join(lines[-n:])
    return text if len(text) <= width else "..." + text[-width:]
