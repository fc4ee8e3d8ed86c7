"""The backups on the server: manifests, names, listing, finding one, checks.

A backup is complete only when its JSON manifest exists (written last); the
manifest records the data file's sha256 and size, the tool and server
versions, the per-table row counts (Postgres) or key count (Redis), the
duration and the verification result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..clock import parse_iso
from ..config import Settings
from ..errors import OpsError
from ..host import Host
from .retention import Backup
from .scripts import KINDS, NAME_RE, kind_dir, listing_command

MANIFEST_FORMAT = 1


def manifest_json(manifest: Mapping) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


@dataclass
class Entry:
    """A backup found on the server (complete or not)."""

    kind: str
    name: str
    manifest: dict | None = None
    files: dict[str, int] = field(default_factory=dict)  # file name -> size
    directory: str | None = None  # None: the kind's directory under backup.dir

    @property
    def complete(self) -> bool:
        m = self.manifest
        return bool(m) and bool(m.get("verification", {}).get("ok")) and m.get("file") in self.files

    @property
    def label(self) -> str:
        """"safety" for the copy a restore takes of what it replaces; "" otherwise."""
        if self.manifest and self.manifest.get("label"):
            return str(self.manifest["label"])
        return "safety" if self.name.endswith("-safety") else ""

    @property
    def created(self) -> datetime:
        if self.manifest and self.manifest.get("created_at"):
            return parse_iso(self.manifest["created_at"])
        # "postgres-20261125T030000Z[-2]"
        stamp = self.name.split("-")[1]
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    @property
    def size(self) -> int:
        if self.manifest:
            return int(self.manifest.get("size", 0))
        return sum(self.files.values())

    def dir(self, settings: Settings) -> str:
        return self.directory or kind_dir(settings, self.kind)

    def data_path(self, settings: Settings) -> str:
        return f"{self.dir(settings)}/{(self.manifest or {}).get('file')}"

    def paths(self, settings: Settings) -> list[str]:
        d = self.dir(settings)
        return [f"{d}/{f}" for f in sorted(self.files)]

    def as_backup(self) -> Backup:
        return Backup(self.name, self.kind, self.created, self.complete,
                      tuple(sorted(self.files)), self.size)


# The data files we write, by kind: nothing else is ever taken from a manifest.
DATA_SUFFIX = {"postgres": r"\.dump\.(gz|zst)", "redis": r"\.rdb\.(gz|zst)"}
GLOBALS_SUFFIX = r"\.globals\.sql\.(gz|zst)"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def manifest_problem(kind: str, name: str, manifest) -> str | None:
    """Why ``manifest`` (read from the server or a bucket) is not one of ours, or None.

    Every name in it must be exactly what a backup of ``kind`` called ``name``
    writes (no ``/``, known suffixes); checksums and sizes must be well formed.
    """
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    if not NAME_RE.fullmatch(name) or not name.startswith(kind + "-"):
        return f"{name!r} is not a {kind} backup name"
    if manifest.get("name", name) != name or manifest.get("kind", kind) != kind:
        return (f"it describes {_shown(manifest.get('kind'))} backup "
                f"{_shown(manifest.get('name'))}")
    files = [("file", manifest.get("file"), DATA_SUFFIX[kind], manifest)]
    if kind == "postgres" or manifest.get("globals") is not None:
        g = manifest.get("globals")
        if not isinstance(g, dict):
            return "its globals entry is missing"
        files.append(("globals.file", g.get("file"), GLOBALS_SUFFIX, g))
    for key, value, suffix, where in files:
        if not isinstance(value, str) or not re.fullmatch(re.escape(name) + suffix, value):
            return f"its {key} {_shown(value)} is not a file name this tool writes"
        if not isinstance(where.get("sha256"), str) or \
                not SHA256_RE.fullmatch(where["sha256"]):
            return f"its sha256 of {value} is malformed"
        if not _count(where.get("size")):
            return f"its size of {value} is malformed"
    if kind == "postgres":
        tables = manifest.get("tables", {})
        if not isinstance(tables, dict) or not all(
                isinstance(t, str) and _count(n) for t, n in tables.items()):
            return "its table row counts are malformed"
    elif not _count(manifest.get("keys", 0)) or not _count(manifest.get("expires", 0)):
        return "its key counts are malformed"
    return None


def _shown(value) -> str:
    """A value read from a manifest, for a one-line message: a string quoted, anything
    else by its JSON type (never a Python repr such as ``['x']``)."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "(missing)"
    kinds = {bool: "a JSON boolean", int: "a JSON number", float: "a JSON number",
             list: "a JSON array", dict: "a JSON object"}
    return f"({kinds.get(type(value), 'not a string')})"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(kind: str, name: str, manifest, where: str) -> dict:
    """``manifest`` if it passes :func:`manifest_problem`; else one-line OpsError."""
    problem = manifest_problem(kind, name, manifest)
    if problem:
        raise OpsError(f"the manifest {where} is not trusted: {problem}; nothing was changed")
    return manifest


def name_of(filename: str) -> str | None:
    """The backup name a file belongs to (``None`` for foreign files)."""
    base = filename.lstrip(".")
    if base.endswith(".partial"):
        base = base[: -len(".partial")]
    name = base.split(".", 1)[0]
    return name if NAME_RE.fullmatch(name) else None


def parse_listing(text: str) -> dict[str, list[Entry]]:
    """``{kind: [Entry...]}`` newest first, from :func:`listing_command` output."""
    entries: dict[tuple[str, str], Entry] = {}
    for line in text.splitlines():
        parts = line.split("\t", 3)
        if parts[0] == "file" and len(parts) == 4:
            _, kind, fname, size = parts
            name = name_of(fname)
            if name is None or not name.startswith(kind + "-"):
                continue
            e = entries.setdefault((kind, name), Entry(kind, name))
            e.files[fname] = int(size)
        elif parts[0] == "manifest" and len(parts) == 4:
            _, kind, fname, body = parts
            name = name_of(fname)
            if name is None:
                continue
            e = entries.setdefault((kind, name), Entry(kind, name))
            try:
                data = json.loads(body)
            except ValueError:
                data = None  # unreadable manifest: not a backup
            # A manifest naming files we never write is not a backup either.
            e.manifest = data if manifest_problem(kind, name, data) is None else None
    out: dict[str, list[Entry]] = {k: [] for k in KINDS}
    for (kind, _), e in entries.items():
        out.setdefault(kind, []).append(e)
    for kind in out:
        out[kind].sort(key=lambda e: (e.created, e.name), reverse=True)
    return out


def list_backups(host: Host, settings: Settings) -> dict[str, list[Entry]]:
    r = host.check(listing_command(settings), sudo=True, warn=False)
    return parse_listing(r.stdout)


def newest_complete(entries: Iterable[Entry]) -> Entry | None:
    for e in entries:
        if e.complete:
            return e
    return None


def find_entry(entries: Mapping[str, list[Entry]], ref: str, kind: str) -> Entry:
    """A backup by name (``postgres-2026...``), file name or path; latest if empty."""
    mine = entries.get(kind, [])
    if not ref or ref in ("latest", "safety"):
        # "latest" is the newest regular backup, never a restore's safety copy
        # (a second restore would undo the first); "safety" asks for that copy.
        want = "safety" if ref == "safety" else ""
        e = newest_complete(x for x in mine if x.label == want)
        if e is None:
            what = "safety" if want else "verified"
            raise OpsError(f"there is no {what} {kind} backup on the server; "
                           + ("pass --backup NAME (see backup.list)" if want else
                              f"run backup.{kind} first or pass --backup"))
        return e
    base = ref.rstrip("/").rsplit("/", 1)[-1]
    name = name_of(base) or base
    for e in mine:
        if e.name == name:
            if not e.complete:
                raise OpsError(f"{name} is not a complete, verified backup (no valid "
                               "manifest); pick another one (see backup.list)")
            return e
    raise OpsError(f"no {kind} backup named {name} on the server; see backup.list")


# --- checks -----------------------------------------------------------------------


def check_problems(
    kind: str,
    entries: list[Entry],
    *,
    now: datetime,
    max_age_hours: float,
    min_size_bytes: int,
    max_shrink_percent: int,
) -> list[str]:
    """What is wrong with the newest verified backup of ``kind`` (empty: all good)."""
    complete = [e for e in entries if e.complete]
    if not complete:
        return [f"{kind}: no verified backup at all"]
    newest = complete[0]
    problems = []
    age_h = (now - newest.created).total_seconds() / 3600
    if age_h > max_age_hours:
        problems.append(f"{kind}: newest verified backup {newest.name} is {age_h:.1f} h old "
                        f"(more than {max_age_hours} h)")
    if newest.size < min_size_bytes:
        problems.append(f"{kind}: newest backup {newest.name} is only {newest.size} bytes "
                        f"(less than {min_size_bytes})")
    if len(complete) > 1 and max_shrink_percent > 0:
        previous = complete[1].size
        if previous > 0 and newest.size < previous * (100 - max_shrink_percent) / 100:
            problems.append(
                f"{kind}: newest backup {newest.name} ({newest.size} bytes) is more than "
                f"{max_shrink_percent}% smaller than the one before ({previous} bytes)")
    return problems
