"""The deploy log: one line per deploy, rollback or restart, and its table.

``{root}/.deploy/deploy.log``: time, local user, result, release, image refs
and IDs, a failure detail; the server appends its own view of who ran it
(server_user, sudo_user, ssh_from: fabfile/audit.py) when it writes the line.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping

from ..audit import IDENTITY_SH, log_line_with_identity
from ..config import Settings
from .release import state_dir


def log_path(settings: Settings) -> str:
    return f"{state_dir(settings)}/deploy.log"


def log_append(settings: Settings, line: str) -> str:
    """sh: append ``line`` to the deploy log, with the server-side identity after it."""
    log = log_path(settings)
    return "\n".join([IDENTITY_SH, log_line_with_identity(shlex.quote(line), shlex.quote(log))])


def log_line(when: str, user: str, result: str, release: str,
             images: Mapping[str, tuple[str, str]], detail: str = "") -> str:
    """One deploy log line: time, local user, result, release, image refs and IDs.

    The server appends its own view of who ran it (server_user, sudo_user,
    ssh_from: fabfile/audit.py) when it writes the line.
    """
    imgs = ",".join(f"{s}={ref}@{i.removeprefix('sha256:')[:12]}"
                    for s, (ref, i) in sorted(images.items()))
    out = f"{when} user={user} result={result} release={release or '-'} images={imgs or '-'}"
    if detail:
        out += " detail=" + json.dumps(detail)
    return out


_LOG = re.compile(r"^(\S+) user=(\S+) result=(\S+) release=(\S+) images=(\S+)"
                  r'(?: detail=("(?:[^"\\]|\\.)*"))?'
                  r"(?: server_user=(\S+) sudo_user=(\S+) ssh_from=(\S+))?$")


def parse_log_line(line: str) -> dict | None:
    """One deploy log line as a dict (None for a line that is not one)."""
    m = _LOG.match(line.strip())
    if not m:
        return None
    images = {}
    if m.group(5) != "-":
        for item in m.group(5).split(","):
            service, _, rest = item.partition("=")
            ref, _, image_id = rest.rpartition("@")
            images[service] = {"ref": ref or image_id, "id": image_id if ref else ""}
    detail = ""
    if m.group(6):
        try:
            detail = json.loads(m.group(6))
        except ValueError:
            detail = m.group(6)
    release = m.group(4)
    return {"time": m.group(1), "user": m.group(2), "result": m.group(3),
            "release": "" if release == "-" else release, "images": images, "detail": detail,
            # What the server saw (fabfile/audit.py), when the line has it.
            "server_user": m.group(7) or "", "sudo_user": m.group(8) or "",
            "ssh_from": m.group(9) or ""}


def _tag(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else (name or "-")


def history_table(entries: list[dict]) -> str:
    """The deploy log as an aligned table: time, result, release, user, app tags, detail."""
    head = ("TIME", "RESULT", "RELEASE", "USER", "BACKEND", "FRONTEND", "DETAIL")
    rows = [head]
    for e in entries:
        imgs = e["images"]
        rows.append((e["time"], e["result"], e["release"] or "-", e["user"],
                     _tag(imgs["backend"]["ref"]) if "backend" in imgs else "-",
                     _tag(imgs["frontend"]["ref"]) if "frontend" in imgs else "-",
                     (str(e["detail"])[:100] or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                     + "  " + r[-1] for r in rows).rstrip()
